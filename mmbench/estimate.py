"""``mmbench plan``: the stage graph of a run, what the store already holds, and a
rough GPU-time estimate per stage. Nothing is computed, loaded or downloaded
(keys come from :class:`~mmbench.plan.Runner` / :class:`~mmbench.context.SharedStages`;
"cached" is ``Store.has(key)``, or an ``ok`` result with the current key for cells).

The time model is deliberately simple (docs/presets.md, "Paper presets"):

* fine-tune = steps × batch / training throughput, with steps exactly as
  :func:`mmbench.train.finetune` counts them (epochs × ⌊n_train / batch⌋);
* evaluation = images / evaluation throughput;
* attacks, mergers and defenses cost a documented multiple of those
  (:data:`ATTACK_COST`, :data:`MERGER_IMAGES`, :data:`DEFENSE_COST`).

Throughputs are ASSUMED figures for one H100-class GPU with bf16 autocast and
8 DataLoader workers decoding JPEG/PNG images; they were not measured here.
For ViT-B/32 the loader, not the GPU, is expected to be the bottleneck.
Data download/preparation and loading the OpenAI weights are CPU/network work
and are shown without a GPU estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# images per second on one H100-class GPU (bf16 autocast): (fine-tuning fwd+bwd, evaluation fwd)
THROUGHPUT: dict[str, tuple[float, float]] = {
    "ViT-B-32": (2000.0, 3000.0),
    "ViT-B-16": (1000.0, 2500.0),
    "ViT-L-14": (250.0, 800.0),
}
HEADS_SECONDS = 10.0           # text tower over ~1k prompts, plus moving the model
MERGE_SECONDS = {"ta": 1.0, "ties": 10.0}   # tensor arithmetic on ~88M (B/32) parameters × tasks

# attack cost as (fine-tunes of the adversary task, extra training-image passes, test-set passes)
ATTACK_COST: dict[str, tuple[float, float, float]] = {
    "badnets": (1.0, 0.0, 4.0),
    # stage 1 trigger search (~2000 images × 10 epochs × ~20 ascent steps, early stop) +
    # stage 2: each step also runs half a batch through f_θ and the frozen f_pre (≈ 1.7 steps)
    "badmerging": (1.7, 400_000.0, 4.0),
    "badmerging_off": (1.7, 400_000.0, 4.0),
    "badtv": (3.0, 0.0, 10.0),   # clean + trigger A (+λτ) + trigger B (−λτ) per step; ASR at 3 λ × ±
    "sbv": (3.0, 0.0, 8.0),      # n = 3 BadNets fine-tunes (the clean twin is the shared fine-tune)
    "sbv_sc": (3.0, 0.0, 8.0),
}
DEFAULT_ATTACK_COST = (1.0, 0.0, 4.0)
# merger: training-image passes as a multiple of (steps × batch × tasks) from its parameters
MERGER_IMAGES = {"adamerging": 1.0}
# defense: (fine-tunes of the defender's task, once per seed: IBVS caches its injected model;
#           training-image passes per (step × batch × task): DAM's mask, λ and δ updates + final merge)
DEFENSE_COST = {"none": (0.0, 0.0), "ibvs": (1.0, 0.0), "dam": (0.0, 5.0)}
# defenses that hand the merger the cell's own inputs (their cells share one merge stage)
POST_PROCESSING = {"none", "ibvs"}


def arch_throughput(model_name: str) -> tuple[float, float] | None:
    """(train, eval) images/s for an open_clip model name (``-quickgelu`` ignored); None if unknown."""
    return THROUGHPUT.get(model_name.removesuffix("-quickgelu"))


@dataclass
class Row:
    kind: str           # data | base | heads | finetune | attack | cell
    label: str
    key: str
    cached: bool
    seconds: float | None   # estimated GPU seconds, None: not GPU work / unknown
    needs: str = ""
    note: str = ""


def task_sizes(shared, task: str) -> tuple[int | None, int | None, str]:
    """(train, test) images of a task, and where the numbers come from (no download)."""
    from .hf import DEV_FRACTION, DEV_MAX, SIZE_HINTS

    spec = shared.preset.task(task)
    if spec.n_train is not None and spec.n_test is not None:
        return spec.n_train, spec.n_test, "preset"
    key = shared.data_key(task)
    if shared.store.has(key):
        loaded = shared.store.load(key)
        if loaded:
            sizes = loaded[1].get("sizes", {})
            if "train" in sizes and "test" in sizes:
                return sizes["train"], sizes["test"], "data stage"
    hint = SIZE_HINTS.get(spec.source_args.get("path", ""))
    if hint is None:
        return spec.n_train, spec.n_test, "unknown"
    train, test = hint
    dev = spec.n_dev if spec.n_dev is not None else min(DEV_MAX, int(round(DEV_FRACTION * train)))
    n_train = spec.n_train if spec.n_train is not None else train - dev - (spec.n_pretrain or 0)
    return n_train, (spec.n_test if spec.n_test is not None else test), "size hint"


def finetune_images(shared, task: str, n_train: int | None) -> int | None:
    if n_train is None:
        return None
    recipe = shared.recipe(task)
    steps = max(1, int(round(recipe.epochs * max(1, n_train // recipe.batch_size))))
    return steps * recipe.batch_size


def plan_rows(runner, cells) -> list[Row]:
    """Every stage the cells need, in run order, with cache state and estimate."""
    shared, preset, store = runner.shared, runner.preset, runner.store
    speed = arch_throughput(preset.model.name)
    train_ips, eval_ips = speed if speed else (None, None)

    def gpu(train_images: float = 0.0, eval_images: float = 0.0) -> float | None:
        if speed is None:
            return None
        return train_images / train_ips + eval_images / eval_ips

    sizes = {t: task_sizes(shared, t) for t in preset.task_names}
    ft_images = {t: finetune_images(shared, t, sizes[t][0]) for t in preset.task_names}
    unknown = [t for t in preset.task_names if ft_images[t] is None or sizes[t][1] is None]
    rows: list[Row] = []
    for t in preset.task_names:
        n_train, n_test, where = sizes[t]
        rows.append(Row("data", f"data[{t}]", shared.data_key(t), store.has(shared.data_key(t)), None,
                        note=f"train {n_train if n_train is not None else '?'} / test "
                             f"{n_test if n_test is not None else '?'} ({where}); download + prepare, CPU"))
    base_needs = ", ".join(f"data[{t}]" for t in preset.task_names) if preset.model.pretrain_steps else ""
    rows.append(Row("base", "base", shared.base_key(), store.has(shared.base_key()), None, base_needs,
                    note=f"{preset.model.name} '{preset.model.pretrained}'" if preset.model.pretrained
                    else "contrastive pretraining (CPU preset)"))
    rows.append(Row("heads", f"heads ({preset.heads})", shared.heads_key(), store.has(shared.heads_key()),
                    HEADS_SECONDS if speed and preset.heads == "zeroshot" else None, "base, data"))
    seeds = sorted({c.seed for c in cells})
    for seed in seeds:
        for t in preset.task_names:
            key = shared.finetune_key(t, seed)
            images = ft_images[t]
            rows.append(Row("finetune", f"finetune[{t}, seed {seed}]", key, store.has(key),
                            gpu(images) if images is not None else None, f"base, heads, data[{t}]",
                            note=f"{images // shared.recipe(t).batch_size} steps" if images else ""))
    test_images = sum(s[1] or 0 for s in sizes.values())
    for name in dict.fromkeys(c.attack for c in cells):
        if name == "none":
            continue
        cost = ATTACK_COST.get(name, DEFAULT_ATTACK_COST)
        adversary = preset.adversary_task
        for seed in seeds:
            key = runner.attack_key(name, seed)
            images = ft_images.get(adversary)
            seconds = (gpu(cost[0] * images + cost[1], cost[2] * (sizes[adversary][1] or 0))
                       if images is not None else None)
            rows.append(Row("attack", f"attack {name} (seed {seed})", key, store.has(key), seconds,
                            f"base, heads, finetune[{adversary}, seed {seed}]",
                            note="" if name in ATTACK_COST else "unknown attack: assumed one fine-tune"))
    charged: set[tuple] = set()
    for cell in cells:
        key = runner.cell_key(cell)
        existing = store.load_result(preset.name, cell.id)
        cached = bool(existing and existing.get("status") == "ok" and existing.get("key") == key)
        eval_images = test_images + (0 if cell.attack == "none" else sizes[preset.adversary_task][1] or 0)
        train_images = 0.0
        merger = runner.params("merger", cell.merger)
        steps_images = merger.get("steps", 0) * merger.get("batch_size", 0) * len(preset.task_names)
        # the merge of the cell's own vectors is a stage shared by the defenses that
        # post-process it; a defense that changes the vectors (DAM) merges on its own
        merge_id = ("merge", cell.attack, cell.merger, cell.seed)
        fixed = 0.0
        if cell.defense not in POST_PROCESSING or merge_id not in charged:
            if cell.defense in POST_PROCESSING:
                charged.add(merge_id)
            train_images += MERGER_IMAGES.get(cell.merger, 0.0) * steps_images
            fixed = MERGE_SECONDS.get(cell.merger, 0.0)
        finetunes, passes = DEFENSE_COST.get(cell.defense, (0.0, 0.0))
        if finetunes and (cell.defense, cell.seed) not in charged:
            charged.add((cell.defense, cell.seed))
            defender = preset.task_names[-1]
            train_images += finetunes * (ft_images[defender] or 0)
        if passes and (cell.defense, cell.attack, cell.seed) not in charged:  # DAM's mask: once per attack
            charged.add((cell.defense, cell.attack, cell.seed))
            d = runner.params("defense", cell.defense)
            train_images += passes * d.get("steps", 0) * d.get("batch_size", 0) * len(preset.task_names)
        seconds = gpu(train_images, eval_images)
        needs = f"finetune[*, seed {cell.seed}]" + ("" if cell.attack == "none"
                                                   else f", attack {cell.attack} (seed {cell.seed})")
        rows.append(Row("cell", f"cell {cell.label}", key, cached,
                        seconds + fixed if seconds is not None and not unknown else None, needs))
    if seeds and speed and not unknown:  # the once-per-seed evaluation of fine-tuned and base models
        first = next(i for i, r in enumerate(rows) if r.kind == "cell")
        rows[first].seconds = (rows[first].seconds or 0.0) + len(seeds) * gpu(0, 2 * test_images)
        rows[first].note = "includes evaluating the fine-tuned and base models once per seed"
    return rows


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(runner, cells, rows: list[Row]) -> str:
    """The plan as text: one line per stage, then a per-kind summary and the assumptions."""
    from tabulate import tabulate

    preset = runner.preset
    speed = arch_throughput(preset.model.name)
    lines = [f"mmbench plan: preset {preset.name} ({preset.model.name}, {len(preset.task_names)} tasks, "
             f"batch {preset.recipe.batch_size}), store {runner.store.root}",
             f"{len(cells)} cells: {len({c.attack for c in cells})} attacks × {len({c.merger for c in cells})} "
             f"mergers × {len({c.defense for c in cells})} defenses × {len({c.seed for c in cells})} seeds", ""]
    table = [(r.label, r.key[:12], "yes" if r.cached else "no", fmt_seconds(None if r.cached else r.seconds),
              fmt_seconds(r.seconds), r.needs, r.note) for r in rows]
    lines.append(tabulate(table, headers=["stage", "key", "cached", "to run (GPU)", "stage (GPU)",
                                          "needs", "note"]))
    lines.append("")
    summary = []
    for kind in ("data", "base", "heads", "finetune", "attack", "cell"):
        group = [r for r in rows if r.kind == kind]
        if not group:
            continue
        todo = [r for r in group if not r.cached]
        known = [r.seconds for r in todo if r.seconds is not None]
        summary.append((kind, len(group), len(group) - len(todo), len(todo),
                        fmt_seconds(sum(known)) if known else "—"))
    lines.append(tabulate(summary, headers=["stages", "total", "cached", "to compute", "est. GPU time"]))
    todo = [r.seconds for r in rows if not r.cached and r.seconds is not None]
    cached = sum(r.cached for r in rows)
    lines.append("")
    lines.append(f"{cached} of {len(rows)} stages cached; estimated GPU time for the rest: "
                 f"{fmt_seconds(sum(todo)) if todo else '—'}")
    if speed:
        lines.append(f"assumed throughput for {preset.model.name} on one H100-class GPU (bf16, 8 loader workers): "
                     f"{speed[0]:.0f} img/s fine-tuning, {speed[1]:.0f} img/s evaluation — rough, not measured "
                     f"(mmbench/estimate.py, docs/presets.md)")
    else:
        lines.append(f"no GPU estimate: {preset.model.name} is not a paper architecture "
                     f"({', '.join(THROUGHPUT)}); this preset runs on a CPU")
    return "\n".join(lines)


def summary_seconds(rows: list[Row]) -> dict[str, Any]:
    """{kind: estimated GPU seconds of its uncached stages} (for tests and scripts)."""
    out: dict[str, Any] = {}
    for r in rows:
        if not r.cached and r.seconds is not None:
            out[r.kind] = out.get(r.kind, 0.0) + r.seconds
    return out
