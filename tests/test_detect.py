"""The detection track: AUROC and the detectors' statistics by hand, the threat model, and
detect + screen stages end to end on smoke through the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmbench.api import PluginError
from mmbench.cli import main
from mmbench.detect import DetectorContext, Scores, auroc, most_suspicious, vector_digest


# --- the statistics ---------------------------------------------------------------------------
def test_auroc_by_hand():
    assert auroc([3.0], [1.0, 2.0]) == 1.0                 # ranked above both
    assert auroc([0.0], [1.0, 2.0]) == 0.0                 # below both
    assert auroc([1.0], [1.0, 2.0]) == 0.25                # a tie (½) and a loss, over 2 pairs
    assert auroc([2.0, 0.0], [1.0]) == 0.5                 # pooled: one win, one loss
    assert auroc([], [1.0]) is None and auroc([1.0], []) is None


def test_most_suspicious_breaks_ties_by_merge_order():
    assert most_suspicious({"a": 1.0, "b": 3.0, "c": 3.0}, ["a", "b", "c"]) == "b"
    assert most_suspicious({"a": 1.0, "b": 3.0, "c": 3.0}, ["c", "b", "a"]) == "c"


def test_anomaly_index_by_hand():
    from mmbench_plugins.detectors.trigger_inversion import anomaly_index

    # median 10; |deviations| 2 0 2 0 8 → MAD 2; (10 − 2) / (1.4826 · 2)
    assert anomaly_index([8.0, 10.0, 12.0, 10.0, 2.0]) == pytest.approx(8 / (1.4826 * 2))
    # an even count: median (8 + 10) / 2 = 9; |deviations| 1 1 3 7 → MAD (1 + 3) / 2 = 2; (9 − 2) / 2.9652
    assert anomaly_index([8.0, 10.0, 12.0, 2.0]) == pytest.approx(7 / (1.4826 * 2))
    assert anomaly_index([5.0, 5.0, 5.0]) == 0.0          # nothing stands out


def test_tv_cosine_by_hand():
    from mmbench_plugins.detectors.tv_cosine import TaskVectorCosine

    vectors = {"a": {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])},
               "b": {"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0])},
               "c": {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}}
    out = TaskVectorCosine().score({}, vectors, None, {"reduce": "mean"})
    assert isinstance(out, Scores)
    # cos(a, b) = 1, cos(a, c) = cos(b, c) = 0: a and b score 1 − ½, c scores 1 − 0
    assert out.scores == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    out = TaskVectorCosine().score({}, vectors, None, {"reduce": "max"})
    assert out.scores == pytest.approx({"a": 0.0, "b": 0.0, "c": 1.0})


def test_vector_digest_sees_content_not_identity():
    a = {"w": torch.tensor([1.0, 2.0])}
    assert vector_digest(a) == vector_digest({"w": torch.tensor([1.0, 2.0])})
    assert vector_digest(a) != vector_digest({"w": torch.tensor([1.0, 2.5])})
    assert vector_digest(a) != vector_digest({"v": torch.tensor([1.0, 2.0])})


# --- the threat model ---------------------------------------------------------------------------
class _Data:
    name, class_names = "t", ("x", "y")

    def tensors(self, split):
        return torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])


class _Ctx:
    preset, seed, device, tasks = None, 0, torch.device("cpu"), ("t",)

    def data(self, task):
        return _Data()

    def clean_finetune(self, task, seed=None):  # what a detector must not reach
        raise AssertionError("reached")


def test_detector_context_grants_dev_data_only():
    ctx = DetectorContext(_Ctx())
    images, labels = ctx.data("t").tensors("dev")
    assert images.shape == (2, 1, 2, 2)
    with pytest.raises(PluginError, match="dev split only"):
        ctx.data("t").tensors("test")
    for name in ("clean_finetune", "task_vector", "finetune", "attack_success_rate", "target_class"):
        with pytest.raises(PluginError, match="outside the detection threat model"):
            getattr(ctx, name)


# --- end to end on smoke --------------------------------------------------------------------------
def _detection(store, preset="smoke") -> dict[str, dict]:
    folder = store / "results" / preset / "detection"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_detect_and_screen_through_the_cli(store_copy, capsys, tmp_path):
    args = ["run", "--preset", "smoke", "--attack", "badnets", "--attack", "none", "--merger", "ta", "--defense",
            "none", "--detector", "tv_cosine", "--detector", "trigger_inversion", "--store", str(store_copy)]
    assert main(args) == 0
    out = capsys.readouterr().out
    got = _detection(store_copy)
    assert set(got) == {f"{kind}__{det}__{attack}{m}__seed0" for kind, m in (("detect", ""), ("screen", "__ta"))
                        for det in ("tv_cosine", "trigger_inversion") for attack in ("badnets", "none")}
    det = got["detect__trigger_inversion__badnets__seed0"]
    assert det["status"] == "ok" and det["malicious"] == "digits"          # smoke's adversary task
    assert set(det["scores"]) == {"digits", "photo_patches"}
    assert all(math.isfinite(v) for v in det["scores"].values())
    assert det["auroc"] in (0.0, 0.5, 1.0)                                  # one clean contributor
    assert det["flagged"] == most_suspicious(det["scores"], ["digits", "photo_patches"])
    assert "flags " in out and "without " in out
    # the screen merges all but the flagged contributor, evaluated like a cell
    scr = got["screen__trigger_inversion__badnets__ta__seed0"]
    assert scr["status"] == "ok" and scr["left_out"] == det["flagged"]
    assert scr["left_out_malicious"] == (det["flagged"] == "digits")
    assert 0.0 <= scr["metrics"]["normalized_acc"] and "asr" in scr["metrics"]
    assert got["detect__tv_cosine__none__seed0"]["malicious"] is None
    assert got["detect__tv_cosine__none__seed0"]["auroc"] is None
    # with one task left, the merge without digits is the same merge whoever flagged it: shared
    a, b = got["screen__tv_cosine__badnets__ta__seed0"], got["screen__trigger_inversion__badnets__ta__seed0"]
    if a["left_out"] == b["left_out"]:
        assert a["metrics"] == b["metrics"]

    # warm: nothing is recomputed, and the results are reported again
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "computed" not in captured.err and "flags " in captured.out

    # the leaderboard renders the detection tables and detection.csv
    out_dir = tmp_path / "board"
    out_dir.mkdir()
    assert main(["leaderboard", "--store", str(store_copy), "--preset", "smoke", "--out", str(out_dir)]) == 0
    readme = (out_dir / "README.md").read_text()
    assert "Detection track, preset `smoke`" in readme and "pooled AUROC" in readme
    import pandas as pd

    csv = pd.read_csv(out_dir / "detection.csv")
    assert list(csv.columns[:3]) == ["preset", "kind", "detector"]
    assert (csv.status == "ok").sum() == len(got)  # the rest of smoke's detection track: "not run"
    assert set(csv.status) == {"ok", "not run"}
    assert "screening-table" in (out_dir / "index.html").read_text()


def test_a_slice_runs_no_detection_unless_asked(store_copy, capsys):
    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                 "--store", str(store_copy)]) == 0
    assert not (store_copy / "results" / "smoke" / "detection").exists()
    assert main(["run", "--preset", "smoke", "--detector", "none", "--detector", "tv_cosine",
                 "--store", str(store_copy)]) == 2
    assert "--detector none" in capsys.readouterr().err


def test_detector_parameters_are_checked(store_copy, capsys):
    assert main(["run", "--preset", "smoke", "--detector", "trigger_inversion", "--attack", "none",
                 "--merger", "ta", "--defense", "none", "--set", "trigger_inversion.steps=0",
                 "--store", str(store_copy)]) == 2
    assert "steps" in capsys.readouterr().err


def test_check_plugin_runs_a_detector_through_the_contract(capsys):
    assert main(["check-plugin", "tv_cosine"]) == 0
    out = capsys.readouterr().out
    assert "on badnets: scores digits" in out and "flags" in out and "AUROC" in out
    assert "a recomputation gives the same scores" in out and "passes the contract on smoke" in out
