"""GPU figures: where CUDA is available, run benchmarks/gpu_throughput.py (fine-tuning and
evaluation images/s of ViT-B-32, B-16 and L-14 in bf16 against bare loops, TIES/TA merge time
at 8 × ViT-B-32) into docs/gpu-throughput.json, the file ``mmbench plan --throughput`` reads.
Without a GPU, the assumed figures stay (marked as assumed by ``mmbench plan``) and Open says so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "gpu-throughput.json"


def test_gpu_throughput(perf):
    if not torch.cuda.is_available():
        perf.add_open("GPU throughput not measured",
                      "this machine has no GPU, so `mmbench plan` still prices GPU stages from the assumed "
                      "figures of `mmbench/estimate.py` (and says so in its output). On a GPU run "
                      "`.venv/bin/python benchmarks/gpu_throughput.py --out docs/gpu-throughput.json` (about "
                      "3–4 min, rerunnable; `--cpu-tiny` checks it on a CPU) and then `mmbench plan --throughput "
                      "docs/gpu-throughput.json` (or set `MMBENCH_THROUGHPUT`). The TA and TIES plugins' own "
                      "`estimate` (1 s assumed; 2 s, from TIES's CPU time at 8 × ViT-B-32) is the plugins' "
                      "(fingerprinted); the script records the measured merge times beside the throughputs.")
        pytest.skip("no CUDA device")
    subprocess.run([sys.executable, str(HERE / "gpu_throughput.py"), "--out", str(OUT)], check=True, timeout=600)
    data = json.loads(OUT.read_text())
    for arch, m in data["models"].items():
        if "error" in m:
            continue
        for kind in ("train", "eval"):
            ours, bare = m[f"{kind}_images_per_s"], m[f"bare_{kind}_images_per_s"]
            overhead = bare / ours - 1
            perf.add(id=f"gpu-{arch}-{kind}", section="Fine-tuning" if kind == "train" else "Evaluation",
                     what=f"{arch} {'fine-tuning' if kind == 'train' else 'evaluation'} on {data['device']} (bf16)",
                     measured=f"{ours:.0f} img/s", reference=f"bare {bare:.0f} img/s", ratio=overhead,
                     ratio_label="overhead", target="≤ 0.10", ok=overhead <= 0.10)
