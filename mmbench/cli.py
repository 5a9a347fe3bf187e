"""``mmbench``: run the benchmark, list plugins and presets, build the leaderboard.

A mistake the user can fix (unknown plugin, preset or option value, missing
data) prints one line and exits with status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .plugins import UsageError, load

DEFAULT_STORE = os.environ.get("MMBENCH_STORE", ".mmbench")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def _preset(registry, name: str):
    return registry.get("preset", name).obj


def _with_batch_size(preset, batch_size: int | None):
    """The preset with ``--batch-size`` as its fine-tuning batch (part of the keys: new fine-tunes)."""
    if batch_size is None:
        return preset
    if batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, not {batch_size}")
    from dataclasses import replace

    return replace(preset, recipe=replace(preset.recipe, batch_size=batch_size))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{100 * value:5.1f}"


def cmd_plugins(args) -> int:
    registry = load()
    from tabulate import tabulate

    rows = [(r.kind, r.name, r.distribution, r.version, r.code if r.kind != "preset" else "", r.description)
            for r in registry.all() if r.kind in ("attack", "merger", "defense", "preset")]
    print(tabulate(rows, headers=["kind", "name", "distribution", "version", "code", "description"]))
    for name, why in sorted(registry.broken.items()):
        print(f"broken entry point {name!r}: {why}")
    return 0


def cmd_presets(args) -> int:
    registry = load()
    for name in registry.names("preset"):
        p = registry.get("preset", name).obj
        print(f"{name}: {p.description}\n  tasks: {', '.join(p.task_names)}; adversary {p.adversary_task}, "
              f"target class {p.target_class}; model {p.model.name}")
    return 0


def cmd_run(args) -> int:
    import torch

    from .data import DataError
    from .plan import Runner, WorkerDied, parse_overrides
    from .store import Store

    registry = load()
    for name, why in sorted(registry.broken.items()):
        print(f"mmbench: warning: plugin {name!r} failed to load and is skipped: {why}", file=sys.stderr)
    preset = _with_batch_size(_preset(registry, args.preset), args.batch_size)
    device = _device(args.device)
    if args.threads < 0 or args.jobs < 0:
        raise UsageError("--threads and --jobs must be ≥ 0 (0: automatic)")
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = args.jobs or (1 if device.type == "cuda" else torch.get_num_threads())
    overrides = parse_overrides(args.set or [], registry)
    echo = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    runner = Runner(registry, preset, Store(args.store), device, rerun=args.rerun, overrides=overrides,
                    quiet=args.quiet, echo=echo)
    cells = runner.cells(args.attack, args.merger, args.defense, args.seed)
    echo(f"mmbench {__version__}: preset {preset.name}, {len(cells)} cells on {device}, "
         f"store {args.store}, rerun {args.rerun}, up to {jobs} worker{'s' * (jobs > 1)}")
    start = time.perf_counter()
    counts: dict[str, int] = {}

    def on_result(r: dict) -> None:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        m = r.get("metrics") or {}
        line = (f"{r['attack']:>14} {r['merger']:>12} {r['defense']:>8}  {r['status']:<7} "
                f"ACC {_fmt(m.get('acc'))}  norm {_fmt(m.get('normalized_acc'))}  ASR {_fmt(m.get('asr'))}")
        if r["status"] == "failed":
            line += f"  {r.get('error', '')}"
        print(line, flush=True)

    try:
        runner.run(cells, on_result, jobs=jobs)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    except WorkerDied as exc:
        print(f"mmbench: error: {exc}", file=sys.stderr)
        return 1
    log = runner.shared.log
    seconds = time.perf_counter() - start
    if log.reused:
        shown = [s for s in log.reused if not s.startswith("cell ")]
        cells_reused = len(log.reused) - len(shown)
        parts = ([f"{len(shown)} stages: {', '.join(shown)}"] if shown else []) + (
            [f"{cells_reused} cell results"] if cells_reused else [])
        echo("reused " + "; ".join(parts))
    computed = [f"{label} ({sec:.1f} s)" for label, sec in log.computed]
    if computed:
        echo(f"computed {len(computed)}: {', '.join(computed)}")
    for bad in runner.store.corrupt:
        echo(f"warning: artifact {bad} failed verification and was recomputed")
    echo(f"done in {seconds:.1f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") and args.strict else 0


def cmd_plan(args) -> int:
    import torch

    from .estimate import plan_rows, render
    from .plan import Runner, parse_overrides
    from .store import Store

    registry = load()
    preset = _with_batch_size(_preset(registry, args.preset), args.batch_size)
    overrides = parse_overrides(args.set or [], registry)
    runner = Runner(registry, preset, Store(args.store), torch.device("cpu"), rerun="never",
                    overrides=overrides, quiet=True, echo=lambda m: None)
    cells = runner.cells(args.attack, args.merger, args.defense, args.seed)
    print(render(runner, cells, plan_rows(runner, cells)))
    return 0


def cmd_leaderboard(args) -> int:
    import torch

    from . import leaderboard
    from .plan import Runner
    from .store import Store

    registry = load()
    store = Store(args.store)
    presets = [args.preset] if args.preset else sorted({r.get("preset") for r in store.results()} or {"tiny"})
    expected, results = [], []
    for name in presets:
        p = _preset(registry, name)
        # the key each cell would have now: a stored result with another key was made with
        # other parameters, plugin versions or preset content, and is shown as "stale"
        runner = Runner(registry, p, store, torch.device("cpu"), rerun="never", quiet=True, echo=lambda m: None)
        cells = runner.cells()
        current = {c.id: runner.cell_key(c) for c in cells}
        expected += [(name, c.attack, c.merger, c.defense, c.seed) for c in cells]
        for r in store.results(name):
            if r.get("cell") in current and r.get("key") != current[r["cell"]]:
                r = {**r, "status": "stale"}
            results.append(r)
    df = leaderboard.table(results, expected)
    notes = [f"Generated by `mmbench leaderboard` (mmbench {__version__}) from {len(results)} stored cell "
             f"results; each cell's JSON records its key, plugin versions, parameters and timings."]
    for name in presets:
        p = _preset(registry, name)
        overrides = "; ".join(f"{k}: {v}" for k, v in sorted(p.plugin_params.items())) or "none"
        notes.append(f"Preset `{name}`: {p.description}. Plugin parameters set by the preset: {overrides}.")
    md, csv = leaderboard.write(df, Path(args.out), notes="\n\n".join(notes))
    print(f"wrote {md} and {csv} ({len(df)} cells: " +
          ", ".join(f"{n} {s}" for s, n in df.status.value_counts().items()) + ")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mmbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run cells of the attack × merger × defense cross product")
    run.add_argument("--preset", default="tiny")
    run.add_argument("--attack", action="append", help="attack name (repeatable; 'none' = no attack)")
    run.add_argument("--merger", action="append", help="merger name (repeatable)")
    run.add_argument("--defense", action="append", help="defense name (repeatable)")
    run.add_argument("--seed", action="append", type=int, help="seed (repeatable; default: the preset's)")
    run.add_argument("--rerun", default="missing", choices=["missing", "always", "never"],
                     help="missing: compute cells without a current result (default); always: recompute "
                          "the selected cells and their attacks, reusing shared stages; never: only report")
    run.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE",
                     help="override a plugin parameter, e.g. --set ta.lambda=0.5 (value parsed as JSON)")
    run.add_argument("--store", default=DEFAULT_STORE)
    run.add_argument("--device", default="auto", help="auto | cpu | cuda")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads in all (default: torch's choice, the usable cores); "
                          "parallel workers share them")
    run.add_argument("--jobs", type=int, default=0,
                     help="worker processes for the cells, one attack's cells per worker (default: "
                          "1 on a GPU; on a CPU as many as --threads, each with one thread)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--strict", action="store_true", help="exit 1 when a cell failed")
    run.add_argument("--batch-size", type=int, default=None,
                     help="fine-tuning batch size instead of the preset's (changes the fine-tune keys)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="show the stage graph, what is cached and a GPU-time estimate "
                                       "(computes and downloads nothing)")
    plan.add_argument("--preset", default="tiny")
    plan.add_argument("--attack", action="append", help="attack name (repeatable; 'none' = no attack)")
    plan.add_argument("--merger", action="append", help="merger name (repeatable)")
    plan.add_argument("--defense", action="append", help="defense name (repeatable)")
    plan.add_argument("--seed", action="append", type=int, help="seed (repeatable; default: the preset's)")
    plan.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE", help="as for run")
    plan.add_argument("--batch-size", type=int, default=None, help="as for run")
    plan.add_argument("--store", default=DEFAULT_STORE)
    plan.set_defaults(func=cmd_plan)

    plugins = sub.add_parser("plugins", help="list installed attacks, mergers, defenses and presets")
    plugins.set_defaults(func=cmd_plugins)
    presets = sub.add_parser("presets", help="describe the installed presets")
    presets.set_defaults(func=cmd_presets)

    board = sub.add_parser("leaderboard", help="write leaderboard/README.md and results.csv")
    board.add_argument("--preset", default=None, help="default: every preset with stored results")
    board.add_argument("--store", default=DEFAULT_STORE)
    board.add_argument("--out", default="leaderboard")
    board.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"mmbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
