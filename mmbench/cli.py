"""``mmbench``: run the benchmark, list plugins and presets, build the leaderboard.

A mistake the user can fix (unknown plugin, preset or option value, missing
data) prints one line and exits with status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .plugins import UsageError
from .plugins import load as _load_registry

DEFAULT_STORE = os.environ.get("MMBENCH_STORE", ".mmbench")


def load():
    """The plugin registry; the first time a registry is loaded, one ``mmbench: warning:`` line on
    stderr per plugin entry point it skipped (import error, bad hook, bad or clashing name)."""
    registry = _load_registry()
    if not getattr(registry, "warned", False):
        registry.warned = True
        for line in registry.problems:
            print(f"mmbench: warning: {line}", file=sys.stderr)
    return registry


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

    if args.params:
        return _plugin_params(registry, args.params, args.preset)
    if args.preset:
        raise UsageError("plugins --preset goes with --params NAME")
    from .graph import opt_in

    def mark(r) -> str:
        if r.kind == "preset":
            return f" [opt-in here: {', '.join(r.obj.opt_in)}]" if getattr(r.obj, "opt_in", ()) else ""
        if opt_in(r):
            return f" [opt-in: runs when named, e.g. --{r.kind} {r.name}]"
        where = [p.name for p in registry.all() if p.kind == "preset" and r.name in getattr(p.obj, "opt_in", ())]
        return f" [opt-in on {', '.join(where)}: runs there when named]" if where else ""

    rows = [(r.kind, r.name, r.distribution, r.version, r.code if r.kind != "preset" else "", r.description + mark(r))
            for r in registry.all() if r.kind in ("attack", "merger", "defense", "detector", "preset")]
    print(tabulate(rows, headers=["kind", "name", "distribution", "version", "code", "description"]))
    return 0


def _plugin_params(registry, name: str, preset_name: str | None) -> int:
    """``mmbench plugins --params NAME``: the plugin's declared parameters, and what the preset sets."""
    from tabulate import tabulate

    from .params import allowed, declared, show

    kinds = ("attack", "merger", "defense", "detector")
    found = [registry.get(k, name) for k in kinds if name in registry.names(k)]
    if not found:
        from .plugins import unknown_name
        raise unknown_name("plugin", name, sorted({n for k in kinds for n in registry.names(k)}))
    if preset_name is None:  # the default preset, when it is installed
        preset_name = "tiny" if "tiny" in registry.names("preset") else None
    preset = _preset(registry, preset_name) if preset_name else None
    for i, reg in enumerate(found):
        params = declared(reg.obj)
        overrides = preset.plugin_params.get(reg.name, {}) if preset else {}
        print(("\n" if i else "") + f"{reg.kind} {reg.name} ({reg.distribution} {reg.version}): {reg.description}")
        if not params:
            print("no parameters")
            continue
        headers = ["parameter", "type", "default", "allowed"] + ([f"preset {preset.name}"] if overrides else [])
        rows = [[key, p.type, show(p.default), allowed(p)]
                + ([show(overrides[key]) if key in overrides else ""] if overrides else []) + [p.help]
                for key, p in params.items()]
        print(tabulate(rows, headers=headers + ["meaning"], disable_numparse=True))
    return 0


def cmd_presets(args) -> int:
    registry = load()
    for name in registry.names("preset"):
        p = registry.get("preset", name).obj
        print(f"{name}: {p.description}\n  tasks: {', '.join(p.task_names)}; adversary {p.adversary_task}, "
              f"target class {p.target_class}; model {p.model.name}; seeds {', '.join(map(str, p.seeds))}")
        if p.plugin_params:
            print("  sets: " + "; ".join(f"{plugin}." + ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
                                         for plugin, values in sorted(p.plugin_params.items())))
        if p.opt_in:
            print(f"  opt-in (run only when named): {', '.join(p.opt_in)}")
    return 0


def _threads(value: int) -> None:
    """``--threads``: kept for old command lines; every stage runs single-threaded on a CPU."""
    if value not in (0, 1):
        raise UsageError(f"--threads {value}: every stage runs single-threaded on a CPU, so that no figure "
                         "depends on the machine's thread count; use --jobs N to use N cores")


def _executor(registry, name: str, jobs: int, address: str | None):
    if name not in registry.names("executor"):
        from .plugins import unknown_name
        raise unknown_name("executor", name, registry.names("executor"), registry)
    options = {"jobs": jobs}
    if address is not None:
        options["address"] = address
    try:
        return registry.get("executor", name).obj(**options)
    except ImportError as exc:
        raise UsageError(f"executor {name!r} needs a package that is not installed ({exc}); "
                         f"pip install 'mmbench[{name}]'") from None


def _sweep_graphs(args, registry, preset) -> tuple[list[dict], list]:
    """(the sweep's settings, one planned graph per setting) of ``run`` and ``plan``: [{}] and
    one graph without --sweep; a sweep has no detection track unless --detector asks."""
    from . import sweeps
    from .graph import parse_overrides, plan

    overrides = parse_overrides(args.set or [], registry)
    settings = sweeps.parse(args.sweep, registry) if args.sweep else [{}]
    detectors = _detectors(args) if not args.sweep or args.detector else []
    return settings, [plan(registry, preset, args.attack, args.merger, args.defense, args.seed,
                           sweeps.merge_overrides(overrides, extra), detectors=detectors) for extra in settings]


def cmd_run(args) -> int:
    import torch

    from .data import DataError
    from .execute import Runtime
    from .executors.local import WorkerDied
    from .run import execute_graph
    from .store import Store

    registry = load()
    preset = _with_batch_size(_preset(registry, args.preset), args.batch_size)
    device = _device(args.device)
    if args.jobs < 0:
        raise UsageError("--jobs must be ≥ 0 (0: automatic)")
    _threads(args.threads)
    if args.address and args.executor != "ray":
        raise UsageError("--address goes with --executor ray")
    jobs = args.jobs or (1 if device.type == "cuda" else (os.cpu_count() or 1))
    settings, graphs = _sweep_graphs(args, registry, preset)
    store = Store(args.store)
    if args.rerun != "never" and hasattr(store, "check_writable"):
        store.check_writable()
    executor = _executor(registry, args.executor, jobs, args.address)
    echo = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    where = f"executor {args.executor}" + (f" at {args.address}" if args.address else "") + (
        f", up to {jobs} worker{'s' * (jobs > 1)}" if args.executor == "local" else "")
    start = time.perf_counter()
    counts: dict[str, int] = {}
    base_shown: set[int] = set()
    seeds_run = args.seed or preset.seeds  # several seeds or sweep values: each line says which

    def on_result(r: dict) -> None:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        m = r.get("metrics") or {}
        if m.get("base_acc") is not None and r.get("seed") not in base_shown:
            base_shown.add(r.get("seed"))
            print(f"{'(base model, seed ' + str(r.get('seed')) + ')':>38}           ACC {_fmt(m['base_acc'])}"
                  "  (every merge should gain over this)", flush=True)
        line = (f"{r['attack']:>14} {r['merger']:>12} {r['defense']:>8}  {r['status']:<7} "
                f"ACC {_fmt(m.get('acc'))}  norm {_fmt(m.get('normalized_acc'))}  ASR {_fmt(m.get('asr'))}"
                + (f"  gain {_fmt(m['acc_gain_over_base'])}" if m.get("acc_gain_over_base") is not None else "")
                + (f"  [{_which(r)}]" if len(seeds_run) > 1 or any(settings) else ""))
        if r["status"] == "failed":
            line += f"  {r.get('error', '')} (traceback in {store.result_path(preset.name, r['cell'])})"
        print(line, flush=True)

    runtime = Runtime(str(store.root), str(device), quiet=args.quiet)
    reports = []
    for i, (graph, extra) in enumerate(zip(graphs, settings)):
        cells = list(graph.cells)
        n_detect = sum(graph.stage(k).kind == "detect" for k in graph.detection)
        if args.sweep:
            echo(f"sweep {i + 1}/{len(settings)}: {_setting_text(extra)}")
        echo(f"mmbench {__version__}: preset {preset.name}, {len(cells)} cells"
             + (f" + {n_detect} detections ({len(graph.detection) - n_detect} screens)" if n_detect else "")
             + f", {len(graph)} stages on {device}, store {args.store}, rerun {args.rerun}, {where}")
        try:
            reports.append(execute_graph(graph, cells, store, executor, runtime, rerun=args.rerun,
                                         on_result=on_result, echo=echo, registry=registry))
        except DataError as exc:
            raise UsageError(str(exc)) from None
        except WorkerDied as exc:
            print(f"mmbench: error: {exc}", file=sys.stderr)
            return 1
    report = reports[0]
    for more in reports[1:]:  # one account of the whole run
        report.reused += [label for label in more.reused if label not in report.reused]
        report.computed += more.computed
        report.corrupt += more.corrupt
        report.failed_stages += more.failed_stages
        report.detection += more.detection
        for node, labels in more.nodes.items():
            report.nodes.setdefault(node, []).extend(labels)
    seconds = time.perf_counter() - start
    if report.reused:
        shown = [s for s in report.reused if not s.startswith("cell ")]
        cells_reused = len(report.reused) - len(shown)
        parts = ([f"{len(shown)} stages: {', '.join(shown)}"] if shown else []) + (
            [f"{cells_reused} cell results"] if cells_reused else [])
        echo("reused " + "; ".join(parts))
    if report.computed:  # by kind of stage, and the slowest ones
        kinds: dict[str, list[float]] = {}
        for label, sec in report.computed:
            kinds.setdefault(label.split("[")[0].split(" ")[0], []).append(sec)
        slowest = sorted(report.computed, key=lambda c: -c[1])[:5]
        echo(f"computed {len(report.computed)} stages (" + ", ".join(
            f"{len(v)} {k}" for k, v in kinds.items()) + f"; {sum(s for _, s in report.computed):.0f} s of work), "
             "slowest: " + ", ".join(f"{label} {sec:.1f} s" for label, sec in slowest))
    if len(report.nodes) > 1:
        echo("ran on " + "; ".join(f"{node}: {len(labels)} stages" for node, labels in sorted(report.nodes.items())))
    for line in _detection_lines(report.detection):
        print(line, flush=True)
    for label, error in report.failed_stages:
        echo(f"failed: {label}: {error}")
    for bad in report.corrupt:
        echo(f"warning: artifact {bad} failed verification and was recomputed")
    echo(f"done in {seconds:.1f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") or report.failed_stages else 0


def _detectors(args) -> list[str] | None:
    """``--detector``: the names; ``none`` (alone): no detection track; not given: every installed
    detector for the full cross product, none for a slice (--attack, --merger or --defense)."""
    chosen = getattr(args, "detector", None)
    if chosen:
        if "none" in chosen:
            if len(chosen) > 1:
                raise UsageError("--detector none means no detection track; do not combine it with detectors")
            return []
        return chosen
    return [] if (args.attack or args.merger or args.defense) else None


def _detection_lines(results: list[dict]) -> list[str]:
    """One line per detect result (who was flagged, AUROC) and per screen (the merge without it)."""
    lines = []
    for r in sorted(results, key=lambda r: (r.get("kind") != "detect", r.get("detector", ""), r.get("attack", ""),
                                            r.get("merger", ""), r.get("seed", 0))):
        head = f"{r.get('detector', '?'):>16} {r.get('attack', '?'):>12}"
        if r.get("kind") == "detect":
            auc = r.get("auroc")
            lines.append(f"{head}  seed {r.get('seed')}  flags {r.get('flagged')}"
                         + (f" (malicious: {', '.join(r.get('malicious_all') or [r.get('malicious')])}, "
                            f"rank {r.get('rank_of_malicious')}, AUROC {auc:.2f})" if auc is not None
                            else " (every contributor malicious: no AUROC)" if r.get("malicious")
                            else " (no attack)"))
        else:
            m = r.get("metrics") or {}
            lines.append(f"{head} {r.get('merger', '?'):>10}  seed {r.get('seed')}  without {r.get('left_out')}: "
                         f"ACC {_fmt(m.get('acc'))}  norm {_fmt(m.get('normalized_acc'))}  ASR {_fmt(m.get('asr'))}")
    return lines


def _setting_text(setting: dict) -> str:
    """'ta.lambda=0.5, merge.tasks=3': a --set/--sweep setting ({plugin: {param: value}}) as typed."""
    return ", ".join(f"{p}.{k}={json.dumps(v)}" for p, kv in setting.items() for k, v in kv.items())


def _which(r: dict) -> str:
    """'seed 2, merge.tasks=3': what tells apart the lines of a run over several seeds or a sweep."""
    setting = r.get("setting")
    return ", ".join([f"seed {r.get('seed')}"] + ([_setting_text(setting)] if isinstance(setting, dict)
                                                  and setting else []))


def cmd_plan(args) -> int:
    from dataclasses import replace

    from .estimate import load_throughput, plan_rows, render
    from .store import Store

    path = args.throughput if args.throughput is not None else os.environ.get("MMBENCH_THROUGHPUT") or None
    measured = load_throughput(path) if path else None
    registry = load()
    preset = _with_batch_size(_preset(registry, args.preset), args.batch_size)
    settings, graphs = _sweep_graphs(args, registry, preset)
    store = Store(args.store)
    rows, seen = [], set()
    for graph in graphs:  # a stage the settings share (fine-tunes, attacks) is listed and priced once
        for row in plan_rows(graph, store, registry, measured):
            if row.key not in seen:
                seen.add(row.key)
                rows.append(row)
    whole = replace(graphs[0], cells=tuple(c for g in graphs for c in g.cells)) if len(graphs) > 1 else graphs[0]
    text = render(whole, store, rows, measured)
    if args.sweep:
        shown = "; ".join(_setting_text(extra) for extra in settings)
        text = f"sweep of {len(settings)} settings: {shown}\n" + text
    print(text)
    return 0


def cmd_tune(args) -> int:
    import torch

    from .graph import parse_overrides
    from .store import Store
    from .tune import Tuner, choose_attack, choose_merger, grid_points, parse_grid, render

    registry = load()
    preset = _preset(registry, args.preset)
    if bool(args.merger) == bool(args.attack):
        raise UsageError("tune wants exactly one of --merger NAME or --attack NAME")
    kind, name = ("merger", args.merger) if args.merger else ("attack", args.attack)
    registry.get(kind, name)
    if not args.grid:
        raise UsageError("tune wants at least one --grid PARAM=V1,V2,...")
    _threads(args.threads)
    seeds = args.seed or list(preset.seeds)
    echo = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    tuner = Tuner(registry, preset, Store(args.store), _device(args.device), seeds,
                  parse_overrides(args.set or [], registry), echo=echo)
    points = grid_points(parse_grid(args.grid))
    if kind == "merger":
        rows = tuner.merger(name, points)
        chosen = choose_merger(rows)
    else:
        rows = tuner.attack(name, points)
        chosen = choose_attack(rows, args.asr_target, args.acc_tolerance)
    print(render(kind, name, rows, chosen, seeds))
    if args.json:
        from .store import atomic_write_bytes

        rule = ({"rule": "max mean normalised dev ACC of the clean merge"} if kind == "merger" else
                {"rule": "first grid point with dev ASR >= asr_target and dev ACC within acc_tolerance "
                         "of the clean twin's", "asr_target": args.asr_target, "acc_tolerance": args.acc_tolerance})
        atomic_write_bytes(Path(args.json), json.dumps(
            {"preset": preset.name, "kind": kind, "name": name, "seeds": seeds, **rule,
             "chosen": chosen["point"], "rows": rows, "mmbench": __version__}, indent=1).encode())
    return 0


def _stored_results(registry, store, presets: list[str],
                    overrides: dict | None = None) -> tuple[list[tuple], list[dict]]:
    """(expected cells, stored results) of ``presets``, reading the store only. Expected: the
    installed cross product over each preset's declared seeds, as (preset, attack, merger,
    defense, seed). A stored result whose key is not the key its cell would have now (made
    with other parameters, plugin versions or preset content) comes back with status "stale";
    the current keys are computed for the declared seeds and every seed the store holds, with
    ``overrides`` (``--set``) applied: results made with those settings are then the current ones."""
    from .graph import default_names, plan_all

    installed = {(k, n) for k in ("attack", "merger", "defense") for n in registry.names(k)}
    expected, results = [], []
    for name in presets:
        p = _preset(registry, name)
        default = {("attack", "none")} | {(k, n) for k in ("attack", "merger", "defense")
                                           for n in default_names(registry, k, p)}
        stored = store.results(name)
        seeds = sorted(set(p.seeds) | {r["seed"] for r in stored if isinstance(r.get("seed"), int)})
        graph = plan_all(registry, p, seeds=seeds, overrides=overrides or {})  # opt-in plugins' keys too
        current = {c.id: graph.cell_keys[c] for c in graph.cells}
        expected += [(name, c.attack, c.merger, c.defense, c.seed) for c in graph.cells if c.seed in p.seeds
                     and {("attack", c.attack), ("merger", c.merger), ("defense", c.defense)} <= default]
        for r in stored:
            cell = r.get("cell")
            if cell in current:
                if r.get("status") != "unreadable" and r.get("key") != current[cell]:
                    r = {**r, "status": "stale"}
            elif r.get("status") == "unreadable":
                pass
            elif any((k, r.get(k)) not in installed for k in ("merger", "defense")) or (
                    r.get("attack") != "none" and ("attack", r.get("attack")) not in installed):
                r = {**r, "status": "not installed"}
            else:
                continue  # made with other settings (--set): shown when those are selected
            results.append(r)
    return expected, results


def _presets_to_show(args, store) -> list[str]:
    return [args.preset] if args.preset else sorted({r.get("preset") for r in store.results()} or {"tiny"})


def _detection_entries(registry, store, presets: list[str], overrides: dict | None = None) -> dict[str, list[dict]]:
    """The detection track's entries of each preset over its declared seeds (every installed
    detector on every installed attack and merger): stored results, or stubs saying stale / not run."""
    from . import detection_report
    from .graph import plan

    out = {}
    for name in presets:
        p = _preset(registry, name)
        graph = plan(registry, p, seeds=list(p.seeds), overrides=overrides or {})
        out[name] = detection_report.collect(store, graph, p.seeds)
    return out


def cmd_leaderboard(args) -> int:
    from . import detection_report, findings, leaderboard, site, submissions, sweeps
    from .store import Store

    from .graph import parse_overrides

    registry = load()
    store = Store(args.store)
    store.read_results_once()  # read per preset four times below
    presets = _presets_to_show(args, store)
    overrides = parse_overrides(args.set or [], registry)
    expected, results = _stored_results(registry, store, presets, overrides)
    detection = _detection_entries(registry, store, presets, overrides)
    swept = {name: sweeps.current_results(registry, store, _preset(registry, name)) for name in presets}
    sweep_points = {name: sweeps.collect(registry, store, _preset(registry, name), swept[name]) for name in presets}
    disagreements = leaderboard.attack_disagreements(
        [r for r in results if r.get("status") == "ok"] + [r for rs in swept.values() for r in rs])
    for line in store.unreadable if hasattr(store, "unreadable") else []:
        print(f"mmbench: warning: {line}", file=sys.stderr)
    df = leaderboard.table(results, expected)
    notes = [f"Generated by `mmbench leaderboard` (mmbench {__version__}) from {len(results)} stored cell "
             f"results; each cell's JSON records its key, plugin versions, parameters and timings."]
    for name in presets:
        p = _preset(registry, name)
        overrides = "; ".join(f"{k}: {v}" for k, v in sorted(p.plugin_params.items())) or "none"
        notes.append(f"Preset `{name}`: {p.description}. Declared seeds: {', '.join(map(str, p.seeds))}. "
                     f"Plugin parameters set by the preset: {overrides}."
                     + (f" Opt-in plugins (their stored cells are shown, none is required): {', '.join(p.opt_in)}."
                        if p.opt_in else ""))
    sections, claims = {}, {}
    for name in presets:
        mine = [r for r in results if r.get("preset") == name]
        # as mmbench findings: the sweeps were run around the preset's own settings, none with --set
        cells = findings.frame(mine, [] if args.set else sweep_points.get(name, []))
        claims[name] = findings.evaluate(cells)  # once: README.md and the page show the same lines
        sections[name] = findings.markdown(name, cells, claims[name])
        for extra in (sweeps.markdown(name, sweep_points.get(name, [])),
                      detection_report.markdown(name, detection.get(name, []), mine)):
            if extra:
                sections[name] += "\n\n" + extra
    files = leaderboard.render(df, notes="\n\n".join(notes), findings=sections)
    entries = [e for es in detection.values() for e in es]
    if entries:  # a detector is installed: the detection track's rows (not run ones included)
        files["detection.csv"] = detection_report.frame(entries).to_csv(index=False).encode()
    if args.check:
        declared = set(expected)
        seeds = {(c[0], c[4]) for c in declared}
        # every default cell of the declared seeds must be ok; an opt-in plugin's cells need not be
        # there, but a stored one must not be stale or failed
        problems = [f"{r.preset} {r.attack}/{r.merger}/{r.defense} seed {r.seed}: {r.status}"
                    for r in df.itertuples() if r.status in ("stale", "failed", "not run", "unreadable")
                    and ((r.preset, r.attack, r.merger, r.defense, r.seed) in declared
                         or (r.status != "not run" and (r.preset, r.seed) in seeds))]
        problems += [line for es in detection.values() for line in detection_report.problems(es)]
        problems += leaderboard.differences(files, Path(args.out))
        page = site.files_for(df, results, "\n\n".join(notes), Path(args.out), registry.names("preset"), detection,
                              sweep_points, claims)
        problems += leaderboard.differences(page, Path(args.out)) + site.extra_plots(page, Path(args.out))
        problems += submissions.problems(store.root, presets)
        problems += disagreements
        for line in problems:
            print(line)
        if problems:
            return 1
        missing = sum(detection_report.not_run(es) for es in detection.values())
        if missing:
            print(f"note: {missing} detection-track stage(s) not run (reported as such; not a failure)")
        print("leaderboard up to date")
        return 0
    for line in disagreements:
        print(f"mmbench: warning: {line}", file=sys.stderr)
    paths = leaderboard.write(df, Path(args.out), notes="\n\n".join(notes), findings=sections)
    if "detection.csv" in files:
        paths += site.write({"detection.csv": files["detection.csv"]}, Path(args.out))
    paths += site.write(site.files_for(df, results, "\n\n".join(notes), Path(args.out), registry.names("preset"),
                                       detection, sweep_points, claims), Path(args.out))
    print(f"wrote {', '.join(map(str, paths))} ({len(df)} cells: " +
          ", ".join(f"{n} {s}" for s, n in df.status.value_counts().items()) + ")")
    return 0


def _why_prunable(registry, store, presets: list[str]) -> list[tuple[Path, str]]:
    """(result file, why it can go) for every stored result that no current cell has: its plugin
    is not installed, its preset is gone, its key is not what its cell (with its own --set
    setting) gives now, or it cannot be read."""
    from .graph import plan_all

    installed = {(k, n) for k in ("attack", "merger", "defense") for n in registry.names(k)}
    graphs: dict[tuple[str, str], Any] = {}
    out = []
    for name in presets:
        for r in store.results(name):
            path = store.result_path(name, r.get("cell", ""))
            if r.get("status") == "unreadable":
                out.append((Path(r.get("path", path)), f"unreadable ({r.get('error')})"))
                continue
            if name not in registry.names("preset"):
                out.append((path, f"preset {name!r} is not installed"))
                continue
            missing = [f"{k} {r.get(k)}" for k in ("attack", "merger", "defense")
                       if not (k == "attack" and r.get(k) == "none") and (k, r.get(k)) not in installed]
            if missing:
                out.append((path, f"{', '.join(missing)} not installed"))
                continue
            setting = r.get("setting") or {}
            memo = (name, json.dumps(setting, sort_keys=True))
            if memo not in graphs:
                try:
                    graphs[memo] = plan_all(registry, _preset(registry, name), seeds=sorted(
                        {x["seed"] for x in store.results(name) if isinstance(x.get("seed"), int)}), overrides=setting)
                except UsageError as exc:
                    graphs[memo] = exc
            graph = graphs[memo]
            if isinstance(graph, UsageError):
                out.append((path, f"its setting no longer applies ({graph})"))
                continue
            current = {c.id: graph.cell_keys[c] for c in graph.cells}
            if r.get("cell") not in current:
                out.append((path, "no current cell has this id"))
            elif r.get("key") != current[r["cell"]]:
                out.append((path, "stale: made with other code, parameters or preset content"))
    return out


def cmd_prune(args) -> int:
    from .store import Store

    registry = load()
    store = Store(args.store)
    presets = [args.preset] if args.preset else sorted({p.name for p in (store.root / "results").glob("*")
                                                        if p.is_dir()})
    doomed = _why_prunable(registry, store, presets)
    for path, why in doomed:
        print(f"{path}: {why}")
    if not doomed:
        print("nothing to prune: every stored result is current")
        return 0
    if not args.yes:
        print(f"{len(doomed)} result(s) would be deleted; rerun with --yes to delete them")
        return 0
    for path, _ in doomed:
        path.unlink(missing_ok=True)
    print(f"deleted {len(doomed)} result(s)")
    return 0


def cmd_check_plugin(args) -> int:
    from .check import check_plugin, render

    registry = load()
    findings = check_plugin(args.name, registry, args.store, args.preset)
    print(render(args.name, findings))
    return 1 if any(f.level == "FAIL" for f in findings) else 0


def cmd_pretrain(args) -> int:
    """Rebuild a preset's shipped base model from its recorded recipe and write the file."""
    from . import catalogue
    from .keys import canonical_json, file_digest

    if args.preset not in catalogue.BASE_RECIPES:
        raise UsageError(f"preset {args.preset!r} ships no base model; known: "
                         f"{', '.join(sorted(catalogue.BASE_RECIPES))}")
    recipe, shipped = catalogue.BASE_RECIPES[args.preset]
    out = Path(args.out) if args.out else shipped
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    import torch

    from . import models
    from .context import SharedStages
    from .store import Store

    torch.set_num_threads(1)  # as every stage: the file's bytes do not depend on the machine's cores
    shared = SharedStages(recipe, Store(args.store), _device(args.device), quiet=args.quiet)
    state, info = shared.base()
    heads = shared.heads()
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    names = {t: shared.task_data(t).class_names for t in recipe.task_names}
    models.save_base_file(out, visual, info["logit_scale"], {t: h.cpu() for t, h in heads.items()}, names,
                          recipe.key())
    print(f"wrote {out}: sha256 {file_digest(out)}; recipe sha256 "
          f"{hashlib.sha256(canonical_json(recipe.key()).encode()).hexdigest()[:12]}; "
          f"final contrastive loss {info.get('final_loss', float('nan')):.4f}")
    return 0


def cmd_mechanisms(args) -> int:
    from . import mechanisms
    from .store import Store

    registry = load()
    preset = _preset(registry, args.preset)
    import torch

    torch.set_num_threads(1)
    echo = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    measure, render = {"backdoor": (mechanisms.measure, mechanisms.text),
                       "clean-ta": (mechanisms.clean_ta, mechanisms.clean_ta_text),
                       "regmean": (mechanisms.regmean, mechanisms.regmean_text),
                       "task-order": (mechanisms.task_order, mechanisms.task_order_text)}[args.part]
    if args.attack is not None and args.part != "task-order":
        raise UsageError("mechanisms --attack goes with --part task-order")
    extra = {"attack": args.attack} if args.attack else {}
    report = measure(registry, preset, Store(args.store), _device(args.device), args.seed, echo=echo, **extra)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    return 0


def cmd_findings(args) -> int:
    from . import findings
    from .store import Store

    registry = load()
    store = Store(args.store)
    presets = _presets_to_show(args, store)
    from .graph import parse_overrides

    from . import sweeps

    _, results = _stored_results(registry, store, presets, parse_overrides(args.set or [], registry))
    reports = []
    for name in presets:
        mine = [r for r in results if r.get("preset") == name]
        # the sweeps are read around the preset's own settings: none with --set
        cells = findings.frame(mine, [] if args.set else sweeps.collect(registry, store, _preset(registry, name)))
        stale = sum(r.get("status") == "stale" for r in mine)
        reports.append(findings.text(name, cells, findings.evaluate(cells), stale))
    print("\n\n".join(reports))
    return 0


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """The options that select cells, the same for ``run`` and ``plan``."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--attack", action="append", help="attack name (repeatable; 'none' = no attack)")
    parser.add_argument("--merger", action="append", help="merger name (repeatable)")
    parser.add_argument("--defense", action="append", help="defense name (repeatable)")
    parser.add_argument("--detector", action="append",
                        help="detector of the detection track (repeatable; 'none': no detection; default: every "
                             "installed detector, or none when --attack, --merger or --defense selects a slice)")
    parser.add_argument("--seed", action="append", type=int, help="seed (repeatable; default: the preset's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mmbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run cells of the attack × merger × defense cross product")
    _add_selection(run)
    run.add_argument("--rerun", default="missing", choices=["missing", "always", "cells", "never"],
                     help="missing: compute what the store lacks (default); always: recompute the selected "
                          "cells and their attack and merge stages, reusing shared stages; cells: recompute "
                          "the selected cells only; never: only report")
    run.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE",
                     help="override a plugin parameter, e.g. --set ta.lambda=0.5 (value parsed as JSON), or "
                          "the number of merged tasks, --set merge.tasks=3 (the attack's uploads first)")
    run.add_argument("--sweep", action="append", metavar="PLUGIN.PARAM=V1,V2,...",
                     help="run the selection once per value (repeatable: every combination), each value its "
                          "own setting and cell keys, e.g. --sweep ta.lambda=0.1,0.3,0.5,0.7 or --sweep "
                          "merge.tasks=2,4,6; no detection track unless --detector asks")
    run.add_argument("--store", default=DEFAULT_STORE)
    run.add_argument("--device", default="auto", help="auto | cpu | cuda")
    run.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # old: stages run single-threaded
    run.add_argument("--jobs", type=int, default=0,
                     help="local executor: worker processes, each running one stage at a time with one "
                          "CPU thread (default: 1 on a GPU, else one per core)")
    run.add_argument("--executor", default="local",
                     help="where stages run: local (default) or ray (pip install 'mmbench[ray]')")
    run.add_argument("--address", default=None,
                     help="with --executor ray: the cluster's address (default: start a local Ray)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)  # exit 1 on failures: always now
    run.add_argument("--batch-size", type=int, default=None,
                     help="fine-tuning batch size instead of the preset's (changes the fine-tune keys)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="show the stage graph, what is cached and a GPU-time estimate "
                                       "(computes and downloads nothing)")
    _add_selection(plan)
    plan.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE", help="as for run")
    plan.add_argument("--sweep", action="append", metavar="PLUGIN.PARAM=V1,V2,...",
                      help="as for run: every value's stages, those the values share listed once")
    plan.add_argument("--batch-size", type=int, default=None, help="as for run")
    plan.add_argument("--throughput", default=None, metavar="FILE",
                      help="GPU throughputs measured by benchmarks/gpu_throughput.py (default: "
                           "$MMBENCH_THROUGHPUT; none: the assumed figures, marked as such)")
    plan.add_argument("--store", default=DEFAULT_STORE)
    plan.set_defaults(func=cmd_plan)

    tune = sub.add_parser("tune", help="choose a merger's or attack's parameters on the dev split "
                                       "(the rule its user could apply; never a test split)")
    tune.add_argument("--preset", default="tiny")
    tune.add_argument("--merger", help="a merger: the clean merge's normalised dev ACC decides")
    tune.add_argument("--attack", help="an attack: the backdoored model's dev ASR and ACC decide")
    tune.add_argument("--grid", action="append", metavar="PARAM=V1,V2,...",
                      help="values to try (repeatable: the cartesian product is tried, in the order given)")
    tune.add_argument("--seed", action="append", type=int, help="seed (repeatable; default: the preset's)")
    tune.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE", help="as for run")
    tune.add_argument("--asr-target", type=float, default=0.9, help="attack rule: dev ASR to reach (0.9)")
    tune.add_argument("--acc-tolerance", type=float, default=0.02,
                      help="attack rule: dev ACC may fall this far below the clean twin's (0.02)")
    tune.add_argument("--json", help="also write the sweep and the choice to this file")
    tune.add_argument("--store", default=DEFAULT_STORE)
    tune.add_argument("--device", default="auto", help="auto | cpu | cuda")
    tune.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    tune.add_argument("--quiet", action="store_true")
    tune.set_defaults(func=cmd_tune)

    plugins = sub.add_parser("plugins", help="list installed attacks, mergers, defenses and presets")
    plugins.add_argument("--params", metavar="NAME",
                         help="show the parameters a plugin declares: type, default, allowed values, meaning")
    plugins.add_argument("--preset", default=None,
                         help="with --params: show what this preset sets (default: tiny, when installed)")
    plugins.set_defaults(func=cmd_plugins)
    presets = sub.add_parser("presets", help="describe the installed presets")
    presets.set_defaults(func=cmd_presets)

    board = sub.add_parser("leaderboard", help="write leaderboard/README.md, results.csv, summary.csv and the web "
                                               "page index.html (with plots/*.svg)")
    board.add_argument("--preset", default=None, help="default: every preset with stored results")
    board.add_argument("--store", default=DEFAULT_STORE)
    board.add_argument("--out", default="leaderboard")
    board.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE",
                       help="show the results made with these settings (as given to run) instead of the preset's own")
    board.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 (one line per problem) if a cell of the preset's declared "
                            "seeds is stale, failed or not run, or if --out differs from the stored results")
    board.set_defaults(func=cmd_leaderboard)

    prune = sub.add_parser("prune", help="list (and with --yes delete) stored results that no current cell has: "
                                         "uninstalled plugins, stale keys, unreadable files")
    prune.add_argument("--preset", default=None, help="default: every preset in the store")
    prune.add_argument("--store", default=DEFAULT_STORE)
    prune.add_argument("--yes", action="store_true", help="delete them (without it: only list)")
    prune.set_defaults(func=cmd_prune)

    checker = sub.add_parser("check-plugin", help="run one plugin through the contract on smoke and say what is "
                                                   "wrong in plain words (exit 1 if something is)")
    checker.add_argument("name", help="an attack, merger or defense")
    checker.add_argument("--preset", default="smoke")
    checker.add_argument("--store", default=None, help="default: a temporary store, removed afterwards")
    checker.set_defaults(func=cmd_check_plugin)

    pretrain = sub.add_parser("pretrain", help="rebuild a preset's shipped base model (image encoder + "
                                                "zero-shot heads) from its recorded recipe")
    pretrain.add_argument("--preset", default="tiny")
    pretrain.add_argument("--out", default=None, help="file to write (default: the file the preset ships)")
    pretrain.add_argument("--store", default=DEFAULT_STORE, help="where the pretraining stages are cached")
    pretrain.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pretrain.add_argument("--quiet", action="store_true")
    pretrain.set_defaults(func=cmd_pretrain)

    mech = sub.add_parser("mechanisms", help="measure what the papers' findings rest on: backdoor-vector "
                                             "cosines, ASR against λ and against the number of merged tasks")
    mech.add_argument("--preset", default="tiny")
    mech.add_argument("--seed", type=int, default=0)
    mech.add_argument("--store", default=DEFAULT_STORE)
    mech.add_argument("--device", default="auto", help="auto | cpu | cuda")
    mech.add_argument("--part", default="backdoor", choices=["backdoor", "clean-ta", "regmean", "task-order"],
                      help="backdoor: BV cosines and dilution (default); clean-ta: per task, what scaling a "
                           "task vector and merging it with the others cost; regmean: BadMerging's and "
                           "BadTV's ASR under RegMean against TA, the plain mean and two hybrids; task-order: "
                           "which clean task moves an attack's ASR under TA (pairs and leave-one-out)")
    mech.add_argument("--attack", default=None, help="with --part task-order: the attack (default badnets)")
    mech.add_argument("--json", help="also write the figures to this file")
    mech.add_argument("--quiet", action="store_true")
    mech.set_defaults(func=cmd_mechanisms)

    found = sub.add_parser("findings", help="check the papers' claims against the stored results "
                                            "(reproduced / not reproduced / inconclusive / not measured)")
    found.add_argument("--preset", default=None, help="default: every preset with stored results")
    found.add_argument("--store", default=DEFAULT_STORE)
    found.add_argument("--set", action="append", metavar="PLUGIN.PARAM=VALUE",
                       help="judge the results made with these settings (as given to run) instead of the "
                            "preset's own")
    found.set_defaults(func=cmd_findings)
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
