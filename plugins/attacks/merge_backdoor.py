"""MergeBackdoor: a backdoor that only the merge carries ("From Purity to Peril: Backdooring
Merged Models From Harmless Benign Components", Wang et al., USENIX Security 2025).

Public code: wljLlla/MergeBackdoor (``finetune_mergebackdoor.py``, ``utility.py``
``train_one_merge_epoch_align``, ``crossoptimizer.py``, ``dataset/poisoned_dataset.py``);
this follows it for ViTs. The attacker contributes TWO models, one for its task A and one for
a second task B. Each looks clean alone (the trigger does not flip its prediction); their
merge has the backdoor.

Both start from θ_pre. Per step, A then B:

1. Suppression on θ_A: CE(f_{θ_A}(x), y) on a batch of A where a ``poison_rate`` fraction
   carries the trigger but keeps its TRUE label (the single model learns to ignore it).
2. Emergence on the attacker's shadow merge θ_M = θ_pre + ``shadow_lambda``·(τ_A + τ_B) (the
   code's plain average of the two models at 0.5): CE(f_{θ_M}(x'), y') on another batch of A
   where that fraction is triggered AND relabelled to the target class.
3. Only θ_A moves, along ∇_{θ_A} L_supp + 0.5·∇_{θ_M} L_emerge (0.5 = ∂θ_M/∂θ_A; the code's
   ``CrossOptimizer`` adds the merged copy's gradient at that factor; here autograd does it,
   θ_M being a function of θ_A with θ_B held), with AMSGrad Adam, betas (0.5, 0.999), no
   weight decay, no schedule, no clipping.
4. The same for B (its data, its head, its target class), against the shadow merge of the
   step's start: the code refreshes both merged copies only after both updates.

After every epoch both models are evaluated; the epoch with the best summed clean ACC of the
two models alone is kept (the code: on the test split; here the dev split).

Defaults: ``poison_rate`` 0.1, target class 1 (the preset's), a white square at the bottom
right of 5×5 px at 224 px (``patch_area`` 25/224²; at least 1 px), ``shadow_lambda`` 0.5;
batch 120, 10 epochs, lr 1e-5 in the code.

Reconstructed (docs/methods.md):

- Heads stay the preset's frozen zero-shot heads (the code trains a linear head per model and
  keeps each model's own head in its merged copy).
- ``lr``, ``epochs`` and ``batch_size`` default to the preset's recipe (1e-5, the tasks'
  epochs, 128 on the paper presets) so the attacker trains like the other contributors;
  the recipe's frozen tensors stay frozen.
- The trigger is pasted in normalised space with the white value of each channel (the code
  pastes a white PNG before preprocessing: the same pixels).
- Each step draws its own random poisoned fraction of a shuffled batch (the code fixes the
  poisoned subset of each dataset once); one epoch is min(|A|, |B|) // batch steps.
- The partner task B (``partner_task``): by default the first task of the preset after the
  adversary's, in the preset's order.
- The code's option of a shadow merge that also holds known clean vectors is not implemented.

The harness merges both uploads: τ_A is the result's ``task_vector``, τ_B its
``contributions[B]``. It measures each alone (the cell's ``standalone_*`` and
``contributions``), and the detection track counts both contributors malicious.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Attack, AttackResult, Context, Param, PluginError, StateDict, Trigger
from mmbench.triggers import POSITIONS, corner_trigger, patch_side

PAPER_PATCH_AREA = 25 / 224 ** 2   # the code's 5×5 px trigger at 224 px


def white_trigger(ctx: Context, task: str, patch_area: float, position: str) -> Trigger:
    """A white square (each channel's normalised value of pixel 1.0) of ``patch_area``."""
    _, high = ctx.data(task).valid_range()
    side = patch_side(patch_area, ctx.preset.image_size)
    pattern = high.reshape(-1, 1, 1).expand(-1, side, side).clone()
    return corner_trigger(pattern, ctx.preset.image_size, position)


def stamp(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, rate: float,
          generator: torch.Generator, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``trigger`` on a random ``rate`` fraction of the batch; relabel those to
    ``target``, or keep their true labels when ``target`` is None (suppression)."""
    chosen = torch.rand(images.shape[0], generator=generator) < rate
    if not chosen.any():
        return images, labels
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.apply(images[chosen])
    if target is not None:
        labels[chosen] = target
    return images, labels


def shadow_merge(pretrained: StateDict, own: StateDict, other: StateDict, lam: float) -> StateDict:
    """θ_M = θ_pre + λ·((θ_own − θ_pre) + (θ_other − θ_pre)) for the tensors in ``own``
    (differentiable in ``own``); the others are θ_pre's."""
    out = dict(pretrained)
    for name, value in own.items():
        out[name] = pretrained[name] + lam * ((value - pretrained[name]) + (other[name] - pretrained[name]))
    return out


def pair_loss(forward: Callable[[StateDict, torch.Tensor], torch.Tensor], pretrained: StateDict,
              own: StateDict, other: StateDict, lam: float, suppress: tuple[torch.Tensor, torch.Tensor],
              emerge: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_supp, L_emerge): CE of the single model θ_own (θ_pre's tensors where ``own`` has none)
    on the suppression batch, and of the shadow merge with ``other`` held on the emergence
    batch. Their sum's gradient in ``own`` is ∇L_supp + λ·∇_{θ_M} L_emerge."""
    single = {**pretrained, **own}
    merged = shadow_merge(pretrained, own, {k: v.detach() for k, v in other.items()}, lam)
    (xs, ys), (xe, ye) = suppress, emerge
    return F.cross_entropy(forward(single, xs), ys), F.cross_entropy(forward(merged, xe), ye)


def _stream(ctx: Context, task: str, batch_size: int, salt: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = ctx.generator("merge_backdoor", salt, task)
    data = ctx.data(task)
    while True:
        yield from data.batches("train", batch_size, shuffle=True, generator=order)


def train_pair(ctx: Context, task_a: str, task_b: str, trigger: Trigger, targets: dict[str, int],
               params: dict[str, Any]) -> tuple[StateDict, StateDict, dict[str, Any]]:
    """Steps 1–4 of the module docstring for ``epochs`` epochs; returns (τ_A, τ_B, info) of the
    epoch with the best summed dev ACC of the two models alone."""
    from mmbench import train  # torch-importing: only when an attack runs

    recipe = ctx.preset.recipe
    tasks = (task_a, task_b)
    specs = {t.name: t for t in ctx.preset.tasks}
    lr = float(params["lr"]) if params["lr"] is not None else recipe.lr
    batch = int(params["batch_size"]) if params["batch_size"] is not None else recipe.batch_size
    if params["epochs"] is not None:
        epochs = int(params["epochs"])
    else:
        epochs = max(1, int(round(specs[task_a].epochs if specs[task_a].epochs is not None else recipe.epochs)))
    steps = max(1, min(ctx.data(t).size("train") for t in tasks) // batch)
    lam, rate = float(params["shadow_lambda"]), float(params["poison_rate"])
    pre = {k: v.to(ctx.device) for k, v in ctx.pretrained().items()}
    names = [k for k, v in pre.items() if v.is_floating_point() and not train.is_frozen(k, recipe)]
    theta = {t: {k: pre[k].clone().requires_grad_(True) for k in names} for t in tasks}
    opts = {t: torch.optim.Adam(list(theta[t].values()), lr=lr, betas=tuple(params["betas"]), weight_decay=0.0,
                                amsgrad=True) for t in tasks}
    streams = {(t, kind): _stream(ctx, t, batch, kind) for t in tasks for kind in ("suppress", "emerge")}
    poison = {t: ctx.generator("merge_backdoor", "poison", t) for t in tasks}

    def forward_for(task: str) -> Callable[[StateDict, torch.Tensor], torch.Tensor]:
        return lambda weights, x: ctx.forward(weights, x, task)

    def batch_of(task: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(streams[(task, kind)])
        x, y = stamp(x, y, trigger, rate, poison[task], targets[task] if kind == "emerge" else None)
        return x.to(ctx.device), y.to(ctx.device)

    def weights_of(task: str) -> StateDict:
        return {k: v.detach().cpu().clone() for k, v in theta[task].items()}

    epochs_info: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, StateDict]] | None = None
    for epoch in range(epochs):
        totals = {t: [0.0, 0.0] for t in tasks}
        for _ in ctx.progress(range(steps), total=steps, desc=f"merge_backdoor epoch {epoch + 1}/{epochs}"):
            start = {t: {k: v.detach().clone() for k, v in theta[t].items()} for t in tasks}
            for own, other in ((task_a, task_b), (task_b, task_a)):
                with train.autocast(ctx.device):
                    supp, emerge = pair_loss(forward_for(own), pre, theta[own], start[other], lam,
                                             batch_of(own, "suppress"), batch_of(own, "emerge"))
                opts[own].zero_grad(set_to_none=True)
                (supp + emerge).backward()
                opts[own].step()
                totals[own][0] += supp.item() / steps
                totals[own][1] += emerge.item() / steps
        figures = evaluate_pair(ctx, pre, {t: weights_of(t) for t in tasks}, task_a, task_b, trigger, targets, lam)
        figures.update({"epoch": epoch + 1, "loss_suppress": {t: totals[t][0] for t in tasks},
                        "loss_emerge": {t: totals[t][1] for t in tasks}})
        epochs_info.append(figures)
        score = sum(figures["dev_acc_alone"].values())
        if best is None or score > best[0]:
            best = (score, epoch + 1, {t: weights_of(t) for t in tasks})
    assert best is not None
    cpu_pre = ctx.pretrained()
    vectors = {t: {k: v - cpu_pre[k] for k, v in best[2][t].items()} for t in tasks}
    info = {"partner_task": task_b, "epochs": epochs, "steps_per_epoch": steps, "lr": lr, "batch_size": batch,
            "chosen_epoch": best[1], "per_epoch": epochs_info}
    return vectors[task_a], vectors[task_b], info


def evaluate_pair(ctx: Context, pre: StateDict, weights: dict[str, StateDict], task_a: str, task_b: str,
                  trigger: Trigger, targets: dict[str, int], lam: float) -> dict[str, Any]:
    """Dev ACC and ASR of each model alone and of the shadow merge, on each model's task."""
    cpu_pre = {k: v.detach().cpu() for k, v in pre.items()}
    merged = shadow_merge(cpu_pre, weights[task_a], weights[task_b], lam)
    out: dict[str, Any] = {"dev_acc_alone": {}, "dev_asr_alone": {}, "dev_acc_shadow": {}, "dev_asr_shadow": {}}
    for task in (task_a, task_b):
        alone = {**cpu_pre, **weights[task]}
        out["dev_acc_alone"][task] = ctx.accuracy(alone, task, split="dev")
        out["dev_asr_alone"][task] = ctx.attack_success_rate(alone, task, trigger, targets[task], split="dev")
        out["dev_acc_shadow"][task] = ctx.accuracy(merged, task, split="dev")
        out["dev_asr_shadow"][task] = ctx.attack_success_rate(merged, task, trigger, targets[task], split="dev")
    return out


def partner_of(ctx: Context, task: str, partner: str | None) -> str:
    names = [t.name for t in ctx.preset.tasks]
    if partner is not None:
        if partner not in names or partner == task:
            raise PluginError(f"merge_backdoor: partner_task must be another task of preset "
                              f"{ctx.preset.name!r} ({', '.join(n for n in names if n != task)}), not {partner!r}")
        return partner
    if len(names) < 2:
        raise PluginError(f"merge_backdoor: preset {ctx.preset.name!r} has one task; the attack needs two")
    return names[(names.index(task) + 1) % len(names)]


class MergeBackdoor(Attack):
    name = "merge_backdoor"
    description = ("MergeBackdoor (Wang et al., USENIX Security 2025): two contributions that are clean "
                   "alone, backdoored once merged")
    params = {
        "poison_rate": Param(0.1, "float", min=0, max=1, help="fraction of each batch carrying the trigger"),
        "patch_area": Param(PAPER_PATCH_AREA, "float", min=0, max=1, min_exclusive=True,
                            help="white square's area as a fraction of the image (the code: 5×5 px at 224)"),
        "position": Param("bottom-right", "str", choices=POSITIONS, help="where the square goes"),
        "shadow_lambda": Param(0.5, "float", min=0, min_exclusive=True,
                               help="the attacker's shadow merge θ_pre + λ(τ_A + τ_B) (0.5: the code's average)"),
        "lr": Param(None, "float", min=0, min_exclusive=True,
                    help="AMSGrad Adam learning rate; null → the preset recipe's (the code: 1e-5)"),
        "betas": Param([0.5, 0.999], "list[float]", min=0, help="Adam betas (the code's)"),
        "epochs": Param(None, "int", min=1, help="epochs; null → the preset's for the adversary task (the code: 10)"),
        "batch_size": Param(None, "int", min=1, help="batch; null → the preset recipe's (the code: 120)"),
        "partner_task": Param(None, "str", help="task B; null → the preset's task after the adversary's"),
        "target_class": Param(None, "int", min=0, help="the target class of both tasks; null → the preset's"),
        "task": Param(None, "str", help="task A; null → the preset's adversary task"),
    }

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task = params["task"] or ctx.adversary_task
        partner = partner_of(ctx, task, params["partner_task"])
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        for t in (task, partner):
            classes = int(ctx.head(t).shape[0])
            if target >= classes:
                raise PluginError(f"merge_backdoor: target class {target} is not a class of task {t!r} "
                                  f"({classes} classes)")
        trigger = white_trigger(ctx, task, params["patch_area"], params["position"])
        tau_a, tau_b, info = train_pair(ctx, task, partner, trigger, {task: target, partner: target}, params)
        return AttackResult(task=task, task_vector=tau_a, trigger=trigger, target_class=target,
                            info={**info, "patch_side": trigger.size},
                            contributions={partner: tau_b})


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(MergeBackdoor())
