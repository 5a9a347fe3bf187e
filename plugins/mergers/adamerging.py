"""AdaMerging: learn the merging coefficients by test-time entropy minimisation.

Yang, Wang, Shen, Liu, Guo, Wang, Tao. "AdaMerging: Adaptive Model Merging
for Multi-Task Learning." ICLR 2024. arXiv:2310.02575.

Merged weights, per named tensor ("layer") p and task k:

    θ_p = θ_pre,p + Σ_k clamp(λ_pk, lo, hi)·τ_kp

layer-wise: one λ_pk per tensor and task (P × K); task-wise: λ_pk = λ_k (K).
The λ are learned by minimising, with Adam, the summed Shannon entropy of the
merged model's predictions on UNLABELLED images of every task:

    L(λ) = Σ_k mean_{x ∈ B_k} H(softmax(head_k(f_θ(x)))),   H(p) = −Σ_c p_c log p_c

one batch B_k per task per step. The merged encoder runs through
``ctx.forward(weights, images, task)`` (``torch.func.functional_call``), so no
model is copied per step: ``weights`` is rebuilt each step as tensors
differentiable w.r.t. λ. AdaMerging++ (``plus``) is the same on TIES-trimmed,
sign-resolved task vectors: per task, the top-``ties_k`` entries that agree
with the elected sign (:func:`mmbench.vectors.sign_resolved`).

Hyperparameters (plugin ``defaults``):

* ``granularity`` = ``"layer"`` — ``"layer"`` (λ ∈ R^{P×K}) or ``"task"`` (λ ∈ R^K).
* ``steps`` = 500 — Adam steps (FusionBench uses 1000).
* ``lr`` = 1e-3 — Adam learning rate (betas 0.9, 0.999).
* ``batch_size`` = 16 — unlabelled images per task per step.
* ``init`` = 0.3 — initial value of every λ (must lie inside ``clamp``).
* ``clamp`` = [0.0, 1.0] — bounds applied to λ in every merge. The paper
  clamps to [0, 1]; the bounds are a parameter here because on small presets
  the useful coefficients lie above 1 (PROBES.md).
* ``split`` = ``"dev"`` — images the entropy is measured on: ``"dev"``
  (BadMerging: 10% of train) or ``"test"`` (the original code: shuffled test
  images). Labels are never read.
* ``plus`` = False — AdaMerging++: merge TIES-trimmed, sign-resolved vectors.
* ``ties_k`` = 0.2 — the TIES trim fraction used by ``plus``.

Reconstructed / this implementation's choices: each task draws its batches
from its own generator ``ctx.generator("adamerging", task)`` and starts a new
shuffled pass when a split is exhausted; integer tensors of θ_pre and float
tensors without a task vector are kept as in θ_pre. ``info["final_entropy"]``
is L at the returned coefficients on one fresh batch per task.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from mmbench.lazy import torch  # torch on first use: listing plugins does not import it

from mmbench.api import Cost, Merged, Merger, Param, PluginError, Sizes, StateDict
from mmbench.vectors import float_items, sign_resolved

GRANULARITIES = ("layer", "task")


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy of softmax(logits), in nats."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def merge_weights(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
                  layers: Sequence[str], coefficients: torch.Tensor) -> StateDict:
    """θ_p = θ_pre,p + Σ_k c_pk·τ_kp for p in ``layers`` (others as in θ_pre).

    ``coefficients`` is P × K (layer-wise) or K (task-wise), already clamped;
    the result is differentiable w.r.t. them.
    """
    weights = dict(pretrained)
    for i, name in enumerate(layers):
        per_task = coefficients[i] if coefficients.dim() == 2 else coefficients
        weight = pretrained[name]
        for k, tv in enumerate(task_vectors):
            weight = weight + per_task[k] * tv[name]
        weights[name] = weight
    return weights


def unlabelled_batches(ctx: Any, task: str, split: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Images of ``task``'s ``split`` in shuffled batches, pass after pass, forever."""
    generator = ctx.generator("adamerging", task)
    while True:
        empty = True
        for images, _labels in ctx.data(task).batches(split, batch_size, shuffle=True, generator=generator):
            empty = False
            yield images
        if empty:
            raise PluginError(f"adamerging: task {task!r} has no {split!r} images")


def _options(params: dict[str, Any]) -> dict[str, Any]:
    granularity = params["granularity"]
    if granularity not in GRANULARITIES:
        raise PluginError(f"adamerging: granularity must be 'layer' or 'task', not {granularity!r}")
    try:
        lo, hi = (float(b) for b in params["clamp"])
    except (TypeError, ValueError):
        raise PluginError(f"adamerging: clamp must be [low, high], not {params['clamp']!r}") from None
    init = float(params["init"])
    if not lo <= init <= hi:
        raise PluginError(f"adamerging: init {init} must lie inside clamp [{lo}, {hi}] (no gradient outside)")
    steps, batch_size = int(params["steps"]), int(params["batch_size"])
    if steps < 0 or batch_size < 1:
        raise PluginError(f"adamerging: need steps ≥ 0 and batch_size ≥ 1, not {steps} and {batch_size}")
    return {"granularity": granularity, "steps": steps, "lr": float(params["lr"]), "batch_size": batch_size,
            "init": init, "clamp": [lo, hi], "split": str(params["split"]), "plus": bool(params["plus"]),
            "ties_k": float(params["ties_k"])}


class AdaMerging(Merger):
    """AdaMerging / AdaMerging++ (Yang et al., ICLR 2024): coefficients learned by entropy minimisation."""

    name = "adamerging"
    description = "AdaMerging: task- or layer-wise coefficients learned by test-time entropy minimisation"
    params = {
        "granularity": Param("layer", "str", choices=GRANULARITIES,
                             help="layer: one λ per tensor and task (P × K); task: one λ per task (K)"),
        "steps": Param(500, "int", min=0, help="Adam steps on the coefficients (FusionBench uses 1000)"),
        "lr": Param(1e-3, "float", min=0, help="Adam learning rate (betas 0.9, 0.999)"),
        "batch_size": Param(16, "int", min=1, help="unlabelled images per task per step"),
        "init": Param(0.3, "float", help="initial value of every λ (must lie inside clamp)"),
        "clamp": Param([0.0, 1.0], "list[float]", length=2,
                       help="[low, high] bounds applied to λ in every merge (the paper: [0, 1])"),
        "split": Param("dev", "str", choices=("dev", "test", "train"),
                       help="images the entropy is measured on (labels are never read): dev (BadMerging) "
                            "or test (the original code)"),
        "plus": Param(False, "bool", help="AdaMerging++: merge TIES-trimmed, sign-resolved task vectors"),
        "ties_k": Param(0.2, "float", min=0, min_exclusive=True, help="the TIES trim fraction used by plus"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        # entropy of each task's unlabelled batch, forward and backward, every step
        return Cost(train_images=int(params["steps"]) * int(params["batch_size"]) * len(sizes.tasks))

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: Any, params: dict[str, Any]) -> Merged:
        o = _options({**self.defaults, **params})
        if not task_vectors:
            raise PluginError("adamerging: no task vectors to merge")
        tasks = list(task_vectors)
        vectors = [float_items(tv) for tv in task_vectors.values()]
        if o["plus"]:
            vectors = sign_resolved(vectors, k=o["ties_k"])
        layers = [n for n, p in pretrained.items() if torch.is_floating_point(p) and all(n in tv for tv in vectors)]
        merged = set(layers)
        lo, hi = o["clamp"]

        device = ctx.device
        base = {n: p.to(device) for n, p in pretrained.items()}
        vectors = [{n: tv[n].to(device, base[n].dtype) for n in layers} for tv in vectors]
        shape = (len(layers), len(tasks)) if o["granularity"] == "layer" else (len(tasks),)
        lambdas = torch.full(shape, o["init"], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([lambdas], lr=o["lr"])
        streams = {task: unlabelled_batches(ctx, task, o["split"], o["batch_size"]) for task in tasks}

        def entropy(weights: StateDict) -> torch.Tensor:
            # one forward over every task's batch (per-sample ops only: same loss as K forwards, faster)
            batches = [next(streams[task]).to(device) for task in tasks]
            features = ctx.forward(weights, torch.cat(batches)).split([len(b) for b in batches])
            return sum(mean_entropy(ctx.logits(f, task)) for f, task in zip(features, tasks))

        history: list[float] = []
        start = 0
        # resumable: a run that dies part-way continues from its last checkpoint (the
        # coefficients, Adam's state, the losses; each task's stream is replayed to its place)
        checkpoint = ctx.checkpoint("adamerging") if hasattr(ctx, "checkpoint") else None
        resumed = checkpoint.load() if checkpoint is not None else None
        if resumed is not None:
            tensors, info = resumed
            with torch.no_grad():
                lambdas.copy_(tensors["lambdas"].to(device))
            state = optimizer.state_dict()
            state["state"] = {0: {k[len("adam."):]: v.to(device) if k != "adam.step" else v
                                  for k, v in tensors.items() if k.startswith("adam.")}}
            optimizer.load_state_dict(state)
            start, history = int(info["step"]), list(info["entropy"])
            for stream in streams.values():
                for _ in range(start):
                    next(stream)
        for step in ctx.progress(range(start, o["steps"]), desc="adamerging"):
            loss = entropy(merge_weights(base, vectors, layers, lambdas.clamp(lo, hi)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            if checkpoint is not None and step + 1 < o["steps"] and checkpoint.due():
                adam = optimizer.state_dict()["state"].get(0, {})
                checkpoint.save({"lambdas": lambdas.detach(), **{f"adam.{k}": v for k, v in adam.items()}},
                                {"step": step + 1, "entropy": history})

        with torch.no_grad():
            coefficients = lambdas.detach().clamp(lo, hi)
            weights = merge_weights(base, vectors, layers, coefficients)
            final_entropy = float(entropy(weights))
        ctx.log(f"adamerging: entropy {history[0] if history else final_entropy:.4f} → {final_entropy:.4f} "
                f"after {o['steps']} steps ({o['granularity']}-wise{', ++' if o['plus'] else ''})")
        return Merged(
            {n: weights[n].detach().cpu() if n in merged else p.clone() for n, p in pretrained.items()},
            info={"lambdas": coefficients.cpu().tolist(), "granularity": o["granularity"], "tasks": tasks,
                  "layers": layers, "final_entropy": final_entropy, "entropy": history,
                  **{k: o[k] for k in ("steps", "lr", "batch_size", "init", "clamp", "split", "plus", "ties_k")}})


import mmbench  # noqa: E402  (the hook is this module's only tie to the harness)


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(AdaMerging())
