"""IBVS: Injection Backdoor Vector Subtraction.

Pawlak, Dubiński, Marczak, Twardowski. "Backdoor Vectors: a Task Arithmetic
View on Backdoor Attacks and Defenses." arXiv:2510.08016, 2025.

A backdoor vector is BV = θ_backdoored − θ_clean, both fine-tuned on the same
task from θ_pre; subtracting a BV weakens a backdoor, and BVs of different
patch triggers transfer to one another. IBVS uses that without knowing the
attack: the defender owns one task of the merge and a simple trigger of its
own, fine-tunes a clean and a triggered (BadNets-style) model on that task,
and subtracts the injected backdoor vector from whatever the merger returns:

    BV_inj = θ_trig − θ_clean
    θ      = merge(τ_1..τ_K) − λ_IBVS·BV_inj

BV_inj depends on neither the attack nor the merger: it is a cached stage
(``ibvs.injection_vector``), computed once per preset and seed and shared by
every cell. θ_clean is the harness's shared clean fine-tune of the defender's
task; θ_trig uses the same recipe and seed with poisoned batches.

Hyperparameters (defaults):

- ``lambda`` 1.0: λ_IBVS, the scale of the subtracted vector (reconstructed:
  the paper's value is not in our sources; 1.0 removes exactly one injected
  backdoor's worth of weight change).
- ``task`` null: the defender's task; null → the preset's LAST task (the
  adversary's is conventionally the first). Reconstructed.
- ``target_class`` 0: the class the defender's trigger maps to, on the
  defender's own task (reconstructed). If ``task`` is set to the adversary's
  task, pick a class other than the attack's target: the defender does not
  know it, and sharing it would flatter the defense.
- ``poison_rate`` 0.1: fraction of each training batch poisoned (as BadNets).
- ``patch_area`` 0.015625: patch area as a fraction of the image (4×4 px at
  32 px, 28×28 at 224), as BadNets.
- ``position`` "top-left", ``phase`` 1: where the patch goes and the phase of
  its black/white checkerboard. The defaults differ from every built-in
  attack's trigger (BadNets: bottom-right, phase 0; BadMerging: an optimised
  patch): the defender knows none of them. Reconstructed.

``Merged.info`` carries the merger's own info under ``merger``, λ_IBVS, the
defender's task, target and trigger, ‖BV_inj‖ and the injected model's own
ACC / ASR on its trigger (``injection``), so a cell shows whether the
injection took.
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import BoundMerger, Context, Cost, Defense, Merged, Param, PluginError, Sizes, StateDict
from mmbench.vectors import norm
from mmbench.triggers import POSITIONS, badnets_finetune, make_trigger


def subtract_backdoor_vector(weights: StateDict, backdoor_vector: StateDict, lam: float,
                             *, in_place: bool = False, keep: StateDict | None = None) -> StateDict:
    """θ − λ·BV in one pass per tensor (``torch.sub(θ, BV, alpha=λ)``); tensors the vector lacks are
    copied unchanged. Out of place (inputs untouched) unless ``in_place``: then each tensor of
    ``weights`` is overwritten (``θ.sub_(BV, alpha=λ)``) and returned, except where that is not
    safe: a tensor sharing memory with one of ``keep`` (e.g. a merger that returned θ_pre's own
    tensor), or whose dtype the subtraction would change, gets a new tensor instead."""
    import torch

    kept = {t.untyped_storage().data_ptr() for sd in (keep or {}, backdoor_vector)
            for t in sd.values() if isinstance(t, torch.Tensor)}
    out: StateDict = {}
    for k, v in weights.items():
        if k not in backdoor_vector:
            out[k] = v if in_place else v.clone()
        elif (in_place and v.untyped_storage().data_ptr() not in kept
              and torch.result_type(v, backdoor_vector[k]) == v.dtype
              and torch.broadcast_shapes(v.shape, backdoor_vector[k].shape) == v.shape):
            out[k] = v.sub_(backdoor_vector[k], alpha=lam)
        else:
            out[k] = torch.sub(v, backdoor_vector[k], alpha=lam)
    return out


def injection_vector(ctx: Context, params: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """BV_inj = θ_trig − θ_clean on the defender's task (cached: once per preset and seed)."""
    task = params["task"] or ctx.tasks[-1]
    if task not in ctx.tasks:
        raise PluginError(f"ibvs: task {task!r} is not a task of preset {ctx.preset.name!r} "
                          f"({', '.join(ctx.tasks)})")
    target = int(params["target_class"])
    stage = {"task": task, "target_class": target, "poison_rate": float(params["poison_rate"]),
             "patch_area": float(params["patch_area"]), "position": params["position"],
             "phase": int(params["phase"])}

    def compute() -> tuple[StateDict, dict[str, Any]]:
        trigger = make_trigger(ctx, task, stage["patch_area"], stage["position"], stage["phase"])
        clean = ctx.clean_finetune(task)
        triggered = badnets_finetune(ctx, task, target, trigger, stage["poison_rate"], desc="ibvs injection")
        vector = {k: triggered[k] - clean[k] for k in clean}
        info = {**stage, "patch_side": trigger.size, "norm": norm(vector),
                "injection": {"acc": ctx.accuracy(triggered, task),
                              "asr": ctx.attack_success_rate(triggered, task, trigger, target),
                              "clean_acc": ctx.accuracy(clean, task),
                              "clean_asr": ctx.attack_success_rate(clean, task, trigger, target)}}
        return vector, info
    return ctx.cached("ibvs.injection_vector", stage, compute,
                      label=f"{task}, {stage['position']}, target {target}")


class InjectionBackdoorVectorSubtraction(Defense):
    name = "ibvs"
    description = "IBVS: subtract the defender's own injected backdoor vector from the merge"
    params = {
        "lambda": Param(1.0, "float", min=0, help="λ_IBVS: scale of the subtracted injected backdoor vector"),
        "task": Param(None, "str", help="the defender's task; null → the preset's last task"),
        "target_class": Param(0, "int", min=0, help="the class the defender's trigger maps to, on its own task"),
        "poison_rate": Param(0.1, "float", min=0, max=1,
                             help="fraction of each training batch poisoned in the injection (as BadNets)"),
        "patch_area": Param(0.015625, "float", min=0, max=1, min_exclusive=True,
                            help="patch area as a fraction of the image (4×4 px at 32 px)"),
        "position": Param("top-left", "str", choices=POSITIONS, help="where the defender's patch goes"),
        "phase": Param(1, "int", choices=(0, 1), help="phase of the patch's black/white checkerboard"),
    }

    merges_own_inputs = True  # subtracts from the merge of the cell's own inputs

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        # one backdoored fine-tune of the defender's task per seed (cached, shared by every cell)
        train = sizes.finetune_images.get(params.get("task") or sizes.tasks[-1])
        return None if train is None else Cost(train_images=train, shared_by="seed")

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict], merger: BoundMerger,
               ctx: Context, params: dict[str, Any]) -> Merged:
        backdoor_vector, info = injection_vector(ctx, params)
        lam = float(params["lambda"])
        merged = merger(pretrained, task_vectors)
        # The merge is this call's own: the merger computed it for this call, or the harness
        # loaded it from the store as a fresh copy (merge stages are not kept in memory,
        # mmbench/execute.py), so subtract in place: no second model-sized buffer. A merger
        # may still hand back θ_pre's or a task vector's own tensors: those are not written.
        weights = subtract_backdoor_vector(merged.weights, backdoor_vector, lam, in_place=True,
                                           keep={**pretrained, **{f"{t}/{n}": v for t, tv in task_vectors.items()
                                                                  for n, v in tv.items()}})
        return Merged(weights,
                      {"merger": merged.info, "lambda": lam, "injection_vector": info})


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(InjectionBackdoorVectorSubtraction())
