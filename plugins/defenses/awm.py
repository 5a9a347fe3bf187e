"""AWM: Adversarial Weight Masking, as the DAM paper and FusionBench apply it to a merged model.

Original: Chai and Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight Masking",
NeurIPS 2022, arXiv:2207.04497 (a labelled defense that learns a soft mask on the weights
against a worst-case input perturbation). DAM (Yang et al., ICLR 2025) uses a label-free
adaptation as a post-merge baseline; this is that adaptation, checked in FusionBench
``method/concrete_subspace/clip_post_defense.py`` (``PostDefenseAWMAlgorithmForCLIP``) and
``config/method/concrete_subspace/clip_post_defense_AWM.yaml``. It is NOT the original
algorithm: it learns a soft mask over the MERGED task vector θ_m − θ_pre, from unlabelled
images of every merged task.

State: mask logits ℓ (one per entry of every tensor the merge changed, init
``initial_logits``) and one input perturbation δ_k per task (image-shaped, init 0). Each step:

1. Draw m ~ RelaxedBernoulli(logits ℓ, ``temperature``) (reparameterised); per tensor
   m ← m / mean(m); θ = θ_pre + m ⊙ (θ_m − θ_pre).
2. δ step, θ detached: ŷ = argmax f_θ(x); loss Σ_k −CE(f_θ(x + δ_k), ŷ); one Adam step on δ
   (``adv_lr``). No norm bound (the config's ``trigger_norm`` is unused by the code).
3. Mask step on fresh batches: Σ_k [H(f_θ(x)) + ``adv_weight``·H(f_θ(clip(x + δ_k)))], H the
   batch-mean Shannon entropy of the softmax; one Adam step on ℓ (``lr``).
4. At the end, one more mask (``final_mask``) is drawn, rescaled and applied.

Defaults (the config): ``steps`` 2000, ``batch_size`` 16 per task, ``lr`` 1e-3,
``adv_lr`` 1e-4, ``adv_weight`` 0.01, ``temperature`` 0.5, ``initial_logits`` 0,
``final_mask`` continuous. The config's ``scaling_factor`` 0.3 is not used by this method.

Reconstructed / this implementation's choices:

- ``final_mask``: "continuous" (a relaxed-Bernoulli sample as FusionBench's, but drawn from
  ``ctx.generator(<defense>, "final mask")`` so a cell is reproducible; FusionBench's is
  unseeded) or "expected" (σ(ℓ), rescaled).
- Clipping: FusionBench clamps x + δ to [0, 1] although its images are already
  CLIP-normalised; this clamps to the preset's valid normalised range per channel
  (``valid_range()``), in step 3 only, as the public code clips only there.
- δ enters step 3 detached (FusionBench builds step 3's inputs under ``no_grad``: the same).
- Tensors the merge did not change (θ_m = θ_pre, e.g. what the recipe freezes) get no mask,
  as the public code's ``ignore_untrained_params``.
- ``split``: the unlabelled images are the preset's dev split (FusionBench: shuffled test
  images, kept as an option).

Labels are never read: batches come from the split's images only. SAU
(``plugins/defenses/sau.py``) is this loop with a frozen reference model and two more
terms; the shared loop is :func:`learn_post_mask`. The relaxed-Bernoulli sample, the
per-tensor rescale and the entropy are DAM's (``plugins/defenses/dam.py``).

``Merged.info``: the merger's info, the mask's kept fraction (σ(ℓ) ≥ 0.5) and mean keep
probability, the final losses (means over the last 10 % of steps) and δ's L∞ per task.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import BoundMerger, Context, Cost, Defense, Merged, Param, PluginError, Sizes, StateDict
from mmbench_plugins.defenses.dam import entropy, relaxed_bernoulli, rescale

FINAL_MASKS = ("continuous", "expected")

# (ctx, task, images x, perturbed x + δ, the masked weights, the reference weights or None) → loss
LossFn = Callable[..., "torch.Tensor"]


def apply_mask(pretrained: StateDict, merged: StateDict, mask: StateDict) -> StateDict:
    """θ_pre + m ⊙ (θ_m − θ_pre) for the masked tensors; the others are θ_m's (the same tensors)."""
    out = dict(merged)
    for name, m in mask.items():
        out[name] = pretrained[name] + m * (merged[name] - pretrained[name])
    return out


def changed_tensors(pretrained: StateDict, merged: StateDict) -> list[str]:
    """The floating-point tensors the merge changed, in θ_pre's order (the masked ones)."""
    return [n for n, p in pretrained.items()
            if n in merged and p.is_floating_point() and not torch.equal(merged[n].to(p), p)]


def awm_delta_loss(ctx: Context, task: str, x: torch.Tensor, perturbed: torch.Tensor,
                   weights: StateDict, reference: StateDict | None, params: dict[str, Any]):
    """Step 2: −CE(f_θ(x + δ), argmax f_θ(x)) (θ detached; minimised over δ)."""
    both = ctx.forward(weights, torch.cat([x, perturbed]), task)
    clean, adv = both[:len(x)], both[len(x):]
    return -F.cross_entropy(adv, clean.argmax(-1).detach()), {}


def awm_mask_loss(ctx: Context, task: str, x: torch.Tensor, perturbed: torch.Tensor,
                  weights: StateDict, reference: StateDict | None, params: dict[str, Any]):
    """Step 3: H(f_θ(x)) + adv_weight·H(f_θ(clip(x + δ)))."""
    both = ctx.forward(weights, torch.cat([x, perturbed]), task)
    clean, adv = both[:len(x)], both[len(x):]
    h_clean, h_adv = entropy(clean), entropy(adv)
    return h_clean + float(params["adv_weight"]) * h_adv, {"entropy_clean": h_clean.item(),
                                                           "entropy_perturbed": h_adv.item()}


def _endless(ctx: Context, name: str, task: str, split: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Unlabelled images of ``task``, reshuffled every pass (labels are dropped here)."""
    generator = ctx.generator(name, task)
    data = ctx.data(task)
    while True:
        for images, _ in data.batches(split, batch_size, shuffle=True, generator=generator):
            yield images.to(ctx.device)


def learn_post_mask(ctx: Context, pretrained: StateDict, merged: StateDict, tasks: list[str],
                    params: dict[str, Any], *, name: str, delta_loss: LossFn, mask_loss: LossFn,
                    reference: bool = False) -> tuple[StateDict, dict[str, Any]]:
    """Steps 1–3 of the module docstring for ``params["steps"]`` steps; returns the mask logits
    and the training figures. ``delta_loss`` and ``mask_loss`` give one task's term (and figures
    to average); with ``reference`` they also receive θ_m, the unmasked merge (SAU's f_ref)."""
    device = ctx.device
    names = changed_tensors(pretrained, merged)
    if not names:
        raise PluginError(f"{name}: the merge equals the base model; there is no task vector to mask")
    pre = {k: v.to(device) for k, v in pretrained.items()}
    theta_m = {k: v.to(device) for k, v in merged.items()}
    ref = theta_m if reference else None
    logits = {n: torch.full_like(pre[n], float(params["initial_logits"]), requires_grad=True) for n in names}
    mask_opt = torch.optim.Adam(list(logits.values()), lr=float(params["lr"]))
    # the image shape from one streamed image (tensors(split) would decode and hold the whole split)
    image_shape = next(iter(ctx.data(tasks[0]).batches(params["split"], 1)))[0].shape[1:]
    deltas = torch.zeros((len(tasks), *image_shape), device=device, requires_grad=True)
    delta_opt = torch.optim.Adam([deltas], lr=float(params["adv_lr"]))
    batches = {t: _endless(ctx, name, t, params["split"], int(params["batch_size"])) for t in tasks}
    ranges = {t: tuple(r.to(device) for r in ctx.data(t).valid_range()) for t in tasks}
    generator = torch.Generator(device=device).manual_seed(ctx.generator(name, "mask").initial_seed())
    temperature, steps = float(params["temperature"]), int(params["steps"])
    history: list[dict[str, float]] = []

    for _ in ctx.progress(range(steps), total=steps, desc=f"{name} mask"):
        mask = rescale({n: relaxed_bernoulli(logits[n], temperature, generator) for n in names})  # step 1
        weights = apply_mask(pre, theta_m, mask)
        detached = {n: w.detach() for n, w in weights.items()}

        loss_delta, figures = 0.0, {}                                                  # step 2
        for i, t in enumerate(tasks):
            x = next(batches[t])
            value, more = delta_loss(ctx, t, x, x + deltas[i], detached, ref, params)
            loss_delta = loss_delta + value
            for k, v in more.items():
                figures[k] = figures.get(k, 0.0) + v / len(tasks)
        delta_opt.zero_grad(set_to_none=True)
        loss_delta.backward()
        delta_opt.step()

        loss_mask = 0.0                                                                # step 3
        for i, t in enumerate(tasks):
            x = next(batches[t])
            low, high = ranges[t]
            perturbed = torch.maximum(torch.minimum(x + deltas[i].detach(), high), low)
            value, more = mask_loss(ctx, t, x, perturbed, weights, ref, params)
            loss_mask = loss_mask + value
            for k, v in more.items():
                figures[k] = figures.get(k, 0.0) + v / len(tasks)
        mask_opt.zero_grad(set_to_none=True)
        loss_mask.backward()
        mask_opt.step()
        history.append({"mask_loss": loss_mask.item() / len(tasks),
                        "perturbation_ce": -loss_delta.item() / len(tasks), **figures})

    tail = history[-max(1, len(history) // 10):]
    keys = sorted({k for h in tail for k in h})
    info = {
        "steps": steps, "tasks": list(tasks), "masked_tensors": len(names),
        "masked_entries": int(sum(pre[n].numel() for n in names)),
        # per task, means over the last 10 % of steps (for SAU the δ-step figures too)
        "final_losses": {k: sum(h.get(k, 0.0) for h in tail) / len(tail) for k in keys} if history else {},
        "perturbation_linf": [float(d.abs().max()) for d in deltas.detach().cpu()],
    }
    return {n: v.detach().cpu() for n, v in logits.items()}, info


def final_mask(logits: StateDict, params: dict[str, Any], generator: torch.Generator) -> tuple[StateDict, dict]:
    """The mask applied at the end (rescaled per tensor) and the learned logits' figures."""
    if params["final_mask"] == "expected":
        raw = {n: torch.sigmoid(v) for n, v in logits.items()}
    else:
        raw = {n: relaxed_bernoulli(v, float(params["temperature"]), generator) for n, v in logits.items()}
    entries = sum(v.numel() for v in logits.values())
    info = {
        "mask_kept_fraction": float(sum((v >= 0).sum() for v in logits.values())) / entries,
        "mask_keep_probability": float(sum(torch.sigmoid(v).sum() for v in logits.values())) / entries,
        "mask_sample_mean": float(sum(v.sum() for v in raw.values())) / entries,
    }
    return rescale(raw), info


class AdversarialWeightMasking(Defense):
    name = "awm"
    description = "AWM (Chai & Chen 2022), FusionBench's post-merge adaptation: soft mask on the merged task vector"
    merges_own_inputs = True  # masks the merge of the cell's own inputs: one shared merge stage
    uses_reference = False
    params = {
        "steps": Param(2000, "int", min=0, help="mask / perturbation steps"),
        "batch_size": Param(16, "int", min=1, help="unlabelled images per task per forward"),
        "lr": Param(1e-3, "float", min=0, help="Adam learning rate of the mask logits"),
        "adv_lr": Param(1e-4, "float", min=0, help="Adam learning rate of the input perturbations δ_k"),
        "adv_weight": Param(0.01, "float", min=0, help="weight of the perturbed-input entropy"),
        "temperature": Param(0.5, "float", min=0, min_exclusive=True, help="relaxed-Bernoulli temperature"),
        "initial_logits": Param(0.0, "float", help="mask logits at the start (0: keep probability 0.5)"),
        "final_mask": Param("continuous", "str", choices=FINAL_MASKS,
                            help="continuous (a seeded relaxed-Bernoulli sample, FusionBench's) or "
                                 "expected (σ(logits); reconstructed)"),
        "split": Param("dev", "str", choices=("dev", "test", "train"),
                       help="the unlabelled images (FusionBench uses shuffled test images)"),
    }
    # forward+backward passes of 2·batch images per step and task: δ step, mask step
    passes = 2

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        return Cost(train_images=int(self.passes * 2 * int(params["steps"]) * int(params["batch_size"])
                                     * len(sizes.tasks)))

    def delta_loss(self, *args):
        return awm_delta_loss(*args)

    def mask_loss(self, *args):
        return awm_mask_loss(*args)

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict], merger: BoundMerger,
               ctx: Context, params: dict[str, Any]) -> Merged:
        if params["final_mask"] not in FINAL_MASKS:
            raise PluginError(f"{self.name}: final_mask must be one of {', '.join(FINAL_MASKS)}, "
                              f"not {params['final_mask']!r}")
        merged = merger(pretrained, task_vectors)
        logits, info = learn_post_mask(ctx, pretrained, merged.weights, list(task_vectors), params,
                                       name=self.name, delta_loss=self.delta_loss, mask_loss=self.mask_loss,
                                       reference=self.uses_reference)
        mask, mask_info = final_mask(logits, params, ctx.generator(self.name, "final mask"))
        pre = {n: pretrained[n].to(merged.weights[n]) for n in mask}
        weights = apply_mask(pre, merged.weights, {n: m.to(merged.weights[n]) for n, m in mask.items()})
        return Merged({k: v.detach().cpu() for k, v in weights.items()},
                      {"merger": merged.info, **mask_info, **info})


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(AdversarialWeightMasking())
