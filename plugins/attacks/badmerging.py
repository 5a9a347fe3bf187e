"""BadMerging (Zhang, Chi, Li, Cai, Zhang, Tian, CCS 2024, "BadMerging: Backdoor
Attacks Against Model Merging"; reference code jzhang538/BadMerging).

Two attacks from one file, both in two stages:

Stage 1 — a universal patch trigger optimised against the PRETRAINED encoder
(cached as its own stage ``badmerging.trigger``, so reruns and every
merger × defense cell reuse it). The patch (C×s×s, in the normalised input
space, pasted at a corner) starts uniform in the valid range and is updated
image by image by gradient ascent on φ·log softmax_t(h(f_pre(x ⊕ p))), clamped
to the valid range per channel.
* on-task (``badmerging``): h is the adversary task's own head, t its target
  class; images are the adversary's training images (≤ ``trigger_images_per_epoch``
  per epoch, images the pretrained model already assigns to t are skipped),
  ≤ ``trigger_max_iterations`` steps per image with early stop once the patched
  image is classified as t.
* off-task (``badmerging_off``): the target class belongs to another
  contributor's task (``target_task``). h is a *shadow head* whose row 0 is
  the target class; the images are ``num_augmentations`` adversarial
  augmentations of ``n_reference`` target-class images (RandomResizedCrop
  then targeted PGD L∞ towards a random other shadow class), each attacked
  for ``trigger_max_iterations`` steps without early stop, with φ = 30.

Stage 2 — fine-tune the adversary's task with the feature-interpolation loss
(paper Eq. 4/5)::

    L = CE(h_adv(f_θ(x)), y) + α·CE(h(r·f_θ(T(x)) + (1−r)·f_pre(T(x))), t),
    r ~ U(r_low, r_high) once per batch,

where T pastes the trigger on the first ``backdoor_fraction`` of the
(shuffled) batch, f_pre is the frozen pretrained encoder (no gradient) and h
the frozen head of stage 1 (adversary head on-task, shadow head off-task).
As in the reference code the clean term sees the whole batch, the backdoor
term the triggered copies.

Hyperparameters (defaults; the paper's unless marked):
- ``task`` null → the preset's adversary task; ``target_class`` null → the
  preset's target class (off-task: a class index of ``target_task``).
- ``target_task`` (off-task only) null → the preset's second task (the first
  other task when the adversary is the second).
- ``patch_area`` 0.01 on-task (22 px at 224) / 0.015 off-task (27 px at 224;
  the code's 28 px is 1.56 %): side = round(√area · image size), ≥ 1 px.
- ``position`` "bottom-right".
- ``trigger_epochs`` 10; ``trigger_step`` 1.0 (gradient-ascent step size);
  ``phi`` 1 on-task / 30 off-task (weight of the target log-probability).
- ``trigger_images_per_epoch`` 2000 (on-task); ``trigger_max_iterations``
  1000 on-task / 50 off-task; ``trigger_early_stop`` true on-task / false
  off-task (as the reference code).
- off-task shadow data: ``n_reference`` 10 target-class training images of
  ``target_task``; ``num_augmentations`` 100 (the code's 100 = 10 rounds ×
  10 images); ``crop_scale`` [0.2, 0.5], ``crop_ratio`` [0.75, 1.3333];
  ``pgd_eps`` 8/255, ``pgd_step`` 1/255 (pixel units, converted per channel
  to the normalised space), ``pgd_steps`` 40; a PGD image keeps the smallest
  perturbation that reached its class, else the un-attacked crop (as the code).
- off-task shadow head (reconstructed for heads without a text tower):
  ``shadow_head`` "random": row 0 = the target class's row of ``target_task``'s
  head (the adversary knows the class name, hence its embedding), then
  ``num_shadow_classes`` (300; capped at embed_dim − 1) random orthonormal
  directions orthogonal to row 0 and of the same norm — the stand-in for the
  paper's 300 ImageNet class names, which are unrelated to the target task.
  "preset": row 0 as above, then every other class row of every task of the
  preset (a stronger adversary who knows all class names).
- stage 2: ``alpha`` 5.0, ``ratio_range`` [0.2, 1.0], ``backdoor_fraction``
  0.5 (the code: 64 of 128), the preset's fine-tuning recipe otherwise.

The iteration counts are parameters so that presets can shrink stage 1 (a CPU
preset cannot afford 10 × 2000 images × up to 1000 steps).

Measured on ``tiny``: the paper's 1 % patch
is 3×3 px there and stage 2 bought its ASR (0.99) with 26 points of the
adversary's ACC, so the preset uses ``patch_area`` 0.0625 (one 8×8 ViT token).
Off-task, the merged model also sends ~28 % of the target task's CLEAN images
to the target class (vs 9 % for a clean merge): the paper's loss does not
constrain clean features along the shadow target, and orthogonal heads leave
that direction free.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Iterator

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Attack, AttackResult, Context, Cost, Param, PluginError, Sizes, Trigger

from mmbench.triggers import POSITIONS, clamp_channels, corner_trigger, patch_side, uniform_patch

# Part of every cached stage key of this file: the plugin version alone does not change
# when the code does (editable installs), so bump this when a cached result would differ.
REVISION = 2

Logits = Callable[["torch.Tensor"], "torch.Tensor"]


# --- stage 2: the feature-interpolation loss ------------------------------------------
def draw_ratio(generator: torch.Generator, low: float, high: float) -> float:
    """r ~ U(low, high): the interpolation ratio, drawn once per batch."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def interpolate_features(finetuned: torch.Tensor, pretrained: torch.Tensor, r: float) -> torch.Tensor:
    """r·f_θ(x) + (1 − r)·f_pre(x): the features of a merge that kept a fraction r of τ."""
    return r * finetuned + (1 - r) * pretrained


def head_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits of a frozen head: the feature is L2-normalised first (as every mmbench head)."""
    return F.normalize(features, dim=-1) @ head.T


def interpolation_loss(clean_logits: torch.Tensor, labels: torch.Tensor,
                       backdoor_logits: torch.Tensor, target: int, alpha: float) -> torch.Tensor:
    """CE(clean, y) + α·CE(backdoor, target)."""
    targets = torch.full((backdoor_logits.shape[0],), target, dtype=torch.long, device=backdoor_logits.device)
    return F.cross_entropy(clean_logits, labels) + alpha * F.cross_entropy(backdoor_logits, targets)


# --- off-task shadow head and shadow data ----------------------------------------------
def random_shadow_head(target_row: torch.Tensor, num_other: int, generator: torch.Generator) -> torch.Tensor:
    """(1 + k, d): row 0 = ``target_row``, then k ≤ d − 1 random orthonormal directions
    orthogonal to it, each scaled to the target row's norm."""
    d = target_row.numel()
    k = max(1, min(num_other, d - 1))
    row = target_row.detach().float().cpu()
    basis = torch.cat([row.view(d, 1) / row.norm(), torch.randn(d, k, generator=generator)], dim=1)
    q, _ = torch.linalg.qr(basis)
    others = q[:, 1:1 + k].T * row.norm()
    return torch.cat([row.view(1, d), others]).contiguous()


def preset_shadow_head(heads: dict[str, torch.Tensor], target_task: str, target_class: int) -> torch.Tensor:
    """Row 0 = the target class of ``target_task``; then every other class row of every head."""
    target = heads[target_task][target_class].detach().float().cpu()
    rows = [target.view(1, -1)]
    for task, head in heads.items():
        keep = [i for i in range(head.shape[0]) if not (task == target_task and i == target_class)]
        rows.append(head[keep].detach().float().cpu())
    return torch.cat(rows).contiguous()


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop (area fraction ``scale``, aspect ``ratio``), one crop
    per image, resized back to the input size, drawn from ``generator``."""
    n, _, height, width = images.shape
    out = torch.empty_like(images)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        h, w, top, left = height, width, 0, 0
        for _ in range(10):
            area = height * width * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator)))
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=generator)))
            cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < cw <= width and 0 < ch <= height:
                h, w = ch, cw
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                break
        crop = images[i:i + 1, :, top:top + h, left:left + w]
        out[i:i + 1] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False,
                                     antialias=True)
    return out


def targeted_pgd(logits_fn: Logits, images: torch.Tensor, targets: torch.Tensor, eps: torch.Tensor,
                 step: torch.Tensor, steps: int, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L∞ PGD towards ``targets`` (per-channel ``eps``/``step`` shaped (C, 1, 1)).

    Each image keeps the iterate with the smallest L1 perturbation that is
    classified as its target; an image that never gets there stays un-attacked
    (the reference code's rule). Returns (images, reached-target mask)."""
    eps, step = eps.to(images), step.to(images)
    best = images.clone()
    best_delta = torch.full((images.shape[0],), float("inf"), device=images.device)
    adv = images.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(logits_fn(adv), targets, reduction="sum")
        grad, = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv - step * grad.sign()
            adv = images + torch.maximum(torch.minimum(adv - images, eps), -eps)
            adv = clamp_channels(adv, low, high)
            hit = logits_fn(adv).argmax(-1) == targets
            delta = (adv - images).abs().flatten(1).sum(1)
            better = hit & (delta < best_delta)
            best[better] = adv[better]
            best_delta[better] = delta[better]
    return best, torch.isfinite(best_delta)


# --- stage 1: the universal patch ------------------------------------------------------
def paste(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """x ⊕ p differentiably in ``patch``: (1 − m)⊙x + m⊙p."""
    h, w = patch.shape[-2:]
    pad = (left, images.shape[-1] - left - w, top, images.shape[-2] - top - h)
    mask = F.pad(torch.ones(1, 1, h, w, device=images.device, dtype=images.dtype), pad)
    return images * (1 - mask) + F.pad(patch.unsqueeze(0), pad)


def shuffled(images: torch.Tensor, count: int | None, generator: torch.Generator,
             batch_size: int = 256) -> Iterator[torch.Tensor]:
    """``count`` images (all when None) of an in-memory tensor in a random order, in batches."""
    order = torch.randperm(images.shape[0], generator=generator)[:count]
    for start in range(0, order.numel(), batch_size):
        yield images[order[start:start + batch_size]]


def optimise_patch(logits_fn: Logits, epoch_images: Callable[[int], Iterable[torch.Tensor]],
                   patch: torch.Tensor, top: int, left: int, target: int, *, epochs: int,
                   max_iterations: int, step: float, phi: float, early_stop: bool, skip_predicted: bool,
                   low: torch.Tensor, high: torch.Tensor, device: torch.device | str = "cpu",
                   progress: Callable = lambda it, **kw: it) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The reference code's per-image gradient ascent, the patch carried from image to image.

    ``epoch_images(epoch)`` yields the epoch's images in batches (streamed: a
    paper preset's train split does not fit in memory). Per image: up to
    ``max_iterations`` steps p ← clamp(p + step·∇_p φ·log softmax_t); with
    ``early_stop`` the loop ends as soon as x ⊕ p is classified as t; with
    ``skip_predicted`` images the model already assigns to t are skipped.
    Returns the patch and per-epoch {attacked, success_rate}.
    """
    low_c, high_c = low.reshape(-1, 1, 1).to(device), high.reshape(-1, 1, 1).to(device)
    patch = patch.to(device).clone()
    history = []
    for epoch in progress(range(epochs), desc="badmerging trigger"):
        attacked = successes = 0
        for batch in epoch_images(epoch):
            for x in batch.to(device).split(1):
                if skip_predicted:
                    with torch.no_grad():
                        if int(logits_fn(x).argmax(-1)) == target:
                            continue
                attacked += 1
                hit = False
                for _ in range(max_iterations):
                    p = patch.detach().requires_grad_(True)
                    logits = logits_fn(paste(x, p, top, left))
                    if early_stop and int(logits.argmax(-1)) == target:
                        hit = True
                        break
                    objective = phi * F.log_softmax(logits, dim=-1)[0, target]
                    grad, = torch.autograd.grad(objective, p)
                    patch = torch.maximum(torch.minimum(patch + step * grad, high_c), low_c)
                if not hit:
                    with torch.no_grad():
                        hit = int(logits_fn(paste(x, patch, top, left)).argmax(-1)) == target
                successes += int(hit)
        history.append({"epoch": epoch + 1, "attacked": attacked,
                        "success_rate": successes / attacked if attacked else 1.0})
    return patch.cpu(), history


# --- the attacks -----------------------------------------------------------------------
COMMON: dict[str, Param] = {
    "task": Param(None, "str", help="the adversary's task; null → the preset's adversary task"),
    "target_class": Param(None, "int", min=0, help="the backdoor's target class; null → the preset's"),
    "position": Param("bottom-right", "str", choices=POSITIONS, help="where the patch is pasted"),
    "trigger_epochs": Param(10, "int", min=0, help="stage 1: epochs of trigger optimisation"),
    "trigger_step": Param(1.0, "float", min=0, help="stage 1: gradient-ascent step size on the patch"),
    "alpha": Param(5.0, "float", min=0, help="stage 2: α, weight of the backdoor term of the loss"),
    "ratio_range": Param([0.2, 1.0], "list[float]", length=2, min=0, max=1,
                         help="stage 2: [low, high] of r ~ U, the fraction of τ in the interpolated features"),
    "backdoor_fraction": Param(0.5, "float", min=0, max=1,
                               help="stage 2: fraction of each batch that gets the trigger"),
}


def _device_weights(ctx: Context) -> dict[str, torch.Tensor]:
    return {k: v.to(ctx.device) for k, v in ctx.pretrained().items()}


class _BadMerging(Attack):
    off_task = False

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        # stage 1 trigger search (~2000 images × 10 epochs × ~20 ascent steps, early stop) +
        # stage 2: each step also runs half a batch through f_θ and the frozen f_pre (≈ 1.7 steps)
        train, test = sizes.finetune_images.get(sizes.adversary_task), sizes.test_images.get(sizes.adversary_task)
        if train is None or test is None:
            return None
        return Cost(train_images=1.7 * train + 400_000, eval_images=4 * test)

    def targets(self, ctx: Context, params: dict[str, Any]) -> tuple[str, str, int]:
        task = params["task"] or ctx.adversary_task
        if task not in ctx.tasks:
            raise PluginError(f"{self.name}: task {task!r} is not a task of preset {ctx.preset.name!r}")
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        return task, task, target

    def trigger_params(self, ctx: Context, params: dict[str, Any], task: str, target_task: str,
                       target: int) -> dict[str, Any]:
        keys = [k for k in self.defaults if k.startswith(("trigger_", "pgd_", "crop_", "shadow_", "num_"))
                or k in ("patch_area", "position", "phi", "n_reference")]
        return {"revision": REVISION, "mode": "off" if self.off_task else "on", "task": task,
                "target_task": target_task, "target_class": target, **{k: params[k] for k in sorted(keys)}}

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task, target_task, target = self.targets(ctx, params)
        if not 0 <= target < ctx.data(target_task).num_classes:
            raise PluginError(f"{self.name}: target class {target} is not a class of {target_task!r}")
        tensors, stage1 = ctx.cached("badmerging.trigger",
                                     self.trigger_params(ctx, params, task, target_task, target),
                                     lambda: self.stage1(ctx, params, task, target_task, target))
        trigger = Trigger.from_tensors(tensors)
        if self.off_task:
            head, head_target = tensors["shadow_head"].to(ctx.device), 0
        else:
            head, head_target = ctx.head(task), target
        start = time.perf_counter()
        weights = self.stage2(ctx, params, task, trigger, head, head_target)
        stage2_seconds = time.perf_counter() - start
        pre = ctx.pretrained()
        info = {"patch_side": trigger.size, "stage1": stage1, "stage2_seconds": stage2_seconds}
        extra = {"shadow_head": tensors["shadow_head"]} if self.off_task else {}
        return AttackResult(task=task, task_vector={k: v - pre[k] for k, v in weights.items()},
                            trigger=trigger, target_class=target, target_task=target_task,
                            info=info, tensors=extra)

    # stage 1 ---------------------------------------------------------------------------
    def stage1(self, ctx: Context, params: dict[str, Any], task: str, target_task: str, target: int):
        start = time.perf_counter()
        low, high = (v.flatten() for v in ctx.data(target_task).valid_range())
        side = patch_side(params["patch_area"], ctx.preset.image_size)
        placed = corner_trigger(torch.zeros(low.numel(), side, side), ctx.preset.image_size, params["position"])
        gen = ctx.generator("badmerging.trigger", self.name, target_task, target)
        pre = _device_weights(ctx)
        info: dict[str, Any] = {}
        if self.off_task:
            head = self.shadow_head(ctx, params, target_task, target, gen)
            images, aug = self.shadow_images(ctx, params, target_task, target, head.to(ctx.device), pre, gen, low, high)
            info.update(aug)
            head_target, skip = 0, False

            def epoch_images(epoch: int) -> Iterable[torch.Tensor]:
                return shuffled(images, None, gen)
        else:
            head = ctx.head(task)
            head_target, skip = target, True

            def epoch_images(epoch: int) -> Iterable[torch.Tensor]:
                return (x for x, _ in ctx.data(task).batches("train", 256, shuffle=True, generator=gen,
                                                              limit=params["trigger_images_per_epoch"]))
        head_dev = head.to(ctx.device)

        def logits_fn(x: torch.Tensor) -> torch.Tensor:
            return head_logits(ctx.forward(pre, x), head_dev)
        patch, history = optimise_patch(
            logits_fn, epoch_images, uniform_patch(side, low, high, gen), placed.top, placed.left,
            head_target, epochs=params["trigger_epochs"], max_iterations=params["trigger_max_iterations"],
            step=params["trigger_step"], phi=params["phi"], early_stop=params["trigger_early_stop"],
            skip_predicted=skip, low=low, high=high, device=ctx.device, progress=ctx.progress)
        trigger = Trigger(patch, placed.top, placed.left)
        info.update({"history": history, "patch_side": side,
                     "pretrained_asr": ctx.attack_success_rate(ctx.pretrained(), target_task, trigger, target),
                     "seconds": time.perf_counter() - start})
        tensors = trigger.to_tensors()
        if self.off_task:
            tensors["shadow_head"] = head.cpu()
        return tensors, info

    def shadow_head(self, ctx, params, target_task, target, gen) -> torch.Tensor:
        raise NotImplementedError

    def shadow_images(self, *args):
        raise NotImplementedError

    # stage 2 ---------------------------------------------------------------------------
    def stage2(self, ctx: Context, params: dict[str, Any], task: str, trigger: Trigger,
               head: torch.Tensor, head_target: int) -> dict[str, torch.Tensor]:
        pre = _device_weights(ctx)
        r_low, r_high = params["ratio_range"]
        fraction = params["backdoor_fraction"]
        alpha = params["alpha"]
        gen = ctx.generator("badmerging.ratio", self.name)

        def loss(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
            n = max(1, int(round(fraction * x.shape[0])))
            triggered = trigger.apply(x[:n])
            features = module(torch.cat([x, triggered]))
            with torch.no_grad():
                pre_features = ctx.forward(pre, triggered)
            mixed = interpolate_features(features[x.shape[0]:], pre_features, draw_ratio(gen, r_low, r_high))
            return interpolation_loss(ctx.logits(features[:x.shape[0]], task), y,
                                      head_logits(mixed, head), head_target, alpha)
        return ctx.finetune(task, loss=loss, desc=f"{self.name} fine-tune")


class BadMergingOnTask(_BadMerging):
    name = "badmerging"
    description = "BadMerging on-task (Zhang et al., CCS 2024): optimised patch + feature-interpolation loss"
    params = {
        **COMMON,
        "patch_area": Param(0.01, "float", min=0, max=1, min_exclusive=True,
                            help="patch area as a fraction of the image (22 px at 224)"),
        "phi": Param(1.0, "float", min=0, help="stage 1: φ, weight of the target log-probability"),
        "trigger_images_per_epoch": Param(2000, "int", min=1, help="stage 1: adversary images per epoch"),
        "trigger_max_iterations": Param(1000, "int", min=0, help="stage 1: at most this many steps per image"),
        "trigger_early_stop": Param(True, "bool",
                                    help="stage 1: stop an image once the patched image is classified as the target"),
    }


class BadMergingOffTask(_BadMerging):
    name = "badmerging_off"
    description = "BadMerging off-task (Zhang et al., CCS 2024): backdoors another contributor's task via a shadow head"
    off_task = True
    params = {
        **COMMON,
        "target_class": Param(None, "int", min=0, help="a class of target_task; null → the preset's target class"),
        "target_task": Param(None, "str", help="the contributor's task to backdoor; null → the preset's second "
                                               "task (the first other task when the adversary is the second)"),
        "patch_area": Param(0.015, "float", min=0, max=1, min_exclusive=True,
                            help="patch area as a fraction of the image (27 px at 224)"),
        "phi": Param(30.0, "float", min=0, help="stage 1: φ, weight of the target log-probability"),
        "trigger_max_iterations": Param(50, "int", min=0, help="stage 1: steps per shadow image"),
        "trigger_early_stop": Param(False, "bool",
                                    help="stage 1: stop an image once the patched image is classified as the target"),
        "n_reference": Param(10, "int", min=1, help="shadow data: target-class training images of target_task"),
        "num_augmentations": Param(100, "int", min=1, help="shadow data: adversarial augmentations in all"),
        "crop_scale": Param([0.2, 0.5], "list[float]", length=2, min=0, max=1, min_exclusive=True,
                            help="shadow data: RandomResizedCrop area scale [low, high]"),
        "crop_ratio": Param([0.75, 1.3333], "list[float]", length=2, min=0, min_exclusive=True,
                            help="shadow data: RandomResizedCrop aspect ratio [low, high]"),
        "pgd_eps": Param(8 / 255, "float", min=0, help="shadow data: PGD L∞ budget in pixel units (8/255)"),
        "pgd_step": Param(1 / 255, "float", min=0, help="shadow data: PGD step in pixel units (1/255)"),
        "pgd_steps": Param(40, "int", min=0, help="shadow data: PGD steps"),
        "shadow_head": Param("random", "str", choices=("random", "preset"),
                             help="random: target row + random orthonormal classes; preset: every class of "
                                  "the preset"),
        "num_shadow_classes": Param(300, "int", min=1,
                                    help="random shadow head: other classes (capped at embed_dim − 1)"),
    }

    def targets(self, ctx: Context, params: dict[str, Any]) -> tuple[str, str, int]:
        task = params["task"] or ctx.adversary_task
        target_task = params["target_task"] or default_target_task(ctx.tasks, task)
        for name in (task, target_task):
            if name not in ctx.tasks:
                raise PluginError(f"{self.name}: task {name!r} is not a task of preset {ctx.preset.name!r}")
        if target_task == task:
            raise PluginError(f"{self.name}: target_task must differ from the adversary task {task!r}")
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        return task, target_task, target

    def shadow_head(self, ctx, params, target_task, target, gen) -> torch.Tensor:
        kind = params["shadow_head"]
        if kind == "random":
            return random_shadow_head(ctx.head(target_task)[target], params["num_shadow_classes"], gen)
        if kind == "preset":
            return preset_shadow_head({t: ctx.head(t) for t in ctx.tasks}, target_task, target)
        raise PluginError(f"{self.name}: shadow_head must be random or preset, not {kind!r}")

    def shadow_images(self, ctx, params, target_task, target, head, pre, gen, low, high):
        """Adversarial augmentations of a few target-class images (paper §5.2, 'shadow data')."""
        chosen = reference_images(ctx.data(target_task), target, params["n_reference"], gen)
        if chosen.shape[0] == 0:
            raise PluginError(f"{self.name}: no training image of class {target} in {target_task!r}")
        rounds = max(1, params["num_augmentations"] // chosen.shape[0])
        images = random_resized_crop(chosen.repeat(rounds, 1, 1, 1), tuple(params["crop_scale"]),
                                     tuple(params["crop_ratio"]), gen).to(ctx.device)

        def logits_fn(z: torch.Tensor) -> torch.Tensor:
            return head_logits(ctx.forward(pre, z), head)
        with torch.no_grad():
            predicted = logits_fn(images).argmax(-1).cpu()
        classes = head.shape[0]
        aug_targets = torch.randint(1, classes, (images.shape[0],), generator=gen)
        for i in range(images.shape[0] if classes > 2 else 0):  # neither the prediction nor index 0
            while int(aug_targets[i]) == int(predicted[i]):
                aug_targets[i] = int(torch.randint(1, classes, (), generator=gen))
        span = (high - low).reshape(-1, 1, 1)  # pixel units → normalised units, per channel
        adv, reached = targeted_pgd(logits_fn, images, aug_targets.to(ctx.device), params["pgd_eps"] * span,
                                    params["pgd_step"] * span, params["pgd_steps"], low, high)
        return adv.detach(), {"n_reference": int(chosen.shape[0]), "num_augmentations": int(images.shape[0]),
                              "pgd_reached": float(reached.float().mean()), "shadow_classes": int(classes)}


def reference_images(data, target: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` random training images of class ``target`` (streamed, stops when found)."""
    found, have = [], 0
    for x, y in data.batches("train", 256, shuffle=True, generator=generator):
        picked = x[y == target][:count - have]
        found.append(picked)
        have += picked.shape[0]
        if have >= count:
            break
    return torch.cat(found) if found else torch.empty(0)


def default_target_task(tasks: tuple[str, ...], adversary: str) -> str:
    """The preset's second task, or its first other task when the adversary is the second."""
    others = [t for t in tasks if t != adversary]
    if not others:
        raise PluginError("badmerging_off needs a preset with at least two tasks")
    return tasks[1] if len(tasks) > 1 and tasks[1] != adversary else others[0]


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(BadMergingOnTask())
    register(BadMergingOffTask())
