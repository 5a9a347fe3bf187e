"""``mmbench plan``: the stage graph of a run, what the store already holds, and a
rough GPU-time estimate per stage. Nothing is computed, loaded or downloaded
(the stages and keys are the planned graph's, :func:`mmbench.graph.plan`; "cached" is
``Store.has(key)``, or an ``ok`` result with the current key for cells).

The time model is deliberately simple (docs/presets.md, "Paper presets"):

* fine-tune = steps × batch / training throughput, with steps exactly as
  :func:`mmbench.train.finetune` counts them (epochs × ⌊n_train / batch⌋);
* evaluation = images / evaluation throughput;
* attacks, mergers and defenses estimate their own work in images through the model
  (``estimate(params, sizes) -> Cost`` on each plugin, :class:`mmbench.api.Cost`); the
  harness holds no plugin names.

Throughputs are ASSUMED figures for one H100-class GPU with bf16 autocast and
8 DataLoader workers decoding JPEG/PNG images; they were not measured here.
For ViT-B/32 the loader, not the GPU, is expected to be the bottleneck.
``mmbench plan --throughput FILE`` (or ``$MMBENCH_THROUGHPUT``) replaces them with the
figures ``benchmarks/gpu_throughput.py`` measured on a GPU (recorded with the GPU's name);
an architecture the file lacks keeps its assumed figure, marked as assumed.
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
THROUGHPUT_FORMAT = "mmbench-throughput/1"   # what benchmarks/gpu_throughput.py writes


@dataclass(frozen=True)
class Measured:
    """Throughputs measured by ``benchmarks/gpu_throughput.py``: {arch: (train, eval) img/s}."""

    path: str
    device: str
    date: str
    speeds: dict[str, tuple[float, float]]
    dry_run: bool = False

    def get(self, model_name: str) -> tuple[float, float] | None:
        return self.speeds.get(model_name.removesuffix("-quickgelu"))


def load_throughput(path: str) -> Measured:
    """Read a throughput file; a missing or malformed one is a one-line UsageError."""
    import json

    from .plugins import UsageError

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except OSError as exc:
        raise UsageError(f"--throughput {path}: cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--throughput {path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != THROUGHPUT_FORMAT:
        raise UsageError(f"--throughput {path}: not a {THROUGHPUT_FORMAT} file (benchmarks/gpu_throughput.py "
                         "writes one)")
    speeds: dict[str, tuple[float, float]] = {}
    for arch, m in (data.get("models") or {}).items():
        try:
            train, evaluation = float(m["train_images_per_s"]), float(m["eval_images_per_s"])
        except (KeyError, TypeError, ValueError):
            continue  # an architecture that failed (e.g. out of memory) keeps its assumed figure
        if train > 0 and evaluation > 0:
            speeds[arch.removesuffix("-quickgelu")] = (train, evaluation)
    return Measured(str(path), str(data.get("device", "unknown device")), str(data.get("date", "")), speeds,
                    bool(data.get("dry_run")))

def arch_throughput(model_name: str, measured: Measured | None = None) -> tuple[float, float] | None:
    """(train, eval) images/s for an open_clip model name (``-quickgelu`` ignored): the measured
    figure when ``measured`` has one, else the assumed one; None if unknown."""
    if measured is not None and measured.get(model_name) is not None:
        return measured.get(model_name)
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


def task_sizes(keys, store, task: str) -> tuple[int | None, int | None, int | None, str]:
    """(train, dev, test) images of a task, and where the numbers come from (no download)."""
    from .hf import DEV_FRACTION, DEV_MAX, SIZE_HINTS

    spec = keys.preset.task(task)
    if spec.n_train is not None and spec.n_test is not None:
        return spec.n_train, spec.n_dev, spec.n_test, "preset"
    key = keys.data(task)
    if store.has(key):
        loaded = store.load(key)
        if loaded:
            sizes = loaded[1].get("sizes", {})
            if "train" in sizes and "test" in sizes:
                return sizes["train"], sizes.get("dev"), sizes["test"], "data stage"
    hint = SIZE_HINTS.get(spec.source_args.get("path", ""))
    if hint is None:
        return spec.n_train, spec.n_dev, spec.n_test, "unknown"
    train, test = hint
    dev = spec.n_dev if spec.n_dev is not None else min(DEV_MAX, int(round(DEV_FRACTION * train)))
    n_train = spec.n_train if spec.n_train is not None else train - dev - (spec.n_pretrain or 0)
    return n_train, dev, (spec.n_test if spec.n_test is not None else test), "size hint"


def finetune_images(keys, task: str, n_train: int | None) -> int | None:
    if n_train is None:
        return None
    recipe = keys.recipe(task)
    steps = max(1, int(round(recipe.epochs * max(1, n_train // recipe.batch_size))))
    return steps * recipe.batch_size


def plan_rows(graph, store, registry, measured: Measured | None = None) -> list[Row]:
    """Every stage of ``graph``, in run order, with cache state and estimate. A plugin's
    part is its own :meth:`~mmbench.api.Attack.estimate` (None: unknown, shown as —)."""
    from .api import Sizes
    from .graph import StageKeys
    from .run import stored

    preset = graph.preset
    keys = StageKeys(preset)
    speed = arch_throughput(preset.model.name, measured)

    def gpu(train_images: float = 0.0, eval_images: float = 0.0) -> float | None:
        if speed is None:
            return None
        return train_images / speed[0] + eval_images / speed[1]

    found = {t: task_sizes(keys, store, t) for t in preset.task_names}
    ft_images = {t: finetune_images(keys, t, found[t][0]) for t in preset.task_names}
    sizes = Sizes(preset.task_names, ft_images, {t: found[t][2] for t in preset.task_names},
                  {t: found[t][1] for t in preset.task_names}, preset.adversary_task)
    unknown = any(v is None for v in ft_images.values()) or any(found[t][2] is None for t in preset.task_names)
    test_images = sum(found[t][2] or 0 for t in preset.task_names)
    dev_images = sum(found[t][1] or 0 for t in preset.task_names)
    charged: set[tuple] = set()

    def plugin_cost(kind: str, name: str, stage) -> tuple[float | None, str]:
        if kind == "attack" and name == "none":
            return 0.0, ""
        reg = registry.get(kind, name)
        cost = reg.obj.estimate(dict(graph.params[(kind, name)]), sizes)
        if cost is None:
            return (None, f"{name}: no estimate") if kind == "attack" else (0.0, "")
        share = {"cell": None, "seed": (kind, name, stage.seed),
                 "attack": (kind, name, stage.attack, stage.seed)}.get(cost.shared_by)
        if share is not None:
            if share in charged:
                return 0.0, ""
            charged.add(share)
        seconds = gpu(cost.train_images, cost.eval_images)
        return (None if seconds is None else seconds + cost.seconds), cost.note

    rows: list[Row] = []
    for stage in graph.stages.values():
        cached = stored(store, stage, graph)
        needs = ", ".join(graph.stage(i).label for i in stage.inputs[:3]) + (
            f" (+{len(stage.inputs) - 3})" if len(stage.inputs) > 3 else "")
        seconds, note = None, ""
        if stage.kind == "data":
            n_train, n_dev, n_test, where = found[stage.task]
            note = (f"train {n_train if n_train is not None else '?'} / test {n_test if n_test is not None else '?'}"
                    f" ({where}); download + prepare, CPU")
        elif stage.kind == "base":
            note = (f"{preset.model.name} '{preset.model.pretrained}'" if preset.model.pretrained
                    else "contrastive pretraining (CPU preset)")
        elif stage.kind == "heads":
            seconds = HEADS_SECONDS if speed and preset.heads == "zeroshot" else None
        elif stage.kind == "finetune":
            images = ft_images[stage.task]
            seconds = gpu(images) if images is not None else None
            note = f"{images // keys.recipe(stage.task).batch_size} steps" if images else ""
        elif stage.kind == "eval-finetuned":
            seconds = gpu(0, 2 * test_images + dev_images) if not unknown else None
        elif stage.kind == "attack":
            seconds, note = plugin_cost("attack", stage.attack, stage)
        elif stage.kind == "merge":
            seconds, note = plugin_cost("merger", stage.merger, stage)
        elif stage.kind == "cell":
            cell = stage.cell
            merged_here = not any(graph.stage(i).kind == "merge" for i in stage.inputs)
            parts = [plugin_cost("defense", cell.defense, stage)]
            if merged_here:
                parts.append(plugin_cost("merger", cell.merger, stage))
            eval_images = test_images + dev_images + (0 if cell.attack == "none"
                                                      else found[preset.adversary_task][2] or 0)
            evaluation = gpu(0, eval_images) if not unknown else None
            known = [p[0] for p in parts] + [evaluation]
            seconds = None if any(v is None for v in known) else sum(known)
            note = "; ".join(p[1] for p in parts if p[1])
        elif stage.kind == "detect":
            seconds, note = plugin_cost("detector", stage.params["detector"], stage)
        elif stage.kind == "screen":  # a merge of all but one contributor, evaluated as a cell is
            merge_seconds, note = plugin_cost("merger", stage.merger, stage)
            evaluation = gpu(0, test_images + dev_images) if not unknown else None
            seconds = None if merge_seconds is None or evaluation is None else merge_seconds + evaluation
        rows.append(Row(stage.kind, stage.label, stage.key, cached, seconds, needs, note))
    return rows


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(graph, store, rows: list[Row], measured: Measured | None = None) -> str:
    """The plan as text: one line per stage, then a per-kind summary and the assumptions."""
    from tabulate import tabulate

    preset = graph.preset
    cells = graph.cells
    speed = arch_throughput(preset.model.name, measured)
    lines = [f"mmbench plan: preset {preset.name} ({preset.model.name}, {len(preset.task_names)} tasks, "
             f"batch {preset.recipe.batch_size}), store {store.root}",
             f"{len(cells)} cells: {len({c.attack for c in cells})} attacks × {len({c.merger for c in cells})} "
             f"mergers × {len({c.defense for c in cells})} defenses × {len({c.seed for c in cells})} seeds"
             + (f" × {n} settings" if (n := len({c.setting for c in cells})) > 1 else ""), ""]
    table = [(r.label, r.key[:12], "yes" if r.cached else "no", fmt_seconds(None if r.cached else r.seconds),
              fmt_seconds(r.seconds), r.needs, r.note) for r in rows]
    lines.append(tabulate(table, headers=["stage", "key", "cached", "to run (GPU)", "stage (GPU)",
                                          "needs", "note"]))
    lines.append("")
    summary = []
    for kind in ("data", "base", "heads", "finetune", "eval-finetuned", "attack", "merge", "cell", "detect",
                 "screen"):
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
    if speed and measured is not None and measured.get(preset.model.name) is not None:
        lines.append(f"measured throughput for {preset.model.name} on {measured.device} ({measured.path}, "
                     f"{measured.date}; bf16, synthetic decoded batches, image decoding not included): "
                     f"{speed[0]:.0f} img/s fine-tuning, {speed[1]:.0f} img/s evaluation"
                     + (" — a --cpu-tiny dry run, not a GPU measurement" if measured.dry_run else ""))
    elif speed:
        if measured is not None:
            lines.append(f"{measured.path} has no figure for {preset.model.name}: using the assumed one")
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
