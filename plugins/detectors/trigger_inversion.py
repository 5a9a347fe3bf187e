"""Trigger inversion on each contributed model, after Neural Cleanse (Wang et al., IEEE S&P
2019, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks").

For contributor k, the model θ_pre + τ_k with task k's head is probed on clean dev images
of task k. For every class c it searches the smallest trigger that sends images of other
classes to c: a mask m ∈ [0,1]^{H×W} and a pattern p in the valid pixel range,
x' = (1 − m)⊙x + m⊙p, minimising

    CE(f(x'), c) + β·‖m‖₁

with Adam. A backdoored class needs a much smaller mask than the others. Neural Cleanse's
outlier test: with the per-class mask norms L_c, the anomaly index of the smallest is
(median(L) − min(L)) / (1.4826 · MAD(L)); the contributor's suspicion score is that index
(> 2 is Neural Cleanse's threshold for "backdoored"; mmbench scores, it does not threshold).

Defaults and sources:
- ``lr`` 0.1 (Adam) and ``cost`` 1e-3 (β's initial value): Neural Cleanse's code.
- RECONSTRUCTED: Neural Cleanse adapts β during the search (raising it while the trigger
  succeeds, lowering it while it fails) and runs epochs over the data; here β is fixed,
  ``steps`` Adam steps over one batch of ``n_images`` dev images not of class c, to keep
  the search affordable on a CPU for every contributor of every attack and seed. ‖m‖₁ is
  the sum over the H×W mask (pixels), as in the paper.
- ``steps`` 100, ``n_images`` 64: budget choices of this reconstruction.
- The search of one contributor is cached by the digest of its task vector, so the clean
  contributors (the same for every attack of a seed) are searched once per seed.

The detector sees only what the threat model grants (mmbench.detect): θ_pre, the vectors,
the heads and clean dev images; not which contributor is malicious, nor the trigger's shape.
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import Cost, Param, Sizes, StateDict
from mmbench.detect import Detector, DetectorContext, Scores, vector_digest
from mmbench.lazy import F, torch


def anomaly_index(norms: list[float]) -> float:
    """Neural Cleanse's anomaly index of the smallest value: (median − min) / (1.4826·MAD);
    0 when every value is the same (MAD 0 and min = median), +inf-safe: a MAD of 0 with a
    smaller minimum gives a large finite number (the difference over 1e-12)."""
    values = torch.tensor(norms, dtype=torch.float64)
    # the median of an even count is the mean of the two middle values, as numpy's
    ordered = values.sort().values
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    dev = (values - median).abs().sort().values
    mad = dev[n // 2] if n % 2 else (dev[n // 2 - 1] + dev[n // 2]) / 2
    gap = float(median - ordered[0])
    return gap / max(1.4826 * float(mad), 1e-12) if gap > 0 else 0.0


class TriggerInversion(Detector):
    name = "trigger_inversion"
    description = "Neural Cleanse on each contributed model: anomaly index of the smallest inverted trigger"
    params = {
        "steps": Param(100, "int", min=1, help="Adam steps of each class's trigger search (reconstruction's budget)"),
        "n_images": Param(64, "int", min=1, help="clean dev images of other classes per search"),
        "lr": Param(0.1, "float", min=0, min_exclusive=True, help="Adam's learning rate (Neural Cleanse's code)"),
        "cost": Param(1e-3, "float", min=0, help="β, the weight of the mask's L1 norm (Neural Cleanse's initial value)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        passes = len(sizes.tasks) * 10 * params["steps"] * params["n_images"]
        return Cost(train_images=passes, note="an upper bound: 10 classes per task assumed, and the clean "
                                              "contributors' searches are cached across attacks")

    def score(self, pretrained: StateDict, task_vectors: dict[str, StateDict], ctx: DetectorContext,
              params: dict[str, Any]) -> Scores:
        scores: dict[str, float] = {}
        details: dict[str, Any] = {}
        for task, vector in task_vectors.items():
            key = {"task": task, "vector": vector_digest(vector), **params}

            def compute(task=task, vector=vector):
                return {}, self.invert(pretrained, vector, task, ctx, params)
            _, info = ctx.cached("nc-search", key, compute, label=task)
            scores[task] = info["anomaly_index"]
            details[task] = info
        return Scores(scores, {"per_contributor": details})

    def invert(self, pretrained: StateDict, vector: StateDict, task: str, ctx: DetectorContext,
               params: dict[str, Any]) -> dict[str, Any]:
        weights = {k: (v + vector[k] if k in vector else v) for k, v in pretrained.items()}
        data = ctx.data(task)
        images, labels = data.tensors("dev")
        low, high = data.valid_range()
        low, high = low.to(ctx.device), high.to(ctx.device)
        n_classes = len(data.class_names)
        gen = ctx.generator("trigger_inversion", task)
        norms: list[float] = []
        flips: list[float] = []
        for c in ctx.progress(range(n_classes), total=n_classes, desc=f"invert {task}"):
            others = (labels != c).nonzero().flatten()
            if len(others) == 0:
                norms.append(float("nan"))
                flips.append(0.0)
                continue
            pick = others[torch.randperm(len(others), generator=gen)[:params["n_images"]]]
            x = images[pick].to(ctx.device)
            target = torch.full((len(x),), c, dtype=torch.long, device=ctx.device)
            h, w = x.shape[-2:]
            # unconstrained variables: mask = sigmoid(m), pattern = low + (high − low)·sigmoid(p)
            m = (0.1 * torch.randn((1, 1, h, w), generator=gen)).to(ctx.device).requires_grad_(True)
            p = torch.zeros((1, x.shape[1], h, w), device=ctx.device).requires_grad_(True)
            opt = torch.optim.Adam([m, p], lr=params["lr"], betas=(0.5, 0.9))
            for _ in range(params["steps"]):
                mask = torch.sigmoid(m)
                pattern = low + (high - low) * torch.sigmoid(p)
                logits = ctx.forward(weights, (1 - mask) * x + mask * pattern, task)
                loss = F.cross_entropy(logits, target) + params["cost"] * mask.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                mask = torch.sigmoid(m)
                pattern = low + (high - low) * torch.sigmoid(p)
                pred = ctx.forward(weights, (1 - mask) * x + mask * pattern, task).argmax(1)
                norms.append(float(mask.sum()))
                flips.append(float((pred == c).float().mean()))
        finite = [n for n in norms if n == n]
        index = anomaly_index(finite) if len(finite) > 1 else 0.0
        smallest = min(range(len(norms)), key=lambda i: norms[i] if norms[i] == norms[i] else float("inf"))
        return {"anomaly_index": index, "mask_l1": norms, "flip_rate": flips, "smallest_class": smallest}


@mmbench.hookimpl
def mmbench_register_detectors(register):
    register(TriggerInversion())
