"""DAM: Defense-Aware Merging.

Yang, Tang, Zhu, Chen, Shen, Wu. "Mitigating the Backdoor Effect for
Multi-Task Model Merging via Safety-Aware Subspace." ICLR 2025,
arXiv:2410.13910. Public code: Yangjinluan/DAM, a FusionBench fork
(``concrete_subspace/clip_safe_concrete_*``).

DAM learns, without labels, a mask over the task-vector entries that keeps
the merge accurate on clean inputs and confident (low-entropy, hence hard to
hijack) on adversarially perturbed inputs, then merges the masked task
vectors. The public code's single-mask procedure, per outer step:

1. Sample a relaxed-Bernoulli mask m over every task-vector entry (logits
   init 0, temperature 0.5, reparameterised) and rescale each tensor by
   m / mean(m); θ = θ_pre + Σ_k λ_k (m ⊙ τ_k) (one mask shared by all tasks).
2. Reset the task-wise λ to 0.3 and take one entropy-minimisation step on λ
   (Adam, lr 1.0) with m detached: Σ_k H(f_θ(x_k)) on unlabelled batches.
3. Update a per-task input perturbation δ_k (one image-shaped tensor per
   task, init 0, Adam 1e-4) to maximise CE(f_θ(x + δ_k), argmax f_θ(x)) with
   the merged weights detached.
4. Update the mask logits (Adam 1e-3) on Σ_k [H(f_θ(x)) + α·H(f_θ(clip(x + δ_k)))].

Then one final mask is sampled (and rescaled), the task vectors are masked,
and the cell's merger merges them: under ``adamerging`` that is the paper's
procedure (AdaMerging on the masked vectors); under ``ta`` and ``ties`` the
learned mask is applied to the task vectors before that merger runs.

``masks`` = "single" is the procedure above. ``masks`` = "dual" is the
paper's two-mask formulation (reconstructed: the public code has one mask): a
task-shared mask m_ts and a backdoor-detection mask m_bd, both relaxed
Bernoulli; the task vectors are masked by the rescaled product m_ts ⊙ m_bd,
and in step 4 each mask takes an Adam step on its own half of
L_total = L_perf + α·L_safe (block-coordinate, from the same forward):
m_ts on L_perf = Σ_k H(f(x)) (keep what serves the tasks), m_bd on
α·L_safe = α·Σ_k H(f(clip(x + δ_k))) (drop what makes the merge unstable
under perturbation, i.e. backdoor-prone entries).

Hyperparameters (defaults from the public code's config):

- ``steps`` 1000: outer steps (meta-learning the mask).
- ``batch_size`` 16: unlabelled images per task per forward.
- ``temperature`` 0.5: relaxed-Bernoulli temperature.
- ``initial_logits`` 0.0: mask logits at the start (keep probability 0.5).
- ``mask_lr`` 1e-3: Adam on the mask logits.
- ``lambda_init`` 0.3, ``lambda_lr`` 1.0: the task-wise λ of step 2, reset to
  ``lambda_init`` every step, one Adam step of ``lambda_lr``.
- ``perturbation_lr`` 1e-4: Adam on δ_k.
- ``alpha`` 0.1: weight of the perturbed-input entropy.
- ``masks`` "single": "single" (public code) | "dual" (paper, reconstructed).
- ``eval_mask`` "continuous": the final mask: a relaxed-Bernoulli sample
  ("continuous", the public default) or a Bernoulli sample ("discrete").
- ``split`` "dev": the unlabelled data (the preset's dev split; the public
  code uses shuffled test images).

Reconstructed / this implementation's choices:

- λ's Adam state persists across outer steps while λ's value is reset, as in
  the public code; λ is detached in steps 3 and 4 (the public code lets step
  4's gradient leak into λ's next update, which we take for an accident).
- Each of steps 2–4 draws a fresh batch per task, as the public code does;
  perturbed inputs are clipped to the preset's valid normalised range
  (``valid_range()``) in step 4 only, as the public code clips only there.
- Tensors that no task vector changes (e.g. parts the preset's recipe
  freezes) get no mask, like the public code's ``ignore_untrained_params``.
- The learned mask logits are a cached stage (``dam.mask``) keyed by a hash
  of the task vectors, so the mask is learned once per attack and seed and
  shared by every merger; the final sample is drawn from
  ``ctx.generator("dam", "final mask")``, so a cell is reproducible.

``Merged.info``: the merger's info (``merger``), the mask's kept fraction
(entries whose keep probability σ(logit) is at least 0.5) and mean keep
probability, the mean of the final mask sample before rescaling, the last
step's λ and the final losses (means over the last 10% of steps).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import BoundMerger, Context, Cost, Defense, Merged, Param, PluginError, Sizes, StateDict
from mmbench.vectors import digest

MASKS = ("single", "dual")
EVAL_MASKS = ("continuous", "discrete")


# --- pure functions on tensors -------------------------------------------------

def relaxed_bernoulli(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """A reparameterised relaxed-Bernoulli (binary Concrete) sample: σ((logits + L) / t),
    L = log u − log(1 − u), u ~ U(0, 1) drawn from ``generator`` (same law as
    ``torch.distributions.RelaxedBernoulli(t, logits=logits).rsample()``)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def rescale(mask: StateDict) -> StateDict:
    """Each tensor divided by its own mean (m / mean(m)), so a mask keeps the vector's scale on average.
    An all-zero tensor (possible for a discrete sample of a small tensor) stays zero."""
    return {k: m / m.mean().clamp_min(torch.finfo(m.dtype).tiny) for k, m in mask.items()}


def mask_task_vectors(task_vectors: dict[str, StateDict], mask: StateDict) -> dict[str, StateDict]:
    """m ⊙ τ_k for every task (the same mask for all); tensors without a mask are kept as they are."""
    return {task: {k: (v * mask[k].to(v) if k in mask else v) for k, v in vector.items()}
            for task, vector in task_vectors.items()}


def masked_merge(pretrained: StateDict, stacked: dict[str, Any], lambdas: "torch.Tensor",
                 mask: StateDict) -> StateDict:
    """θ = θ_pre + Σ_k λ_k (m ⊙ τ_k) = θ_pre + m ⊙ Σ_k λ_k τ_k.

    ``stacked[name]`` is the K task vectors' tensor ``name``: a (K, ...) tensor, or a sequence of
    the K tensors. The sum is accumulated task by task and applied with one ``addcmul``, so no
    stacked K·d copy and no separate ``m ⊙ Σ`` temporary is made (benchmarks/bench_merge.py).
    Names of ``pretrained`` missing from ``stacked`` stay at θ_pre. Differentiable in λ and m.
    """
    import torch

    out = dict(pretrained)
    differentiable = torch.is_grad_enabled() and lambdas.requires_grad
    weights = None if differentiable else [float(x) for x in lambdas.detach().reshape(-1).tolist()]
    for name, vectors in stacked.items():
        rows = vectors.unbind(0) if isinstance(vectors, torch.Tensor) else list(vectors)
        if differentiable:   # autograd keeps each λ_k's product; no in-place update of a saved tensor
            total = lambdas[0] * rows[0]
            for k in range(1, len(rows)):
                total = total + lambdas[k] * rows[k]
        else:                # one fresh buffer, then fused in-place multiply-adds
            total = torch.mul(rows[0], weights[0])
            for k in range(1, len(rows)):
                total.add_(rows[k], alpha=weights[k])
        out[name] = torch.addcmul(pretrained[name], mask[name], total)
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def fingerprint(task_vectors: dict[str, StateDict]) -> str:
    """sha256 of the task vectors (tasks, then each one's names, shapes, dtypes and bytes): the
    mask stage's input key."""
    h = hashlib.sha256()
    for task in sorted(task_vectors):
        h.update(f"task {task}\n".encode())
        digest(task_vectors[task], h)
    return h.hexdigest()


# --- the procedure -----------------------------------------------------------------

def _endless(ctx: Context, task: str, split: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Unlabelled images of ``task``, reshuffled every pass (labels are never used)."""
    generator = ctx.generator("dam", task)
    data = ctx.data(task)
    while True:
        for images, _ in data.batches(split, batch_size, shuffle=True, generator=generator):
            yield images.to(ctx.device)


def _device_generator(ctx: Context, *salt: Any) -> torch.Generator:
    seed = ctx.generator("dam", *salt).initial_seed()
    return torch.Generator(device=ctx.device).manual_seed(seed)


def learn_mask(ctx: Context, pretrained: StateDict, task_vectors: dict[str, StateDict],
               params: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """Meta-learn the mask logits (steps 1–4 of the module docstring).

    Returns the logits as ``ts.<name>`` (and ``bd.<name>`` for dual masks) and the
    training figures.
    """
    device = ctx.device
    tasks = list(task_vectors)
    names = [n for n in pretrained if any(n in v and bool(v[n].any()) for v in task_vectors.values())]
    if not names:
        raise PluginError("dam: every task vector is zero; there is nothing to mask")
    pre = {k: v.to(device) for k, v in pretrained.items()}
    # per tensor, the K task vectors (no copy where they are already on the device in θ_pre's dtype):
    # masked_merge sums the K tasks into one buffer per tensor, so no K·d stacked copy is ever held
    stacked = {n: [task_vectors[t][n].to(device, pre[n].dtype) for t in tasks] for n in names}
    init = float(params["initial_logits"])
    mask_names = ("ts", "bd") if params["masks"] == "dual" else ("ts",)
    logits = {m: {n: torch.full_like(pre[n], init, requires_grad=True) for n in names} for m in mask_names}
    mask_opt = {m: torch.optim.Adam(list(logits[m].values()), lr=float(params["mask_lr"])) for m in mask_names}
    lambda_init = torch.full((len(tasks),), float(params["lambda_init"]), device=device)
    lambdas = lambda_init.clone().requires_grad_(True)
    lambda_opt = torch.optim.Adam([lambdas], lr=float(params["lambda_lr"]))
    # the image shape from one streamed image (tensors(split) would decode and hold the whole split)
    image_shape = next(iter(ctx.data(tasks[0]).batches(params["split"], 1)))[0].shape[1:]
    deltas = torch.zeros((len(tasks), *image_shape), device=device, requires_grad=True)
    delta_opt = torch.optim.Adam([deltas], lr=float(params["perturbation_lr"]))
    batches = {t: _endless(ctx, t, params["split"], int(params["batch_size"])) for t in tasks}
    ranges = {t: tuple(r.to(device) for r in ctx.data(t).valid_range()) for t in tasks}
    generator = _device_generator(ctx, "mask")
    temperature, alpha = float(params["temperature"]), float(params["alpha"])
    steps = int(params["steps"])
    history: list[tuple[float, float, float]] = []

    def sample() -> StateDict:
        parts = [{n: relaxed_bernoulli(logits[m][n], temperature, generator) for n in names} for m in mask_names]
        product = parts[0] if len(parts) == 1 else {n: parts[0][n] * parts[1][n] for n in names}
        return rescale(product)

    for _ in ctx.progress(range(steps), total=steps, desc="dam mask"):
        mask = sample()                                              # step 1
        detached = {n: m.detach() for n, m in mask.items()}

        with torch.no_grad():                                        # step 2
            lambdas.copy_(lambda_init)
        weights = masked_merge(pre, stacked, lambdas, detached)
        loss = sum(entropy(ctx.forward(weights, next(batches[t]), t)) for t in tasks)
        lambda_opt.zero_grad(set_to_none=True)
        loss.backward()
        lambda_opt.step()
        lam = lambdas.detach()

        with torch.no_grad():                                        # step 3
            weights = masked_merge(pre, stacked, lam, detached)
        loss_delta = 0.0
        for i, t in enumerate(tasks):
            x = next(batches[t])
            both = ctx.forward(weights, torch.cat([x, x + deltas[i]]), t)
            clean, perturbed = both[:len(x)], both[len(x):]
            loss_delta = loss_delta - F.cross_entropy(perturbed, clean.argmax(-1).detach())
        delta_opt.zero_grad(set_to_none=True)
        loss_delta.backward()
        delta_opt.step()

        weights = masked_merge(pre, stacked, lam, mask)              # step 4
        loss_clean, loss_safe = 0.0, 0.0
        for i, t in enumerate(tasks):
            x = next(batches[t])
            low, high = ranges[t]
            perturbed = torch.maximum(torch.minimum(x + deltas[i].detach(), high), low)
            both = ctx.forward(weights, torch.cat([x, perturbed]), t)
            loss_clean = loss_clean + entropy(both[:len(x)])
            loss_safe = loss_safe + entropy(both[len(x):])
        for opt in mask_opt.values():
            opt.zero_grad(set_to_none=True)
        if len(mask_names) == 1:
            (loss_clean + alpha * loss_safe).backward()
        else:  # dual: block-coordinate on L_total = L_perf + α·L_safe
            ts = list(logits["ts"].values())
            bd = list(logits["bd"].values())
            for p, g in zip(ts, torch.autograd.grad(loss_clean, ts, retain_graph=True)):
                p.grad = g
            for p, g in zip(bd, torch.autograd.grad(alpha * loss_safe, bd)):
                p.grad = g
        for opt in mask_opt.values():
            opt.step()
        history.append((loss_clean.item(), loss_safe.item(), -loss_delta.item()))

    tail = history[-max(1, len(history) // 10):] if history else [(float("nan"),) * 3]
    k = len(tasks)
    info = {
        "steps": steps, "tasks": tasks, "masked_tensors": len(names),
        "masked_entries": int(sum(pre[n].numel() for n in names)),
        "lambda_last": [float(v) for v in lambdas.detach().cpu()],
        "final_losses": {  # per task, means over the last 10% of steps
            "entropy_clean": sum(h[0] for h in tail) / len(tail) / k,
            "entropy_perturbed": sum(h[1] for h in tail) / len(tail) / k,
            "perturbation_ce": sum(h[2] for h in tail) / len(tail) / k,
        },
        "perturbation_linf": [float(d.abs().max()) for d in deltas.detach().cpu()],
    }
    tensors = {f"{m}.{n}": logits[m][n].detach().cpu() for m in mask_names for n in names}
    return tensors, info


def final_mask(logits: StateDict, params: dict[str, Any], generator: torch.Generator) -> tuple[StateDict, dict]:
    """Sample the mask the merge uses (rescaled) from stored ``ts.``/``bd.`` logits; its figures."""
    groups: dict[str, StateDict] = {}
    for key, value in logits.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = value
    samples, probabilities = [], []
    for group in sorted(groups, key=lambda g: g != "ts"):
        if params["eval_mask"] == "discrete":
            sample = {n: torch.bernoulli(torch.sigmoid(v), generator=generator) for n, v in groups[group].items()}
        else:
            sample = {n: relaxed_bernoulli(v, float(params["temperature"]), generator)
                      for n, v in groups[group].items()}
        samples.append(sample)
        probabilities.append({n: torch.sigmoid(v) for n, v in groups[group].items()})
    raw = samples[0] if len(samples) == 1 else {n: samples[0][n] * samples[1][n] for n in samples[0]}
    keep = probabilities[0] if len(probabilities) == 1 else {n: probabilities[0][n] * probabilities[1][n]
                                                                for n in probabilities[0]}
    entries = sum(v.numel() for v in keep.values())
    info = {
        "mask_kept_fraction": float(sum((v >= 0.5).sum() for v in keep.values())) / entries,
        "mask_keep_probability": float(sum(v.sum() for v in keep.values())) / entries,
        "mask_sample_mean": float(sum(v.sum() for v in raw.values())) / entries,
    }
    return rescale(raw), info


class DefenseAwareMerging(Defense):
    name = "dam"
    description = "DAM: meta-learned safety-aware mask on the task vectors, then the merger"
    params = {
        "steps": Param(1000, "int", min=0, help="outer steps meta-learning the mask"),
        "batch_size": Param(16, "int", min=1, help="unlabelled images per task per forward"),
        "temperature": Param(0.5, "float", min=0, min_exclusive=True, help="relaxed-Bernoulli temperature"),
        "initial_logits": Param(0.0, "float", help="mask logits at the start (0: keep probability 0.5)"),
        "mask_lr": Param(1e-3, "float", min=0, help="Adam learning rate of the mask logits"),
        "lambda_init": Param(0.3, "float", help="the task-wise λ, reset to this value every step"),
        "lambda_lr": Param(1.0, "float", min=0, help="Adam learning rate of the one λ step per outer step"),
        "perturbation_lr": Param(1e-4, "float", min=0, help="Adam learning rate of the input perturbations δ_k"),
        "alpha": Param(0.1, "float", min=0, help="α: weight of the perturbed-input entropy"),
        "masks": Param("single", "str", choices=MASKS,
                       help="single (public code) or dual (the paper's two masks; reconstructed)"),
        "eval_mask": Param("continuous", "str", choices=EVAL_MASKS,
                           help="the final mask: a relaxed-Bernoulli (continuous) or Bernoulli (discrete) sample"),
        "split": Param("dev", "str", choices=("dev", "test", "train"),
                       help="the unlabelled images (the public code uses shuffled test images)"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost:
        # the mask, λ and δ updates and the final merge: ~5 passes per step and task
        return Cost(train_images=5 * int(params["steps"]) * int(params["batch_size"]) * len(sizes.tasks))

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict], merger: BoundMerger,
               ctx: Context, params: dict[str, Any]) -> Merged:
        if params["masks"] not in MASKS:
            raise PluginError(f"dam: masks must be one of {', '.join(MASKS)}, not {params['masks']!r}")
        if params["eval_mask"] not in EVAL_MASKS:
            raise PluginError(f"dam: eval_mask must be one of {', '.join(EVAL_MASKS)}, "
                              f"not {params['eval_mask']!r}")
        learning = {k: v for k, v in params.items() if k != "eval_mask"}
        vectors_id = fingerprint(task_vectors)
        logits, info = ctx.cached("dam.mask", {**learning, "task_vectors": vectors_id},
                                  lambda: learn_mask(ctx, pretrained, task_vectors, params),
                                  label=f"{params['masks']}, {params['steps']} steps, vectors {vectors_id[:8]}")
        mask, mask_info = final_mask(logits, params, ctx.generator("dam", "final mask"))
        merged = merger(pretrained, mask_task_vectors(task_vectors, mask))
        return Merged(merged.weights, {"merger": merged.info, **mask_info, **info})


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(DefenseAwareMerging())
