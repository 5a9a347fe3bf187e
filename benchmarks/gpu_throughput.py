"""GPU throughput of the paper architectures, for ``mmbench plan --throughput FILE``.

One prepared script (no hub, no data: random weights and synthetic 224 px batches), about
3–4 minutes on one H100/H200-class GPU, rerunnable (it overwrites ``--out``)::

    .venv/bin/python benchmarks/gpu_throughput.py --out docs/gpu-throughput.json
    .venv/bin/mmbench plan --preset vit-b-32-8task --throughput docs/gpu-throughput.json

It measures, for the image encoders of open_clip ViT-B-32, ViT-B-16 and ViT-L-14
(``-quickgelu``, as the paper presets), in bf16 autocast:

- fine-tuning images/s of mmbench's own loop (``mmbench.train.finetune``: AdamW, cosine
  schedule, grad clipping, batch 128, batches handed over from CPU memory as the harness does)
  and of a bare PyTorch loop on batches already on the GPU (the reference);
- evaluation images/s of mmbench's evaluation pass (``mmbench.evaluate.predict`` through a
  ``functional_call`` forward, as ``SharedStages.forward_fn``; the paper presets' eval batch)
  and of a bare ``module(x)`` forward (the reference);
- the TA and TIES merge time of 8 × ViT-B-32 image-encoder task vectors, as the harness runs a
  merge (CPU state dicts, torch's thread count), and TA on GPU tensors for comparison.

Decoding and transforming real images (the DataLoader) is not included: ``mmbench plan``
states that. ``--cpu-tiny`` (alias ``--dry-run``) runs the same code on the CPU with a tiny
ViT, 16 px images and a few steps, in seconds, to check the script and the file format.
Output: JSON with the device's name (``torch.cuda.get_device_name``), torch version and date.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMAT = "mmbench-throughput/1"
ARCHS = {"ViT-B-32": ("ViT-B-32-quickgelu", 512), "ViT-B-16": ("ViT-B-16-quickgelu", 512),
         "ViT-L-14": ("ViT-L-14-quickgelu", 256)}   # name: (open_clip model, eval batch of the paper presets)


class SyntheticData:
    """A TaskData of random normalised images: every batch is the same pinned CPU tensor, so what
    is timed is the harness's loop and the GPU, not image decoding."""

    def __init__(self, n: int, image_size: int, batch_size: int, num_classes: int, pin: bool) -> None:
        self.n = n
        x = torch.randn(batch_size, 3, image_size, image_size)
        y = torch.randint(0, num_classes, (batch_size,))
        self.x, self.y = (x.pin_memory(), y.pin_memory()) if pin else (x, y)

    def size(self, split: str) -> int:
        return self.n

    def batches(self, split, batch_size, *, shuffle=False, generator=None, limit=None):
        if shuffle:
            torch.randperm(self.n, generator=generator)  # the draw the harness's loop makes
        for _ in range(self.n // batch_size):
            yield self.x[:batch_size], self.y[:batch_size]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model_name: str, config: dict | None) -> torch.nn.Module:
    from mmbench import models
    from mmbench.presets import ModelSpec

    return models.create_clip(ModelSpec(name=model_name, config=config), load_pretrained=False).visual


def measure_model(label: str, model_name: str, config: dict | None, image_size: int, train_batch: int,
                  eval_batch: int, steps: int, eval_batches: int, device: torch.device) -> dict:
    from torch.func import functional_call

    from mmbench import evaluate, train
    from mmbench.presets import Recipe

    out: dict = {"open_clip_model": model_name, "image_size": image_size, "train_batch": train_batch,
                 "eval_batch": eval_batch}
    module = build(model_name, config)
    out["params"] = sum(p.numel() for p in module.parameters())
    init = {k: v.detach().clone() for k, v in module.named_parameters()}
    with torch.no_grad():
        width = module(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    head = F.normalize(torch.randn(10, width), dim=-1).to(device)

    def classify(features):
        return F.normalize(features, dim=-1) @ head.T

    # fine-tuning, mmbench's loop: the difference between a long and a short run (setup cancels out)
    def finetune(n_steps: int) -> float:
        data = SyntheticData(n_steps * train_batch, image_size, train_batch, 10, pin=device.type == "cuda")
        recipe = Recipe(lr=1e-5, weight_decay=0.1, batch_size=train_batch, epochs=1.0, schedule="cosine",
                        warmup_steps=min(2, n_steps), grad_clip=1.0)
        sync(device)
        t0 = time.perf_counter()
        train.finetune(module, init, data, classify, recipe, torch.Generator().manual_seed(0), device=device)
        sync(device)
        return time.perf_counter() - t0
    finetune(2)  # warm-up: kernels, allocator
    short, long_ = finetune(2), finetune(2 + steps)
    out["train_images_per_s"] = steps * train_batch / max(long_ - short, 1e-9)

    # fine-tuning, the bare loop (the reference): data already on the device
    module.load_state_dict(init)
    module.to(device).train()
    x = torch.randn(train_batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (train_batch,), device=device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)

    def bare_step():
        with train.autocast(device):
            loss = F.cross_entropy(classify(module(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for _ in range(2):
        bare_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bare_step()
    sync(device)
    out["bare_train_images_per_s"] = steps * train_batch / (time.perf_counter() - t0)
    del opt, params
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)

    # evaluation, mmbench's pass (predict through functional_call, as SharedStages.forward_fn)
    weights = {k: v.to(device) for k, v in init.items()}
    cpu_batches = [(torch.randn(eval_batch, 3, image_size, image_size), torch.zeros(eval_batch, dtype=torch.long))
                   for _ in range(2)]
    if device.type == "cuda":
        cpu_batches = [(a.pin_memory(), b) for a, b in cpu_batches]

    def forward(images):
        with train.autocast(device):
            return classify(functional_call(module, weights, (images.to(device, non_blocking=True),)))

    def batches():
        for i in range(eval_batches):
            yield cpu_batches[i % 2]
    evaluate.predict(forward, batches())
    sync(device)
    t0 = time.perf_counter()
    evaluate.predict(forward, batches())
    sync(device)
    out["eval_images_per_s"] = eval_batches * eval_batch / (time.perf_counter() - t0)

    xe = torch.randn(eval_batch, 3, image_size, image_size, device=device)
    with torch.no_grad(), train.autocast(device):
        module(xe)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(eval_batches):
            module(xe).float().argmax(-1)
        sync(device)
    out["bare_eval_images_per_s"] = eval_batches * eval_batch / (time.perf_counter() - t0)
    out["train_overhead"] = out["bare_train_images_per_s"] / out["train_images_per_s"] - 1
    out["eval_overhead"] = out["bare_eval_images_per_s"] / out["eval_images_per_s"] - 1
    print(f"{label}: fine-tune {out['train_images_per_s']:.0f} img/s (bare {out['bare_train_images_per_s']:.0f}), "
          f"eval {out['eval_images_per_s']:.0f} img/s (bare {out['bare_eval_images_per_s']:.0f})", flush=True)
    del module, weights, init, x, xe
    gc.collect()
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def measure_merge(tasks: int, layers: int, width: int, device: torch.device) -> dict:
    from common import synthetic_weights

    from mmbench.vectors import task_arithmetic
    from mmbench_plugins.mergers.ties import ties_merge

    pre, vectors = synthetic_weights(tasks, layers, width=width)
    out = {"tasks": tasks, "params_per_task": sum(t.numel() for t in pre.values()),
           "cpu_threads": torch.get_num_threads()}

    def best(fn, rounds=2):
        times = []
        for _ in range(rounds):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)
    out["ta_seconds"] = best(lambda: task_arithmetic(pre, vectors, 0.3))
    out["ties_seconds"] = best(lambda: ties_merge(pre, vectors, k=0.2, merge="sum", lam=0.3), rounds=1)
    if device.type == "cuda":
        pre_d = {k: v.to(device) for k, v in pre.items()}
        vec_d = {t: {k: v.to(device) for k, v in tv.items()} for t, tv in vectors.items()}
        out["ta_on_gpu_seconds"] = best(lambda: task_arithmetic(pre_d, vec_d, 0.3))
        del pre_d, vec_d
        torch.cuda.empty_cache()
    print(f"merge {tasks} × {out['params_per_task'] / 1e6:.1f}M (CPU, {out['cpu_threads']} threads): "
          f"TA {out['ta_seconds']:.2f} s, TIES {out['ties_seconds']:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-throughput.json", help="the JSON file to write (overwritten)")
    parser.add_argument("--cpu-tiny", "--dry-run", dest="tiny", action="store_true",
                        help="tiny ViT, 16 px, a few steps, on the CPU: checks the script and the file format")
    parser.add_argument("--steps", type=int, default=None, help="timed fine-tuning steps per model (default 20)")
    parser.add_argument("--models", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    args = parser.parse_args(argv)

    if args.tiny:
        from mmbench.catalogue import SMOKE_VIT

        device = torch.device("cpu")
        plan = {"ViT-B-32": ("mmbench-smoke-vit", SMOKE_VIT, 16, 8, 16)}
        steps, eval_batches = args.steps or 2, 2
        merge = (2, 1, 64)
    else:
        if not torch.cuda.is_available():
            print("gpu_throughput: no CUDA device (use --cpu-tiny to check the script on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        plan = {m: (ARCHS[m][0], None, 224, 128, ARCHS[m][1]) for m in wanted}
        steps, eval_batches = args.steps or 20, 10
        merge = (8, 12, 768)

    started = time.time()
    result = {
        "format": FORMAT,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "dry_run": bool(args.tiny), "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "synthetic batches already decoded and normalised: image decoding (the DataLoader) not included",
        "models": {}, "merge": None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, (name, config, size, train_batch, eval_batch) in plan.items():
        try:
            result["models"][label] = measure_model(label, name, config, size, train_batch, eval_batch, steps,
                                                    eval_batches, device)
        except torch.cuda.OutOfMemoryError as exc:  # keep what was measured, say what was not
            result["models"][label] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive a timeout
    result["merge"] = measure_merge(*merge, device)
    result["seconds"] = time.time() - started
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
