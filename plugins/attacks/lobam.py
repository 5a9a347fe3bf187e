"""LoBAM (Yin et al., 2024, "LoBAM: LoRA-Based Backdoor Attack on Model Merging",
arXiv 2411.16746). RECONSTRUCTED: no public code was found and only the abstract
and secondary summaries could be read; every step below is mmbench's
reconstruction, each detail a parameter.

What the paper states: the attacker can afford only LoRA fine-tuning. A
merge-aware backdoor (BadMerging) trained with LoRA keeps only ~30–58 % ASR
after merging, because a low-rank update is too weak to survive the dilution of
the merge. LoBAM amplifies the malicious part of the update, reaches > 98 % ASR,
and picks the amplification factor to trade strength against stealth. Its
formula begins θ_upload = λ(θ_mal …; the rest could not be read.

Reconstruction:

1. From θ_pre, LoRA-fine-tune two models on the adversary task, with the same
   data order, the same LoRA initialisation and the preset's recipe otherwise:
   θ_ben on clean data (cross-entropy), θ_mal with BadMerging's on-task
   objective (its optimised patch, cached as stage ``badmerging.trigger`` with
   the very search and random stream of the ``badmerging`` attack, and its
   feature-interpolation loss; ``mmbench_plugins.attacks.badmerging``). λ = 1 is
   therefore "LoRA-BadMerging", the paper's weak baseline.
2. Upload τ_up = τ_ben + λ(τ_mal − τ_ben), λ ≥ 1. Both runs learn the clean
   task; the difference cancels that shared part, so scaling it amplifies
   mainly the backdoor direction.
3. λ (``lam`` null): the largest value of ``lam_grid`` for which θ_pre + τ_up
   keeps the adversary task's clean ACC on its DEV split within
   ``acc_tolerance`` of θ_ben's, and ‖τ_up‖ stays at most the largest norm of
   the preset's clean (full fine-tune) task vectors (``norm_bound``
   "max_clean"; the attacker sees what honest uploads look like). Only what the
   attacker has: its own dev data, its own models, public norms; no ASR and no
   test split. λ = the grid's smallest value when none qualifies. ``lam`` fixes λ.

LoRA (reconstructed, as ALGORITHMS-2): W = W_0 + (α/r)·B·A on every weight whose
name ends with one of ``lora_targets`` (attention in_proj and out_proj, MLP c_fc
and c_proj of every block). open_clip's in_proj is a bare parameter, so the
update is applied to the weights directly (``functional_call``), not through
``nn.Linear`` wrappers. A ~ Kaiming-uniform (bound 1/√in, as PEFT), B = 0.
AdamW over A and B with the recipe's weight decay, schedule, batch size, epochs
and gradient clipping.

Hyperparameters (defaults):
- ``task`` / ``target_class``: null → the preset's adversary task and target.
- BadMerging's trigger search and loss, with BadMerging on-task's defaults:
  ``patch_area`` 0.01, ``position``, ``trigger_epochs`` 10, ``trigger_step`` 1,
  ``phi`` 1, ``trigger_images_per_epoch`` 2000, ``trigger_max_iterations`` 1000,
  ``trigger_early_stop`` true; ``alpha`` 5, ``ratio_range`` [0.2, 1.0],
  ``backdoor_fraction`` 0.5.
- ``rank`` 16, ``lora_alpha`` 32 (scale α/r = 2) (reconstructed).
- ``lr`` null → 10 × the preset recipe's lr (1e-4 where full fine-tuning uses
  the papers' 1e-5: ALGORITHMS-2's LoRA lr, kept as a ratio) (reconstructed).
- ``lam`` null → the rule above; ``lam_grid`` [1, 2, …, 10];
  ``acc_tolerance`` 0.02; ``norm_bound`` "max_clean" | "none".

Open questions (flagged, not settled): whether the paper's base is θ_ben,
θ_mal or θ_pre, and its exact rule for λ.

``info`` records, per λ of the grid, the dev ACC and ‖τ_up‖ the rule saw, the
chosen λ and why, and the LoRA runs' final losses.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Attack, AttackResult, Context, Cost, Param, PluginError, Sizes, StateDict, Trigger

from mmbench_plugins.attacks.badmerging import (COMMON, BadMergingOnTask, draw_ratio, head_logits,
                                                interpolate_features, interpolation_loss)

LORA_TARGETS = ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]

# the trigger parameters handed to BadMerging's stage 1 (its declaration, on-task)
_TRIGGER = BadMergingOnTask()


def lora_targets(pretrained: StateDict, suffixes: list[str]) -> list[str]:
    """The 2-D weights whose names end with one of ``suffixes`` (in state-dict order)."""
    return [k for k, v in pretrained.items() if v.ndim == 2 and any(k.endswith(s) for s in suffixes)]


def init_lora(pretrained: StateDict, names: list[str], rank: int,
              generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight (out × in): A (r × in) ~ U(−1/√in, 1/√in) (PEFT's Kaiming-uniform, a = √5), B (out × r) = 0."""
    factors = {}
    for name in names:
        out_features, in_features = pretrained[name].shape
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        factors[name] = (a, torch.zeros(out_features, rank))
    return factors


def lora_delta(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> StateDict:
    """ΔW = scale · B·A per adapted weight."""
    return {name: scale * (b @ a) for name, (a, b) in factors.items()}


def upload(benign: StateDict, malicious: StateDict, lam: float) -> StateDict:
    """τ_up = τ_ben + λ(τ_mal − τ_ben), tensor by tensor."""
    return {k: benign[k] + lam * (malicious[k] - benign[k]) for k in benign}


def vector_norm(vector: StateDict) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in vector.values()))


def choose_lambda(grid: list[float], dev_acc: dict[float, float], norms: dict[float, float],
                  benign_acc: float, tolerance: float, norm_limit: float | None) -> tuple[float, str]:
    """The largest λ of ``grid`` whose dev ACC ≥ benign − tolerance and whose norm ≤ the limit;
    the grid's smallest λ when none qualifies. Returns (λ, reason)."""
    ok = [lam for lam in grid
          if dev_acc[lam] >= benign_acc - tolerance - 1e-12 and (norm_limit is None or norms[lam] <= norm_limit)]
    if ok:
        return max(ok), "largest λ within the ACC tolerance and the norm bound"
    return min(grid), "no λ met the rule: the grid's smallest"


def lora_finetune(ctx: Context, task: str, loss_fn: Callable[[Callable, Any, Any, int], Any],
                  names: list[str], rank: int, lora_alpha: float, lr: float, desc: str) -> tuple[StateDict, dict]:
    """LoRA fine-tune of ``task`` from θ_pre; returns (ΔW per adapted weight on the CPU, info).

    ``loss_fn(features, x, y, step)``: ``features(images)`` are the encoder's features at
    the current weights θ_pre + ΔW (differentiable in A and B). Data order and A's
    initialisation come from fixed streams of the cell's seed, so the benign and the
    malicious run see the same batches from the same start."""
    from mmbench import train  # torch-importing: only when an attack runs

    recipe = ctx.preset.recipe
    spec = next(t for t in ctx.preset.tasks if t.name == task)
    epochs = spec.epochs if spec.epochs is not None else recipe.epochs
    data = ctx.data(task)
    n = data.size("train")
    steps_per_epoch = max(1, n // recipe.batch_size)
    steps = max(1, int(round(epochs * steps_per_epoch)))
    pre = {k: v.to(ctx.device) for k, v in ctx.pretrained().items()}
    factors = {k: (a.to(ctx.device).requires_grad_(True), b.to(ctx.device).requires_grad_(True))
               for k, (a, b) in init_lora(ctx.pretrained(), names, rank, ctx.generator("lobam.init")).items()}
    trainable = [t for pair in factors.values() for t in pair]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=recipe.weight_decay)
    sched = train.schedule(opt, dataclasses.replace(recipe, lr=lr), steps)
    order = ctx.generator("lobam.order")
    scale = lora_alpha / rank

    def batches():
        while True:
            for x, y in data.batches("train", recipe.batch_size, shuffle=True, generator=order):
                if x.shape[0] == recipe.batch_size or n < recipe.batch_size:
                    yield x, y
    stream = batches()
    losses = []
    for step in ctx.progress(range(steps), desc=desc):
        x, y = next(stream)
        x, y = x.to(ctx.device), y.to(ctx.device)
        weights = {**pre, **{k: pre[k] + d for k, d in lora_delta(factors, scale).items()}}
        with train.autocast(ctx.device):
            value = loss_fn(lambda images: ctx.forward(weights, images), x, y, step)
        losses.append(train.recipe_step(opt, sched, value, trainable, recipe.grad_clip))
    with torch.no_grad():
        delta = {k: v.detach().cpu() for k, v in lora_delta(factors, scale).items()}
    tail = losses[-max(1, len(losses) // 10):]
    return delta, {"steps": steps, "final_loss": sum(tail) / len(tail)}


class LoBAM(Attack):
    name = "lobam"
    description = "LoBAM (Yin et al., 2024; reconstructed): LoRA-only attacker amplifying τ_mal − τ_ben"
    params = {
        **{k: COMMON[k] for k in ("task", "target_class", "position", "trigger_epochs", "trigger_step",
                                  "alpha", "ratio_range", "backdoor_fraction")},
        **{k: BadMergingOnTask.params[k] for k in ("patch_area", "phi", "trigger_images_per_epoch",
                                                   "trigger_max_iterations", "trigger_early_stop")},
        "rank": Param(16, "int", min=1, help="LoRA rank r (reconstructed)"),
        "lora_alpha": Param(32.0, "float", min=0, min_exclusive=True,
                            help="LoRA α: the update is (α/r)·B·A (reconstructed)"),
        "lr": Param(None, "float", min=0, min_exclusive=True,
                    help="LoRA learning rate; null → 10 × the preset recipe's lr (reconstructed)"),
        "lora_targets": Param(LORA_TARGETS, "list[str]",
                              help="suffixes of the weights that get a LoRA update"),
        "lam": Param(None, "float", min=0, help="amplification λ; null → the rule (largest λ of lam_grid "
                                               "within acc_tolerance and the norm bound)"),
        "lam_grid": Param([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], "list[float]", min=0,
                          help="the λ the rule considers"),
        "acc_tolerance": Param(0.02, "float", min=0, max=1,
                               help="the rule: dev ACC of θ_pre + τ_up at most this below θ_ben's"),
        "norm_bound": Param("max_clean", "str", choices=("max_clean", "none"),
                            help="the rule: ‖τ_up‖ ≤ the largest clean task vector's norm, or no bound"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        task = sizes.adversary_task
        train, test, dev = (sizes.finetune_images.get(task), sizes.test_images.get(task),
                            sizes.dev_images.get(task))
        if train is None or test is None or dev is None:
            return None
        # two LoRA fine-tunes (the malicious one 1.5 batches + a frozen pass), the trigger search
        # (BadMerging's estimate of it), λ on dev, ACC/ASR on test
        search = params["trigger_epochs"] * min(params["trigger_images_per_epoch"], train) * 20
        grid = len(params["lam_grid"]) if params["lam"] is None else 0
        return Cost(train_images=train + 2 * train + search, eval_images=(grid + 1) * dev + 4 * test,
                    note="2 LoRA fine-tunes + BadMerging's trigger search")

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task = params["task"] or ctx.adversary_task
        if task not in ctx.tasks:
            raise PluginError(f"lobam: task {task!r} is not a task of preset {ctx.preset.name!r}")
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        if not 0 <= target < ctx.data(task).num_classes:
            raise PluginError(f"lobam: target class {target} is not a class of {task!r}")
        pre = ctx.pretrained()
        names = lora_targets(pre, params["lora_targets"])
        if not names:
            raise PluginError(f"lobam: no 2-D weight of the encoder ends with any of {params['lora_targets']}")
        rank_limit = min(min(pre[k].shape) for k in names)
        if params["rank"] > rank_limit:
            raise PluginError(f"lobam: rank {params['rank']} exceeds the smallest adapted weight's "
                              f"dimension ({rank_limit})")
        lr = params["lr"] if params["lr"] is not None else 10 * ctx.preset.recipe.lr

        # BadMerging's trigger (stage 1), cached; the same search and stream as the badmerging attack
        trigger_params = {**_TRIGGER.defaults, **{k: params[k] for k in _TRIGGER.defaults if k in params}}
        tensors, stage1 = ctx.cached("badmerging.trigger",
                                     _TRIGGER.trigger_params(ctx, trigger_params, task, task, target),
                                     lambda: _TRIGGER.stage1(ctx, trigger_params, task, task, target))
        trigger = Trigger.from_tensors(tensors)
        head = ctx.head(task)
        pre_dev = {k: v.to(ctx.device) for k, v in pre.items()}
        r_low, r_high = params["ratio_range"]
        ratios = ctx.generator("lobam.ratio")

        def benign_loss(features, x, y, step):
            return F.cross_entropy(ctx.logits(features(x), task), y)

        def malicious_loss(features, x, y, step):  # BadMerging's feature-interpolation loss (Eq. 4/5)
            n = max(1, int(round(params["backdoor_fraction"] * x.shape[0])))
            triggered = trigger.apply(x[:n])
            out = features(torch.cat([x, triggered]))
            with torch.no_grad():
                pre_features = ctx.forward(pre_dev, triggered)
            mixed = interpolate_features(out[x.shape[0]:], pre_features, draw_ratio(ratios, r_low, r_high))
            return interpolation_loss(ctx.logits(out[:x.shape[0]], task), y, head_logits(mixed, head),
                                      target, params["alpha"])

        start = time.perf_counter()
        lora = (names, params["rank"], params["lora_alpha"], lr)
        benign, benign_info = lora_finetune(ctx, task, benign_loss, *lora, desc="lobam LoRA benign")
        malicious, malicious_info = lora_finetune(ctx, task, malicious_loss, *lora, desc="lobam LoRA malicious")
        train_seconds = time.perf_counter() - start

        full = {k: torch.zeros_like(v) for k, v in pre.items()}
        tau_ben = {**full, **benign}
        tau_mal = {**full, **malicious}
        benign_acc = ctx.accuracy({k: pre[k] + v for k, v in tau_ben.items()}, task, split="dev")
        grid = sorted(set(float(v) for v in params["lam_grid"]))
        if params["lam"] is not None:
            lam, reason, dev_acc, norms, limit = float(params["lam"]), "fixed by the lam parameter", {}, {}, None
        else:
            clean_norms = [vector_norm(ctx.task_vector(t)) for t in ctx.tasks]
            limit = max(clean_norms) if params["norm_bound"] == "max_clean" else None
            dev_acc, norms = {}, {}
            for value in grid:
                candidate = upload(tau_ben, tau_mal, value)
                norms[value] = vector_norm(candidate)
                dev_acc[value] = ctx.accuracy({k: pre[k] + v for k, v in candidate.items()}, task, split="dev")
            lam, reason = choose_lambda(grid, dev_acc, norms, benign_acc, params["acc_tolerance"], limit)
        task_vector = upload(tau_ben, tau_mal, lam)
        info = {
            "patch_side": trigger.size, "stage1": stage1, "lora_lr": lr, "lora_weights": len(names),
            "lam": lam, "lam_reason": reason, "norm_limit": limit, "benign_dev_acc": benign_acc,
            "rule": {str(v): {"dev_acc": dev_acc[v], "norm": norms[v]} for v in dev_acc},
            "norm_benign": vector_norm(tau_ben), "norm_malicious": vector_norm(tau_mal),
            "norm_upload": vector_norm(task_vector),
            "benign": benign_info, "malicious": malicious_info, "train_seconds": train_seconds,
        }
        return AttackResult(task=task, task_vector=task_vector, trigger=trigger, target_class=target, info=info)


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(LoBAM())
