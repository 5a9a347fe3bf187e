"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", arXiv 1805.12185), the cheap post-merge
baseline: what a defender who knows nothing of merging achieves with clean labelled data.

The original prunes the last convolutional layer's channels that stay dormant on clean
validation data (a backdoor tends to live in units clean inputs do not use), in order of
increasing mean activation, until clean validation accuracy falls by more than a
threshold; then fine-tunes on clean data. BackdoorBench's ``defense/FP`` ranks the last
conv block's channels by mean clean activation, with 5 % clean data and an accuracy
threshold ``acc_ratio`` 0.1.

mmbench's adaptation to a merged ViT (RECONSTRUCTED; the paper has no transformer):

1. Units: the MLP hidden units of the LAST block (the outputs of ``mlp.c_fc``, 3072 in
   ViT-B/32, 512 in ``tiny``). A unit's score is its mean post-activation value (the
   input of ``mlp.c_proj``) over every token of the dev images of every merged task.
2. Prune by increasing score, ``prune_step`` (1 %) of the units per step: zero row j of
   ``c_fc.weight``, ``c_fc.bias[j]`` and column j of ``c_proj.weight``. Stop before the
   mean labelled dev ACC over the merged tasks drops by more than ``max_acc_drop``
   (0.10 absolute, BackdoorBench's ``acc_ratio``; the paper's own threshold, recalled as
   4 %, is ``max_acc_drop=0.04``). The stopping point never looks at a trigger (an older
   BackdoorBench version kept the model with the best clean-minus-backdoor accuracy,
   which leaks the trigger).
3. Fine-tune the pruned encoder on the labelled dev splits of the merged tasks (the
   defender's clean data) for ``finetune_steps`` (200) steps with the preset's recipe
   (AdamW, weight decay, schedule, gradient clipping, frozen parameters) at ``lr`` (null →
   the recipe's: 1e-5 on the paper presets, as ALGORITHMS-2), pruned units held at zero.
   Each step takes ⌈batch/K⌉ images of each of the K tasks' dev splits (streamed, each
   task its own shuffled order) and averages the K cross-entropies with their own frozen
   heads (reconstructed). The recipe's warm-up is capped at 10 % of the steps
   (reconstructed: the papers' 500 warm-up steps would span the whole run).
   ``finetune_steps=0`` gives pruning only.

The scan's dev accuracies come from :class:`IncrementalScan` (one pass over the dev splits,
then a subtraction per step; equal to evaluating each pruned model whole, up to float
rounding) where the block is open_clip's, else from :class:`LastBlockScan`.

``Merged.info`` records the merger's info, the number of units and how many were
pruned, the dev ACC of the merge, after pruning and after fine-tuning, and the
fine-tune's final loss.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

from mmbench.lazy import torch, F  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import BoundMerger, Context, Cost, Defense, Merged, Param, PluginError, Sizes, StateDict


def last_mlp(weights: StateDict) -> tuple[str, str]:
    """The names of the last block's ``mlp.c_fc`` and ``mlp.c_proj`` (the largest block index)."""
    blocks = []
    for name in weights:
        match = re.fullmatch(r"(.*\.(\d+)\.mlp)\.c_fc\.weight", name)
        if match and f"{match.group(1)}.c_proj.weight" in weights:
            blocks.append((int(match.group(2)), match.group(1)))
    if not blocks:
        raise PluginError("fine_pruning: the encoder has no '<block>.mlp.c_fc' / '.mlp.c_proj' weights")
    prefix = max(blocks)[1]
    return f"{prefix}.c_fc", f"{prefix}.c_proj"


def prune(weights: StateDict, fc: str, proj: str, units: torch.Tensor) -> StateDict:
    """A copy of ``weights`` with the hidden ``units`` of the MLP (fc, proj) zeroed:
    rows of fc.weight and fc.bias, columns of proj.weight. Other tensors are shared."""
    out = dict(weights)
    out[f"{fc}.weight"] = weights[f"{fc}.weight"].clone()
    out[f"{fc}.weight"][units] = 0
    if f"{fc}.bias" in weights:
        out[f"{fc}.bias"] = weights[f"{fc}.bias"].clone()
        out[f"{fc}.bias"][units] = 0
    out[f"{proj}.weight"] = weights[f"{proj}.weight"].clone()
    out[f"{proj}.weight"][:, units] = 0
    return out


def pruning_order(scores: torch.Tensor) -> torch.Tensor:
    """Units by increasing score (ties by index: a stable sort)."""
    return torch.sort(scores, stable=True).indices


def choose_pruned(accuracies: list[float], max_drop: float) -> int:
    """``accuracies[i]``: mean dev ACC with the first i steps pruned (``[0]`` the merge). The
    number of steps kept: the last i before the first whose drop exceeds ``max_drop``."""
    for i, acc in enumerate(accuracies):
        if accuracies[0] - acc > max_drop + 1e-12:
            return i - 1
    return len(accuracies) - 1


def _replay_modules():
    """(Replay, PassThrough) module classes, made on first use (torch is imported lazily)."""
    class Replay(torch.nn.Module):
        """Stands in for the first block: returns the cached input of the last block for the
        current batch, whatever it is given."""

        def __init__(self) -> None:
            super().__init__()
            self.cached = None

        def forward(self, x, *args, **kwargs):
            return self.cached

    class PassThrough(torch.nn.Module):
        def forward(self, x, *args, **kwargs):
            return x
    return Replay, PassThrough


class LastBlockScan:
    """Mean dev ACC over the merged tasks of weights that differ from ``weights`` only in the
    last block's MLP (the pruning scan), without recomputing the blocks before it.

    One pass over every dev split records the input of the last transformer block per batch;
    each evaluation then loads the (pruned) MLP weights and runs the model with the earlier
    blocks replaced by a replay of those inputs: the same logits as the whole model (exact,
    not an approximation; tests/test_defenses_fine_pruning.py), at a fraction of its cost.
    ACC = correct / images per task, as the harness counts it. Memory: the last block's
    input for every dev image (tokens × width floats each; ~150 kB an image at ViT-B/32)."""

    def __init__(self, ctx: Context, weights: StateDict, tasks: list[str], fc: str, proj: str) -> None:
        from mmbench import train

        self.ctx, self.tasks, self.names = ctx, tasks, [f"{fc}.weight", f"{fc}.bias", f"{proj}.weight"]
        self.autocast = lambda: train.autocast(ctx.device)
        self.module = ctx.encoder(weights).eval()
        blocks = self.module.get_submodule(fc.rsplit(".", 2)[0].rsplit(".", 1)[0])  # '<...>.resblocks'
        self.batches: dict[str, list[tuple[Any, Any]]] = {t: [] for t in tasks}
        self.shape: tuple[int, ...] = ()
        captured = []
        handle = blocks[len(blocks) - 1].register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        try:
            with torch.no_grad(), self.autocast():
                for task in tasks:
                    for x, y in ctx.data(task).batches("dev", 256):
                        captured.clear()
                        self.module(x.to(ctx.device))
                        self.batches[task].append((captured[0], y))
                        self.shape = tuple(x.shape[1:])
        finally:
            handle.remove()
        replay, passthrough = _replay_modules()
        self.replay = replay()
        self.replaying = len(blocks) > 1
        if self.replaying:  # the earlier blocks: one replay, then pass-throughs
            blocks[0] = self.replay
            for i in range(1, len(blocks) - 1):
                blocks[i] = passthrough()
        self.params = dict(self.module.named_parameters())

    def mean_accuracy(self, weights: StateDict) -> float:
        with torch.no_grad():
            for name in self.names:
                if name in weights and name in self.params:
                    self.params[name].copy_(weights[name].to(self.params[name].device))
            total = 0.0
            for task in self.tasks:
                correct = count = 0
                for (cached, y), x in zip(self.batches[task], self._images(task)):
                    self.replay.cached = cached
                    with self.autocast():
                        logits = self.ctx.logits(self.module(x.to(self.ctx.device)), task)
                    correct += int((logits.argmax(-1).cpu() == y).sum())
                    count += y.numel()
                total += correct / max(count, 1)
        return total / len(self.tasks)

    def _images(self, task: str):
        """What the model is given: with a replay, a zero image of each batch's size (the patch
        embedding still runs, the replay ignores its result); a one-block model has nothing to
        skip and gets the dev images again."""
        if not self.replaying:
            for x, _ in self.ctx.data(task).batches("dev", 256):
                yield x
            return
        for _, y in self.batches[task]:
            yield torch.zeros((y.numel(), *self.shape))


class IncrementalScan:
    """The pruning scan's mean dev ACC for a growing prefix of pruned units, each step costing
    a few small matrix products and the model's head, not a pass through any block.

    Zeroing unit j's ``c_fc`` row and bias makes its activation act(0) = 0, so the last block's
    output y = r + ls_2(c_proj(a)) loses exactly ls_2(a_j · W_proj[:, j]): one pass over the dev
    splits records each batch's ``c_fc`` input h and the block's output y; pruning more units
    subtracts their terms, a_j recomputed from h (so only h, y and the running change are
    kept: three times the last block's input per image). The output then goes through the
    rest of the model (``ln_post``, pooling, ``proj``) by replaying it in place of the blocks.
    Equal to the whole model up to float rounding (tests/test_defenses_fine_pruning.py);
    used where the block is open_clip's (c_fc → activation → c_proj, act(0) = 0, ls_2 linear:
    Identity or LayerScale), else :class:`LastBlockScan`. The same pass yields the units'
    scores (mean activation over every token), so it replaces :meth:`FinePruning.scores`."""

    @staticmethod
    def supported(module: torch.nn.Module, fc: str, proj: str) -> bool:
        mlp = module.get_submodule(fc.rsplit(".", 1)[0])
        names = [n for n, _ in mlp.named_children()]
        if len(names) != 3 or names[0] != fc.rsplit(".", 1)[1] or names[2] != proj.rsplit(".", 1)[1]:
            return False
        with torch.no_grad():
            if float(getattr(mlp, names[1])(torch.zeros(1)).abs()) != 0.0:
                return False
        block = module.get_submodule(fc.rsplit(".", 2)[0])
        ls = getattr(block, "ls_2", None)
        return isinstance(ls, torch.nn.Identity) or (ls is not None and hasattr(ls, "gamma")
                                                      and not getattr(ls, "inplace", False))

    def __init__(self, ctx: Context, weights: StateDict, tasks: list[str], fc: str, proj: str,
                 module: torch.nn.Module | None = None) -> None:
        from mmbench import train

        self.ctx, self.tasks = ctx, tasks
        self.autocast = lambda: train.autocast(ctx.device)
        # the encoder holding ``weights`` (built here unless given); its blocks are replaced below
        module = (module if module is not None else ctx.encoder(weights)).eval()
        self.module = module
        mlp = module.get_submodule(fc.rsplit(".", 1)[0])
        self.act = list(mlp.children())[1]
        self.ls = module.get_submodule(fc.rsplit(".", 2)[0]).ls_2
        self.w_fc = weights[f"{fc}.weight"].to(ctx.device).float()
        b = weights.get(f"{fc}.bias")
        self.b_fc = (b if b is not None else torch.zeros(self.w_fc.shape[0])).to(ctx.device).float()
        self.w_proj = weights[f"{proj}.weight"].to(ctx.device).float()
        blocks = module.get_submodule(fc.rsplit(".", 3)[0])
        block = blocks[len(blocks) - 1]
        self.batches: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
        seen: dict[str, Any] = {}
        total, count = None, 0

        def on_fc(_m, inputs):
            seen["h"] = inputs[0].detach()

        def on_proj(_m, inputs):
            nonlocal total, count
            a = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            total = a.sum(0) if total is None else total + a.sum(0)
            count += a.shape[0]

        def on_block(_m, _inputs, out):
            seen["y"] = out.detach()
        handles = [module.get_submodule(fc).register_forward_pre_hook(on_fc),
                   module.get_submodule(proj).register_forward_pre_hook(on_proj),
                   block.register_forward_hook(on_block)]
        self.shape: tuple[int, ...] = ()
        try:
            with torch.no_grad(), self.autocast():
                for task in tasks:
                    for x, y in ctx.data(task).batches("dev", 256):
                        module(x.to(ctx.device))
                        self.batches[task].append({"h": seen["h"], "y": seen["y"], "labels": y,
                                                   "delta": torch.zeros_like(seen["y"], dtype=torch.float32)})
                        self.shape = tuple(x.shape[1:])
        finally:
            for h in handles:
                h.remove()
        self.scores = (total / max(count, 1)).cpu()
        replay, passthrough = _replay_modules()
        self.replay = replay()
        blocks[0] = self.replay
        for i in range(1, len(blocks)):
            blocks[i] = passthrough()
        self.pruned = torch.zeros(0, dtype=torch.long)

    def mean_accuracy(self, units: torch.Tensor) -> float:
        """Mean dev ACC with ``units`` pruned (fastest when ``units`` extends the previous call's)."""
        units = units.to(torch.long).cpu()
        k = self.pruned.numel()
        if units.numel() >= k and torch.equal(units[:k], self.pruned):
            new = units[k:]
        else:  # not a continuation: start again from the merge
            for batches in self.batches.values():
                for b in batches:
                    b["delta"].zero_()
            new = units
        self.pruned = units.clone()
        index = new.to(self.ctx.device)
        total = 0.0
        with torch.no_grad():
            for task in self.tasks:
                correct = n = 0
                for b in self.batches[task]:
                    if index.numel():
                        a = self.act(b["h"].float() @ self.w_fc[index].T + self.b_fc[index])
                        b["delta"] -= self.ls(a @ self.w_proj[:, index].T)
                    self.replay.cached = (b["y"].float() + b["delta"]).to(b["y"].dtype)
                    with self.autocast():
                        images = torch.zeros((b["labels"].numel(), *self.shape), device=self.ctx.device)
                        logits = self.ctx.logits(self.module(images), task)
                    correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
                    n += b["labels"].numel()
                total += correct / max(n, 1)
        return total / len(self.tasks)


class FinePruning(Defense):
    name = "fine_pruning"
    description = "Fine-pruning (Liu et al., 2018): prune the last MLP's dormant units on clean dev data, then fine-tune"
    merges_own_inputs = True
    params = {
        "prune_step": Param(0.01, "float", min=0, max=1, min_exclusive=True,
                            help="fraction of the units pruned per step"),
        "max_acc_drop": Param(0.10, "float", min=0, max=1,
                              help="stop before mean dev ACC falls more than this below the merge's "
                                   "(BackdoorBench's acc_ratio; the paper's 4 %: 0.04)"),
        "finetune_steps": Param(200, "int", min=0, help="fine-tuning steps on the dev splits; 0: prune only"),
        "lr": Param(None, "float", min=0, min_exclusive=True, help="fine-tuning lr; null → the preset recipe's"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        dev = [sizes.dev_images.get(t) for t in sizes.tasks]
        if any(d is None for d in dev):
            return None
        # the scoring pass, about a third of the units' steps evaluated (each: every dev split), the fine-tune
        passes = 1 + math.ceil(0.33 / params["prune_step"])
        batch = 128
        return Cost(train_images=params["finetune_steps"] * batch, eval_images=passes * sum(dev),
                    note="pruning scan on dev + fine-tune")

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict], merger: BoundMerger,
               ctx: Context, params: dict[str, Any]) -> Merged:
        merged = merger(pretrained, task_vectors)
        tasks = list(task_vectors)
        weights = merged.weights
        fc, proj = last_mlp(weights)

        def dev_acc(w: StateDict) -> float:
            return sum(ctx.accuracy(w, t, split="dev") for t in tasks) / len(tasks)

        order, accuracies = self.scan(ctx, weights, tasks, fc, proj, params)
        n_units = order.numel()
        per_step = max(1, round(params["prune_step"] * n_units))
        steps = choose_pruned(accuracies, params["max_acc_drop"])
        pruned = order[:min(steps * per_step, n_units)]
        weights = prune(weights, fc, proj, pruned)
        ctx.log(f"fine_pruning: {pruned.numel()}/{n_units} units pruned, dev ACC {accuracies[0]:.4f} → "
                f"{accuracies[steps]:.4f}")
        info: dict[str, Any] = {
            "merger": merged.info, "units": n_units, "pruned": int(pruned.numel()), "layer": fc.rsplit(".", 1)[0],
            "dev_acc_merged": accuracies[0], "dev_acc_pruned": accuracies[steps], "scan": accuracies,
        }
        if params["finetune_steps"]:
            weights, tuned = self.finetune(ctx, weights, tasks, fc, proj, pruned, params)
            info.update(tuned)
            info["dev_acc_finetuned"] = dev_acc(weights)
        return Merged(weights, info)

    @staticmethod
    def scan(ctx: Context, weights: StateDict, tasks: list[str], fc: str, proj: str,
             params: dict[str, Any]) -> tuple[torch.Tensor, list[float]]:
        """(units by increasing score, mean dev ACC with 0, 1, 2, ... steps of them pruned),
        stopping at the first step whose drop exceeds ``max_acc_drop``."""
        module = ctx.encoder(weights)
        if IncrementalScan.supported(module, fc, proj):
            fast = IncrementalScan(ctx, weights, tasks, fc, proj, module=module)
            scores, accuracy = fast.scores, fast.mean_accuracy
        else:  # any other block: the replay of the last block's input, pruned weights loaded
            scores = FinePruning.scores(ctx, weights, tasks, proj)
            slow = LastBlockScan(ctx, weights, tasks, fc, proj)

            def accuracy(units: torch.Tensor) -> float:
                return slow.mean_accuracy(prune(weights, fc, proj, units))
        order = pruning_order(scores)
        n_units = scores.numel()
        per_step = max(1, round(params["prune_step"] * n_units))
        accuracies = [accuracy(order[:0])]
        for count in range(per_step, n_units + per_step, per_step):
            accuracies.append(accuracy(order[:min(count, n_units)]))
            if accuracies[0] - accuracies[-1] > params["max_acc_drop"] + 1e-12:
                break
        return order, accuracies

    @staticmethod
    def scores(ctx: Context, weights: StateDict, tasks: list[str], proj: str) -> torch.Tensor:
        """Mean post-activation of each hidden unit (the input of ``proj``) over every token
        of every merged task's dev images."""
        module = ctx.encoder(weights)
        layer = module.get_submodule(proj)
        total, count = None, 0

        def hook(_module, inputs):
            nonlocal total, count
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
        handle = layer.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for task in tasks:
                    for x, _ in ctx.data(task).batches("dev", 256):
                        module(x.to(ctx.device))
        finally:
            handle.remove()
        return (total / max(count, 1)).cpu()

    @staticmethod
    def finetune(ctx: Context, weights: StateDict, tasks: list[str], fc: str, proj: str, pruned: torch.Tensor,
                 params: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
        from mmbench import train  # torch-importing: only when the defense runs

        recipe = ctx.preset.recipe
        steps = params["finetune_steps"]
        lr = params["lr"] if params["lr"] is not None else recipe.lr
        schedule = dataclasses.replace(recipe, lr=lr, warmup_steps=min(recipe.warmup_steps, steps // 10))
        theta = {k: v.detach().to(ctx.device).clone().requires_grad_(not train.is_frozen(k, recipe))
                 for k, v in weights.items()}
        trainable = [v for v in theta.values() if v.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=recipe.weight_decay)
        sched = train.schedule(opt, schedule, steps)
        per_task = max(1, math.ceil(recipe.batch_size / len(tasks)))
        keep_fc = torch.ones(theta[f"{fc}.weight"].shape[0], device=ctx.device)
        keep_fc[pruned.to(ctx.device)] = 0

        def stream(task: str) -> Iterator:
            order = ctx.generator("fine_pruning.order", task)
            while True:
                yield from ctx.data(task).batches("dev", per_task, shuffle=True, generator=order)
        streams = {t: stream(t) for t in tasks}
        losses = []
        for _ in ctx.progress(range(steps), desc="fine_pruning fine-tune"):
            batch = [next(streams[t]) for t in tasks]
            with train.autocast(ctx.device):  # one forward of every task's images, each task its own head
                features = ctx.forward(theta, torch.cat([x for x, _ in batch]).to(ctx.device))
                parts = features.split([x.shape[0] for x, _ in batch])
                value = sum(F.cross_entropy(ctx.logits(f, t), y.to(ctx.device))
                            for f, t, (_, y) in zip(parts, tasks, batch)) / len(tasks)
            losses.append(train.recipe_step(opt, sched, value, trainable, recipe.grad_clip))
            with torch.no_grad():  # pruned units stay pruned
                theta[f"{fc}.weight"].mul_(keep_fc[:, None])
                if f"{fc}.bias" in theta:
                    theta[f"{fc}.bias"].mul_(keep_fc)
                theta[f"{proj}.weight"].mul_(keep_fc[None, :])
        tail = losses[-max(1, len(losses) // 10):]
        out = {k: v.detach().cpu() for k, v in theta.items()}
        return out, {"finetune_steps": steps, "finetune_lr": lr, "finetune_final_loss": sum(tail) / len(tail)}


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(FinePruning())
