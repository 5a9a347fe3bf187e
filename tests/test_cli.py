"""The smoke preset end to end through the CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmbench import __version__
from mmbench.cli import main


def results(store: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (store / "results" / "smoke").glob("*.json")}


def test_baseline_cell_has_real_numbers(smoke_store):
    r = results(smoke_store)["none__ta__none__seed0"]
    assert r["status"] == "ok"
    m = r["metrics"]
    assert set(m["acc_per_task"]) == {"digits", "photo_patches"}
    assert m["acc"] == pytest.approx(sum(m["acc_per_task"].values()) / 2)
    for task, acc in m["acc_per_task"].items():
        assert acc == pytest.approx(m["normalized_acc_per_task"][task] * m["finetuned_acc_per_task"][task])
    # fine-tuning learned something: well above chance (10 classes) on each task
    assert min(m["finetuned_acc_per_task"].values()) > 0.3
    merger = r["plugins"]["merger"]
    assert {k: merger[k] for k in ("name", "distribution", "version")} == {"name": "ta", "distribution": "mmbench", "version": __version__}
    assert len(merger["code"]) == 12  # the code fingerprint, part of the keys
    assert r["key"] and r["seed"] == 0 and "total" in r["durations"]
    assert r["environment"]["torch"] and r["environment"]["threads"] >= 1


def test_attack_cell_rerun_and_reuse(store_copy, capsys):
    args = ["run", "--preset", "smoke", "--attack", "badnets", "--merger", "ta", "--defense", "none",
            "--store", str(store_copy)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "reused" in err and "finetune[digits, seed 0]" in err.split("computed")[0]
    r = results(store_copy)["badnets__ta__none__seed0"]
    assert r["status"] == "ok"
    assert 0.0 <= r["metrics"]["asr"] <= 1.0 and r["metrics"]["standalone_asr"] is not None
    first_key = r["key"]

    # warm: nothing is recomputed
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "computed" not in err and "1 cell results" in err

    # --rerun always recomputes this cell and its attack, reusing the fine-tunes
    assert main(args + ["--rerun", "always"]) == 0
    err = capsys.readouterr().err
    reused, computed = err.split("computed", 1)
    assert "finetune[photo_patches, seed 0]" in reused and "base" in reused
    assert "attack badnets" in computed and "cell badnets/ta/none" in computed
    assert "finetune" not in computed
    assert results(store_copy)["badnets__ta__none__seed0"]["key"] == first_key


def test_parameter_override_is_its_own_result(store_copy):
    base = ["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
            "--store", str(store_copy), "--quiet"]
    before = results(store_copy)["none__ta__none__seed0"]
    assert main(base + ["--set", "ta.lambda=0.0"]) == 0
    stored = results(store_copy)
    assert stored["none__ta__none__seed0"] == before  # the preset's own result is kept
    [other] = [r for cell, r in stored.items() if cell.startswith("none__ta__none__set-ta.lambda=0.0-")]
    assert other["key"] != before["key"] and other["params"]["merger"]["lambda"] == 0.0
    assert other["setting"] == {"ta": {"lambda": 0.0}}
    # λ = 0 merges to the pretrained model: its ACC is the base model's, no gain
    base_acc = other["metrics"]["base_acc_per_task"]
    assert other["metrics"]["acc_per_task"] == pytest.approx(base_acc)
    assert other["metrics"]["acc_gain_over_base"] == pytest.approx(0.0, abs=1e-9)

    # the default leaderboard shows the preset's settings; --set selects the other one
    board = store_copy / "board"

    def rows(*extra: str) -> list[list[str]]:
        assert main(["leaderboard", "--preset", "smoke", "--store", str(store_copy), "--out", str(board),
                     *extra]) == 0
        lines = (board / "results.csv").read_text().splitlines()
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","))) for line in lines[1:]]
    mine = [r for r in rows() if (r["attack"], r["merger"], r["defense"]) == ("none", "ta", "none")]
    assert [r["status"] for r in mine] == ["ok"] and float(mine[0]["acc"]) == pytest.approx(before["metrics"]["acc"])
    mine = [r for r in rows("--set", "ta.lambda=0.0") if (r["attack"], r["merger"], r["defense"]) == ("none", "ta", "none")]
    assert [r["status"] for r in mine] == ["ok"] and float(mine[0]["acc"]) == pytest.approx(other["metrics"]["acc"])


@pytest.mark.parametrize("argv, needle", [
    (["run", "--preset", "smoke", "--attack", "badnet"], "did you mean 'badnets'"),
    (["run", "--preset", "smok"], "did you mean 'smoke'"),
    (["run", "--preset", "smoke", "--set", "ta.lamda=1"], "did you mean 'lambda'"),
    (["run", "--preset", "smoke", "--set", "nonsense"], "PLUGIN.PARAM=VALUE"),
    (["run", "--preset", "smoke", "--jobs", "-1"], "--jobs must be ≥ 0"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    assert main(argv + ["--store", str(tmp_path)]) == 2
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("mmbench: warning")]
    assert len(lines) == 1 and lines[0].startswith("mmbench: error: ") and needle in lines[0]
    assert not (tmp_path / "results").exists()  # nothing half-written


def test_corrupt_artifact_is_recomputed(store_copy, capsys):
    victim = max((store_copy / "artifacts").glob("*/*.safetensors"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-16] + b"\0" * 16)
    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                 "--store", str(store_copy), "--rerun", "always"]) == 0
    assert "failed verification" in capsys.readouterr().err


def test_leaderboard_lists_every_cell(smoke_store, tmp_path, capsys):
    out = tmp_path / "board"
    assert main(["leaderboard", "--preset", "smoke", "--store", str(smoke_store), "--out", str(out)]) == 0
    csv = (out / "results.csv").read_text().splitlines()
    md = (out / "README.md").read_text()
    assert "| none " in md and "not run" in md
    rows = [line.split(",") for line in csv[1:]]
    assert any(r[1] == "none" and r[2] == "ta" and r[5] == "ok" for r in rows)
    assert any(r[5] == "not run" for r in rows)


def test_plugins_command_lists_kinds_and_versions(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "badnets" in out and "attack" in out and "mmbench" in out and __version__ in out


def test_console_script_entry(tmp_path):
    exe = Path(sys.executable).with_name("mmbench")
    proc = subprocess.run([str(exe), "run", "--preset", "nope", "--store", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr


def test_merge_is_shared_by_defenses_that_post_process_it(store_copy, capsys):
    # none and ibvs hand the merger the cell's own task vectors: one AdaMerging run serves both;
    # dam hands it masked vectors: its merge is its own and is not stored as a merge stage
    args = ["run", "--preset", "smoke", "--attack", "none", "--merger", "adamerging", "--defense", "none",
            "--defense", "ibvs", "--defense", "dam", "--store", str(store_copy), "--jobs", "1"]
    def merges() -> int:
        return [json.loads(p.read_text())["kind"] for p in (store_copy / "artifacts").glob("*/*.json")].count("merge")
    before = merges()  # the fixture's TA merge
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("computing merge none/adamerging") == 1
    assert merges() == before + 1
    r = results(store_copy)
    plain, ibvs = r["none__adamerging__none__seed0"], r["none__adamerging__ibvs__seed0"]
    # what the merger learned and what the defense reports, side by side
    assert ibvs["info"]["merge"]["lambdas"] == plain["info"]["merge"]["lambdas"]
    assert "lambda" in ibvs["info"]["defense"] and plain["info"]["defense"] == {}
    assert r["none__adamerging__dam__seed0"]["status"] == "ok"

    # --rerun always recomputes the shared merge once, not once per cell
    assert main(args[:-6] + ["--store", str(store_copy), "--jobs", "1", "--rerun", "always"]) == 0
    err = capsys.readouterr().err
    assert err.count("computing merge none/adamerging") == 1


def test_parallel_workers_match_a_serial_run(store_copy, tmp_path, capsys):
    # stages in two worker processes; two cells need IBVS's injection vector: the store's
    # per-stage lock lets one compute it while the other waits and loads it. The thread count
    # is in no key because every stage runs single-threaded on a CPU: the serial run, in a
    # process set to 2 threads, gives bit-identical figures
    import torch

    serial = tmp_path / "serial"
    shutil.copytree(store_copy, serial)
    cells = ["run", "--preset", "smoke", "--attack", "none", "--attack", "badnets", "--merger", "ta",
             "--defense", "none", "--defense", "ibvs", "--quiet"]
    assert main(cells + ["--store", str(store_copy), "--jobs", "2"]) == 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(cells + ["--store", str(serial), "--jobs", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    parallel_results, serial_results = results(store_copy), results(serial)
    for cell in (f"{a}__ta__{d}__seed0" for a in ("none", "badnets") for d in ("none", "ibvs")):
        assert parallel_results[cell]["status"] == "ok"
        assert parallel_results[cell]["key"] == serial_results[cell]["key"]
        assert parallel_results[cell]["metrics"] == serial_results[cell]["metrics"]
        assert parallel_results[cell]["environment"]["threads"] == serial_results[cell]["environment"]["threads"] == 1
    kinds = [json.loads(p.read_text())["kind"] for p in (store_copy / "artifacts").glob("*/*.json")]
    assert kinds.count("plugin:ibvs.injection_vector") == 1


def test_prune_lists_then_deletes_what_no_current_cell_has(store_copy, capsys):
    folder = store_copy / "results" / "smoke"
    current = sorted(p.name for p in folder.glob("*.json"))
    ghost = json.loads((folder / "none__ta__none__seed0.json").read_text())
    ghost.update(cell="none__ghost__none__seed0", merger="ghost")
    (folder / "none__ghost__none__seed0.json").write_text(json.dumps(ghost))
    (folder / "none__ta__ibvs__seed0.json").write_text("{ truncated")
    assert main(["prune", "--store", str(store_copy)]) == 0
    out = capsys.readouterr().out
    assert "none__ghost__none__seed0.json: merger ghost not installed" in out
    assert "none__ta__ibvs__seed0.json: unreadable" in out
    assert "2 result(s) would be deleted" in out and len(list(folder.glob("*.json"))) == len(current) + 2
    assert main(["prune", "--store", str(store_copy), "--yes"]) == 0
    assert sorted(p.name for p in folder.glob("*.json")) == current
    assert main(["prune", "--store", str(store_copy)]) == 0
    assert "nothing to prune" in capsys.readouterr().out


def test_rerun_cells_keeps_the_attack_and_a_chain_runs_in_process(store_copy, capsys):
    args = ["run", "--preset", "smoke", "--attack", "badnets", "--merger", "ta", "--defense", "none",
            "--store", str(store_copy)]
    assert main(args + ["--quiet"]) == 0
    capsys.readouterr()
    # one cell to recompute is a chain of one stage: it runs in this process even with --jobs 2
    # (its "computing" lines reach this process's stderr), and its attack is kept
    assert main(args + ["--rerun", "cells", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "computing attack" not in err and "cell badnets/ta/none seed 0" in err.split("computed", 1)[1]
    assert "reused" in err and "attack badnets (seed 0)" in err.split("computed", 1)[0]
