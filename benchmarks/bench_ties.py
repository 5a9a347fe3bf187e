"""TIES at paper scale: 8 task vectors the size of ViT-B-32's image encoder.

Not part of the default run (``pytest tests/``). Run with::

    pytest benchmarks/bench_ties.py -s

Shapes are those of open_clip ViT-B-32's visual tower (width 768, 12 blocks,
patch 32, 224 px → 7×7+1 tokens, output 512), built by hand: ≈ 87.8M float32
per task, 152 named tensors. Targets on a 2-core, 24 GiB machine: ≤ 10 s per
merge, peak extra memory ≤ 0.5× the inputs (θ_pre and the 8 task vectors).
Wall time depends on what else runs on the machine, so CPU seconds and the
load average are reported too.
Peak memory is measured in a fresh subprocess (VmHWM from /proc/self/status,
reset after the inputs are built) so pytest's own allocations do not count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WIDTH, LAYERS, PATCH, IMAGE, EMBED = 768, 12, 32, 224, 512
NUM_TASKS = 8


def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Name → shape of open_clip ViT-B-32's image-encoder float tensors."""
    tokens = (IMAGE // PATCH) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (WIDTH, 3, PATCH, PATCH),
        "class_embedding": (WIDTH,),
        "positional_embedding": (tokens, WIDTH),
        "ln_pre.weight": (WIDTH,),
        "ln_pre.bias": (WIDTH,),
    }
    for i in range(LAYERS):
        block = f"transformer.resblocks.{i}."
        shapes.update({
            block + "ln_1.weight": (WIDTH,),
            block + "ln_1.bias": (WIDTH,),
            block + "attn.in_proj_weight": (3 * WIDTH, WIDTH),
            block + "attn.in_proj_bias": (3 * WIDTH,),
            block + "attn.out_proj.weight": (WIDTH, WIDTH),
            block + "attn.out_proj.bias": (WIDTH,),
            block + "ln_2.weight": (WIDTH,),
            block + "ln_2.bias": (WIDTH,),
            block + "mlp.c_fc.weight": (4 * WIDTH, WIDTH),
            block + "mlp.c_fc.bias": (4 * WIDTH,),
            block + "mlp.c_proj.weight": (WIDTH, 4 * WIDTH),
            block + "mlp.c_proj.bias": (WIDTH,),
        })
    shapes.update({"ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,), "proj": (WIDTH, EMBED)})
    return shapes


def synthetic_inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """θ_pre ~ N(0, 0.02²) and task vectors with a per-tensor scale (fine-tuning moves layers unequally)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = vit_b32_shapes()
    pretrained = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    task_vectors = {}
    for task in range(NUM_TASKS):
        task_vectors[f"task{task}"] = {
            n: torch.randn(s, generator=generator).mul_(1e-4 * (1 + 9 * torch.rand((), generator=generator)))
            for n, s in shapes.items()}
    return pretrained, task_vectors


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure() -> dict[str, float]:
    """Build the inputs, reset the peak-RSS mark, merge once; report bytes and seconds."""
    from mmbench_plugins.mergers.ties import ties_merge

    pretrained, task_vectors = synthetic_inputs()
    input_bytes = sum(t.numel() * t.element_size()
                      for sd in (pretrained, *task_vectors.values()) for t in sd.values())
    try:  # "5" resets VmHWM to the current RSS (Linux ≥ 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss_before = _status_kib("VmRSS") * 1024
    hwm_before = _status_kib("VmHWM") * 1024
    start, start_cpu = time.perf_counter(), time.process_time()
    merged = ties_merge(pretrained, task_vectors)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = _status_kib("VmHWM") * 1024
    assert merged.keys() == pretrained.keys()
    return {"input_bytes": input_bytes, "rss_before": rss_before, "hwm_before": hwm_before,
            "peak": peak, "extra_peak": peak - rss_before, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "load_average": os.getloadavg()[0],
            "params_per_task": sum(t.numel() for t in pretrained.values()), "tensors": len(pretrained),
            "threads": torch.get_num_threads()}


def test_ties_memory_vit_b32(capsys):
    """Peak extra memory of one merge, in a fresh interpreter."""
    result = subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True,
                            env=os.environ.copy(), check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    with capsys.disabled():
        print(f"\nTIES, {NUM_TASKS} × {m['params_per_task'] / 1e6:.1f}M params ({m['tensors']} tensors), "
              f"{m['threads']} threads: {m['seconds']:.2f} s ({m['cpu_seconds']:.2f} s CPU, "
              f"load average {m['load_average']:.1f}); inputs {m['input_bytes'] / gib:.2f} GiB, "
              f"RSS before {m['rss_before'] / gib:.2f} GiB, peak {m['peak'] / gib:.2f} GiB, "
              f"extra peak {m['extra_peak'] / gib:.2f} GiB = {m['extra_peak'] / m['input_bytes']:.2f}× inputs")
    assert m["hwm_before"] <= m["rss_before"] * 1.05, "VmHWM was not reset; the peak includes input building"
    assert m["extra_peak"] <= 0.5 * m["input_bytes"]


@pytest.fixture(scope="module")
def inputs():
    return synthetic_inputs()


def test_ties_speed_vit_b32(benchmark, inputs):
    from mmbench_plugins.mergers.ties import ties_merge

    pretrained, task_vectors = inputs
    cpu_before = time.process_time()
    merged = benchmark.pedantic(ties_merge, args=(pretrained, task_vectors), rounds=3, iterations=1)
    benchmark.extra_info["cpu_seconds_per_round"] = (time.process_time() - cpu_before) / 3
    benchmark.extra_info["load_average"] = os.getloadavg()[0]
    assert merged.keys() == pretrained.keys()


if __name__ == "__main__" and sys.argv[1:] == ["--measure"]:
    print(json.dumps(_measure()))
