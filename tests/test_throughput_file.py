"""`mmbench plan --throughput FILE`: measured GPU throughputs replace the assumed ones, and the
file benchmarks/gpu_throughput.py writes (checked here with --cpu-tiny) is what plan reads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmbench.cli import main
from mmbench.estimate import THROUGHPUT, arch_throughput, load_throughput

REPO = Path(__file__).resolve().parent.parent


def _file(tmp_path, **models) -> Path:
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"format": "mmbench-throughput/1", "device": "NVIDIA Test GPU", "date": "today",
                                "models": models}))
    return path


def test_measured_figures_replace_assumed_ones(tmp_path, capsys):
    path = _file(tmp_path, **{"ViT-B-32": {"train_images_per_s": 1000.0, "eval_images_per_s": 1500.0},
                              "ViT-L-14": {"error": "out of memory"}})
    measured = load_throughput(str(path))
    assert arch_throughput("ViT-B-32-quickgelu", measured) == (1000.0, 1500.0)
    assert arch_throughput("ViT-L-14-quickgelu", measured) == THROUGHPUT["ViT-L-14"]  # failed: assumed kept
    args = ["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path / "s"), "--attack", "none",
            "--merger", "ta", "--defense", "none"]
    assert main(args) == 0
    assumed = capsys.readouterr().out
    assert main(args + ["--throughput", str(path)]) == 0
    out = capsys.readouterr().out
    assert "assumed throughput" in assumed and "measured throughput" not in assumed
    assert "measured throughput for ViT-B-32-quickgelu on NVIDIA Test GPU" in out
    assert "1000 img/s fine-tuning, 1500 img/s evaluation" in out
    # half the assumed speed: the estimate grows
    assumed_total = [line for line in assumed.splitlines() if "estimated GPU time for the rest" in line]
    measured_total = [line for line in out.splitlines() if "estimated GPU time for the rest" in line]
    assert assumed_total != measured_total


def test_bad_throughput_file_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert main(["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path / "s"),
                 "--throughput", str(bad)]) == 2
    assert "not a mmbench-throughput/1 file" in capsys.readouterr().err
    assert main(["plan", "--preset", "vit-b-32-6task", "--store", str(tmp_path / "s"),
                 "--throughput", str(tmp_path / "missing.json")]) == 2


def test_gpu_script_dry_run_writes_a_file_plan_reads(tmp_path):
    out = tmp_path / "tiny.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--cpu-tiny", "--out", str(out)],
                   check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["merge"]["ties_seconds"] > 0
    measured = load_throughput(str(out))
    assert measured.dry_run and measured.get("ViT-B-32") is not None
