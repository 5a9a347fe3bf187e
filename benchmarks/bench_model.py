"""The harness's model loops against bare PyTorch written here, on the same model and tensors:

- evaluation: ``SharedStages.evaluate`` (ACC + ASR of the target task, one pass) against two
  bare forward passes (clean, triggered) of the same encoder over the same normalised tensors;
- fine-tuning: ``SharedStages.run_finetune`` (``mmbench.train.finetune``) against a bare loop
  with the same model, batch, AdamW, schedule and gradient clipping;
- AdaMerging and DAM: time per step of the plugins (``AdaMerging.merge``, ``dam.learn_mask``,
  their fixed cost at 0 steps subtracted) against a step written here directly with
  ``torch.func.functional_call``; and whether each streams its data or loads a whole split.

The model, heads and data are the ``tiny`` preset's, read from ``leaderboard/store`` (nothing
is written there); where that store lacks them (or ``MMBENCH_BENCH_PRESET=smoke``), the
``smoke`` preset's, built in a temporary store. Task vectors are synthetic (time does not depend
on their values). One intra-op thread, as a stage runs on a CPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, paired, threads, timed  # noqa: E402

ADA_STEPS, DAM_STEPS, FT_STEPS = 20, 6, 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(SharedStages, preset, where it came from) with data, base and heads loaded."""
    from mmbench.context import SharedStages
    from mmbench.plugins import load
    from mmbench.store import Store

    registry = load()
    name = os.environ.get("MMBENCH_BENCH_PRESET", "tiny")
    preset = registry.get("preset", name).obj
    root = REPO / "leaderboard" / "store"
    shared = SharedStages(preset, Store(root), torch.device("cpu"), quiet=True)
    keys = [shared.keys.base(), shared.keys.heads()] + [shared.keys.data(t) for t in preset.task_names]
    if name != "tiny" or not all(shared.store.has(k) for k in keys):
        from mmbench.cli import main

        preset = registry.get("preset", "smoke").obj
        root = tmp_path_factory.mktemp("smoke-store")
        assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                     "--store", str(root), "--quiet", "--jobs", "1"]) == 0
        shared = SharedStages(preset, Store(root), torch.device("cpu"), quiet=True)
    with threads(1):
        shared.heads()
        shared.encoder_module()
        for t in preset.task_names:
            shared.task_data(t).tensors("test")
            shared.task_data(t).tensors("dev")
    return shared, preset, f"preset {preset.name}"


def synthetic_vectors(shared, scale: float = 1e-3) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pre = shared.pretrained()
    return {t: {n: torch.randn(p.shape, generator=gen) * scale for n, p in pre.items()}
            for t in shared.preset.task_names}


def logits(features, head):
    return F.normalize(features, dim=-1) @ head.T


def entropy(z):
    log_p = z.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


# --- evaluation -------------------------------------------------------------------------------------

def make_trigger(preset):
    from mmbench.api import Trigger

    side = max(2, preset.image_size // 8)
    return Trigger.at_corner(torch.full((3, side, side), 2.0), preset.image_size)


def test_evaluation_overhead(benchmark, perf, env):
    from mmbench import models

    shared, preset, where = env
    task, target = preset.adversary_task, preset.target_class
    weights = shared.pretrained()
    trigger = make_trigger(preset)
    x, _ = shared.task_data(task).tensors("test")
    xt = trigger.apply(x)
    module = models.build_encoder(preset)
    module.load_state_dict(weights, strict=False)
    module.eval()
    head = shared.heads()[task]
    bs = preset.eval_batch_size

    def reference():
        with torch.no_grad():
            for i in range(0, x.shape[0], bs):
                logits(module(x[i:i + bs]), head).argmax(-1)
                logits(module(xt[i:i + bs]), head).argmax(-1)

    def subject():
        return shared.evaluate(weights, task, "test", trigger, target)
    with threads(1):
        ours, ref = paired(benchmark, subject, reference, rounds=5)
    n = 2 * x.shape[0]
    ratio = ours / ref
    perf.add(id="eval-overhead", section="Evaluation",
             what=f"ACC + ASR of one task ({where}, {x.shape[0]} test images, clean + triggered)",
             measured=f"{n / ours:.0f} img/s", reference=f"bare forward {n / ref:.0f} img/s",
             ratio=ratio - 1, ratio_label="overhead", target="≤ 0.10", ok=ratio - 1 <= 0.10,
             fix="Per batch the harness gathers the batch by index (`InMemoryTaskData.batches`), clones it "
                 "to paste the trigger, rebuilds the weight dict and calls `functional_call`. Slice "
                 "contiguous batches when not shuffling (`x[start:stop]`, a view, instead of `x[idx]`), "
                 "paste the trigger into a preallocated buffer, and build the `functional_call` dict once per "
                 "evaluation (in `mmbench/data.py`, `api.py`, `context.py`; fingerprinted).")

    # ACC and ASR share decoded images: one pass over the split for both
    td = shared.task_data(task)
    passes = []
    original = td.batches

    def counting(*a, **k):
        passes.append(a)
        return original(*a, **k)
    td.batches = counting
    try:
        shared.evaluate(weights, task, "test", trigger, target)
    finally:
        del td.batches
    perf.add(id="eval-shared-pass", section="Evaluation", what="ACC and ASR of one task share decoded images",
             measured=f"{len(passes)} pass over the test split", reference="2 passes if separate",
             ratio=float(len(passes)), ratio_label="passes", target="1 pass", ok=len(passes) == 1)


# --- fine-tuning ------------------------------------------------------------------------------------

def test_finetune_overhead(benchmark, perf, env):
    from mmbench import models

    shared, preset, where = env
    task = preset.task_names[0]
    recipe = shared.recipe(task)
    n_train = shared.task_data(task).size("train")
    epochs = FT_STEPS / max(1, n_train // recipe.batch_size)
    pre = shared.pretrained()
    head = shared.heads()[task]
    x_all, y_all = shared.task_data(task).tensors("train")
    assert recipe.schedule == "onecycle", "the bare loop below writes the tiny/smoke presets' schedule"

    def subject():
        return shared.run_finetune(task, seed=0, epochs=epochs)

    def reference():
        gen = torch.Generator().manual_seed(0)
        module = models.build_encoder(preset)
        module.load_state_dict(pre, strict=False)
        module.train()
        params = []
        for name, p in module.named_parameters():
            p.requires_grad_(not any(name == f or name.startswith(f) for f in recipe.frozen))
            if p.requires_grad:
                params.append(p)
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(FT_STEPS, 2))
        per_epoch = n_train // recipe.batch_size * recipe.batch_size
        order = torch.cat([torch.randperm(n_train, generator=gen)[:per_epoch]
                           for _ in range(-(-FT_STEPS * recipe.batch_size // per_epoch))])
        for step in range(FT_STEPS):
            idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            loss = F.cross_entropy(logits(module(x_all[idx]), head), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            sched.step()
            loss.item()
    with threads(1):
        ours, ref = paired(benchmark, subject, reference, rounds=5)
    _, info = shared.run_finetune(task, seed=0, epochs=epochs)
    assert info["steps"] == FT_STEPS
    ratio = ours / ref
    perf.add(id="finetune-overhead", section="Fine-tuning",
             what=f"`mmbench.train.finetune`, {FT_STEPS} steps of batch {recipe.batch_size} ({where})",
             measured=f"{FT_STEPS * recipe.batch_size / ours:.0f} img/s",
             reference=f"bare loop {FT_STEPS * recipe.batch_size / ref:.0f} img/s",
             ratio=ratio - 1, ratio_label="overhead", target="≤ 0.10", ok=ratio - 1 <= 0.10,
             fix="Profile `train.finetune` against the bare loop: its per-step extras are the batch "
                 "iterator (`_Batches`, gathering by index) and the checkpoint test.")


# --- AdaMerging and DAM -----------------------------------------------------------------------------

def _per_step(benchmark, subject_n, subject_0, reference_n, steps):
    with threads(1):
        fixed = min(timed(subject_0) for _ in range(3))
        ours, ref = paired(benchmark, subject_n, reference_n, rounds=3)
    return max(ours - fixed, 1e-9) / steps, ref / steps, fixed


def test_adamerging_step(benchmark, perf, env):
    from mmbench.context import RunContext
    from mmbench_plugins.mergers.adamerging import AdaMerging

    shared, preset, where = env
    pre = shared.pretrained()
    vectors = synthetic_vectors(shared)
    tasks = list(vectors)
    ada = AdaMerging()
    params = {**ada.defaults, "steps": ADA_STEPS, "batch_size": 16, "lr": 1e-3, "clamp": [0.0, 1.0]}
    ctx = RunContext(shared, 0)
    module, heads = shared.encoder_module(), shared.heads()
    dev = {t: shared.task_data(t).tensors("dev")[0] for t in tasks}
    layers = list(pre)

    def reference():
        lam = torch.full((len(layers), len(tasks)), 0.3, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(ADA_STEPS):
            xs = [dev[t][torch.randint(len(dev[t]), (16,), generator=gen)] for t in tasks]
            c = lam.clamp(0, 1)
            w = {n: pre[n] + sum(c[i, k] * vectors[t][n] for k, t in enumerate(tasks)) for i, n in enumerate(layers)}
            feats = functional_call(module, w, (torch.cat(xs),)).split(16)
            loss = sum(entropy(logits(f, heads[t])) for f, t in zip(feats, tasks))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    per_step, ref_step, fixed = _per_step(
        benchmark, lambda: ada.merge(pre, vectors, ctx, params),
        lambda: ada.merge(pre, vectors, ctx, {**params, "steps": 0}), reference, ADA_STEPS)
    ratio = per_step / ref_step
    perf.add(id="adamerging-step", section="AdaMerging and DAM",
             what=f"AdaMerging step (layer-wise, {len(tasks)} tasks × 16 images, {where})",
             measured=f"{per_step * 1e3:.1f} ms/step", reference=f"functional_call step {ref_step * 1e3:.1f} ms",
             ratio=ratio, ratio_label="×", target="≤ 1.1×", ok=ratio <= 1.1,
             note=f"fixed cost at 0 steps {fixed:.2f} s subtracted",
             fix="The plugin rebuilds the merged weights with K temporaries per tensor (`weight = weight + "
                 "c·τ`) and `ctx.forward` copies the weight dict per call: stack the task vectors once and "
                 "merge with one `torch.tensordot` per tensor (in `plugins/mergers/adamerging.py`).")


def test_dam_step(benchmark, perf, env):
    from mmbench.context import RunContext
    from mmbench_plugins.defenses.dam import DefenseAwareMerging, learn_mask

    shared, preset, where = env
    pre = shared.pretrained()
    vectors = synthetic_vectors(shared)
    tasks = list(vectors)
    params = {**DefenseAwareMerging().defaults, "steps": DAM_STEPS, "batch_size": 16}
    ctx = RunContext(shared, 0)
    module, heads = shared.encoder_module(), shared.heads()
    dev = {t: shared.task_data(t).tensors("dev")[0] for t in tasks}
    ranges = {t: shared.task_data(t).valid_range() for t in tasks}
    names = list(pre)
    stacked = {n: torch.stack([vectors[t][n] for t in tasks]) for n in names}
    temperature, alpha = params["temperature"], params["alpha"]

    def reference():
        gen = torch.Generator().manual_seed(0)
        mask_logits = {n: torch.zeros_like(pre[n], requires_grad=True) for n in names}
        mask_opt = torch.optim.Adam(list(mask_logits.values()), lr=params["mask_lr"])
        lam = torch.full((len(tasks),), 0.3, requires_grad=True)
        lam_opt = torch.optim.Adam([lam], lr=params["lambda_lr"])
        deltas = torch.zeros((len(tasks), *dev[tasks[0]].shape[1:]), requires_grad=True)
        delta_opt = torch.optim.Adam([deltas], lr=params["perturbation_lr"])

        def batch(t):
            return dev[t][torch.randint(len(dev[t]), (16,), generator=gen)]

        def merged(lam_, mask):
            return {n: pre[n] + mask[n] * torch.tensordot(lam_, stacked[n], dims=1) for n in names}

        def f(w, x, t):
            return logits(functional_call(module, w, (x,)), heads[t])
        for _ in range(DAM_STEPS):
            sample = {}
            for n, v in mask_logits.items():
                u = torch.rand(v.shape, generator=gen).clamp(1e-12, 1 - 1e-7)
                m = torch.sigmoid((v + torch.log(u) - torch.log1p(-u)) / temperature)
                sample[n] = m / m.mean()
            detached = {n: m.detach() for n, m in sample.items()}
            with torch.no_grad():
                lam.fill_(0.3)
            w = merged(lam, detached)
            loss = sum(entropy(f(w, batch(t), t)) for t in tasks)
            lam_opt.zero_grad(set_to_none=True)
            loss.backward()
            lam_opt.step()
            with torch.no_grad():
                w = merged(lam.detach(), detached)
            loss_d = 0.0
            for i, t in enumerate(tasks):
                x = batch(t)
                both = f(w, torch.cat([x, x + deltas[i]]), t)
                loss_d = loss_d - F.cross_entropy(both[16:], both[:16].argmax(-1))
            delta_opt.zero_grad(set_to_none=True)
            loss_d.backward()
            delta_opt.step()
            w = merged(lam.detach(), sample)
            loss = 0.0
            for i, t in enumerate(tasks):
                x = batch(t)
                low, high = ranges[t]
                xp = torch.maximum(torch.minimum(x + deltas[i].detach(), high), low)
                both = f(w, torch.cat([x, xp]), t)
                loss = loss + entropy(both[:16]) + alpha * entropy(both[16:])
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()

    per_step, ref_step, fixed = _per_step(
        benchmark, lambda: learn_mask(ctx, pre, vectors, params),
        lambda: learn_mask(ctx, pre, vectors, {**params, "steps": 0}), reference, DAM_STEPS)
    ratio = per_step / ref_step
    perf.add(id="dam-step", section="AdaMerging and DAM",
             what=f"DAM mask step (single mask, {len(tasks)} tasks × 16 images, {where})",
             measured=f"{per_step * 1e3:.1f} ms/step", reference=f"functional_call step {ref_step * 1e3:.1f} ms",
             ratio=ratio, ratio_label="×", target="≤ 1.1×", ok=ratio <= 1.1,
             note=f"fixed cost at 0 steps {fixed:.2f} s subtracted",
             fix="Profile `learn_mask` against the reference step: the per-step extras are `ctx.forward`'s "
                 "weight-dict copy per forward (4 K forwards a step) and the batches drawn through "
                 "`TaskData.batches` (a gather per batch).")


def test_streaming_dev_split(perf, env):
    """Does AdaMerging / DAM load a whole split (``TaskData.tensors``) or stream batches? And what a
    whole dev split costs at 224 px (measured per image, scaled to the paper presets' dev split)."""
    from mmbench.context import RunContext
    from mmbench.data import InMemoryTaskData
    from mmbench.estimate import task_sizes
    from mmbench.graph import StageKeys
    from mmbench.plugins import load
    from mmbench_plugins.defenses.dam import DefenseAwareMerging, learn_mask
    from mmbench_plugins.mergers.adamerging import AdaMerging

    shared, preset, where = env
    pre = shared.pretrained()
    vectors = synthetic_vectors(shared)

    class Counting:
        """A task's data that counts whole-split loads made by a plugin (batches still stream)."""

        def __init__(self, inner):
            self.inner, self.loads = inner, []

        def tensors(self, split):
            self.loads.append(split)
            return self.inner.tensors(split)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def whole_split_loads(fn) -> int:
        proxies = {t: Counting(shared.task_data(t)) for t in preset.task_names}
        saved = {t: shared._memo[f"taskdata:{t}"] for t in preset.task_names}
        shared._memo.update({f"taskdata:{t}": p for t, p in proxies.items()})
        try:
            with threads(1):
                fn()
        finally:
            shared._memo.update({f"taskdata:{t}": d for t, d in saved.items()})
        return sum(len(p.loads) for p in proxies.values())

    ctx = RunContext(shared, 0)
    ada = AdaMerging()
    ada_loads = whole_split_loads(lambda: ada.merge(pre, vectors, ctx, {**ada.defaults, "steps": 1}))
    dam_params = {**DefenseAwareMerging().defaults, "steps": 1}
    dam_loads = whole_split_loads(lambda: learn_mask(ctx, pre, vectors, dam_params))

    # the memory a whole split holds at 224 px: materialised from 256 synthetic images
    n = 256
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
    td = InMemoryTaskData("synthetic", ("a", "b"), {"dev": images}, {"dev": torch.zeros(n, dtype=torch.long)},
                          (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, _ = td.tensors("dev")
    per_image = x.numel() * x.element_size() / n   # what the materialised split holds per image
    del td, x
    from mmbench.store import Store
    held = {}
    for name in ("vit-b-32-6task", "vit-b-32-8task"):
        paper = load().get("preset", name).obj
        first = paper.task_names[0]
        _, n_dev, _, source = task_sizes(StageKeys(paper), Store(REPO / "leaderboard" / "store"), first)
        held[name] = (first, n_dev or 0, (n_dev or 0) * per_image, source)
    worst = max(held, key=lambda k: held[k][2])
    batch = 16 * 3 * 224 * 224 * 4
    perf.add(id="adamerging-streams", section="AdaMerging and DAM", what="AdaMerging: whole-split loads",
             measured=f"{ada_loads}", reference="0 (streams batches)", ratio=float(ada_loads),
             ratio_label="loads", target="0", ok=ada_loads == 0)
    perf.add(id="dam-streams", section="AdaMerging and DAM",
             what="DAM: whole-split loads, and the memory they hold at paper scale (" + "; ".join(
                 f"{k}: first task {v[0]}, {v[1]} dev images ({v[3]}), {v[2] / 2 ** 30:.2f} GiB"
                 for k, v in held.items()) + ")",
             measured=f"{dam_loads} load; up to {held[worst][2] / 2 ** 30:.2f} GiB held",
             reference=f"a batch of 16 at 224 px: {batch / 2 ** 20:.1f} MiB",
             ratio=float(dam_loads), ratio_label="loads", target="0 (stream the dev split)", ok=dam_loads == 0,
             note=f"{per_image / 1e3:.0f} kB per normalised 224 px image, measured",
             fix="`learn_mask` calls `ctx.data(tasks[0]).tensors(split)` only to learn the image shape, which "
                 "decodes and keeps the whole split in memory. Take the shape from one streamed batch instead: "
                 "`image_shape = next(iter(ctx.data(tasks[0]).batches(params['split'], 1)))[0].shape[1:]` "
                 "(in `plugins/defenses/dam.py`, fingerprinted: changes the `dam.mask` key, not its values).")
