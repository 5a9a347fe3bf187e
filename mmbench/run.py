"""Run a planned graph: decide what is left to compute, hand it to an executor, collect results.

plan (:func:`mmbench.graph.plan`) → graph → :func:`execute_graph` → executor → store →
results. What the store holds is not recomputed: an artifact by its key, a cell by an
``ok`` result carrying the cell's current key. ``rerun="always"`` recomputes the selected
cells and their attack and merge stages (data, base model, heads and clean fine-tunes are
reused); ``rerun="cells"`` the selected cells only; ``rerun="never"`` computes nothing and
reports what is stored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .graph import Cell, Graph, Stage
from .plugins import UsageError
from .store import Store

RERUN = ("missing", "always", "cells", "never")


@dataclass
class Report:
    results: list[dict[str, Any]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    computed: list[tuple[str, float]] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    failed_stages: list[tuple[str, str]] = field(default_factory=list)   # (label, error) of non-cell stages
    detection: list[dict[str, Any]] = field(default_factory=list)        # detect and screen results (mmbench.detect)
    nodes: dict[str, list[str]] = field(default_factory=dict)          # node → labels of stages it computed


def cached_result(store: Store, graph: Graph, cell: Cell) -> dict[str, Any] | None:
    existing = store.load_result(graph.preset.name, cell.id)
    if existing and existing.get("status") == "ok" and existing.get("key") == graph.cell_keys[cell]:
        return existing
    return None


def detection_result(store: Store, graph: Graph, stage: Stage) -> dict[str, Any] | None:
    """The stored ok result of a detect or screen stage under its current key, else None."""
    from .detect import stage_result_id

    existing = store.load_result(graph.preset.name, stage_result_id(stage))
    if existing and existing.get("status") == "ok" and existing.get("key") == stage.key:
        return existing
    return None


def stored(store: Store, stage: Stage, graph: Graph | None = None) -> bool:
    """Is the stage's artifact in the store (cells, detect and screen stages: an ok result
    with its key)?"""
    if stage.kind == "cell":
        existing = store.load_result(stage.cell.preset, stage.cell.id)
        return bool(existing and existing.get("status") == "ok" and existing.get("key") == stage.key)
    if stage.kind in ("detect", "screen") and graph is not None:
        return detection_result(store, graph, stage) is not None
    return store.has(stage.key)


def to_compute(graph: Graph, store: Store, cells: list[Cell], rerun: str = "missing",
               detection: bool = True) -> tuple[list[Stage], set[str]]:
    """(the stages to run for ``cells`` and, with ``detection``, the graph's detection track,
    inputs first; the keys to recompute even if stored)."""
    if rerun not in RERUN:
        raise UsageError(f"--rerun must be one of {', '.join(RERUN)}, not {rerun!r}")
    if rerun == "never":
        return [], set()
    targets = {graph.cell_keys[c] for c in cells} | (set(graph.detection) if detection else set())
    needed = graph.needed(targets)
    forced: set[str] = set()
    if rerun == "always":
        forced = {s.key for s in needed if s.kind in ("attack", "merge", "cell", "detect", "screen")}
    elif rerun == "cells":  # the cells only: a defense or the evaluation changed, the attack did not
        forced = {s.key for s in needed if s.kind in ("cell", "screen")}
    # a stored stage is not run, and neither is what only it needed
    live: set[str] = set()
    run: set[str] = set()  # each stage's store is looked at once (a cell's result is a JSON read)
    for stage in reversed(needed):
        if (stage.key in targets or stage.key in live) and (stage.key in forced or not stored(store, stage, graph)):
            run.add(stage.key)
            live.add(stage.key)
            live.update(stage.inputs)
    todo = [s for s in needed if s.key in run]
    return todo, forced


def execute_graph(graph: Graph, cells: list[Cell], store: Store, executor, runtime, *, rerun: str = "missing",
                  on_result: Callable[[dict[str, Any]], None] = lambda r: None,
                  echo: Callable[[str], None] = lambda m: None, registry=None) -> Report:
    """Run what ``cells`` still need with ``executor``; ``on_result`` gets every cell's
    result (stored ones first, then the others as they finish)."""
    report = Report()
    todo, forced = to_compute(graph, store, cells, rerun)
    pending = {s.key for s in todo}
    for cell in cells:
        key = graph.cell_keys[cell]
        if key in pending:
            continue
        result = cached_result(store, graph, cell)
        if result is None:  # rerun never, nothing current stored
            result = {"cell": cell.id, "preset": cell.preset, "attack": cell.attack, "merger": cell.merger,
                      "defense": cell.defense, "seed": cell.seed, "setting": graph.cell_stage(cell).params.get(
                          "setting", {}), "status": "not run", "key": key}
        else:
            report.reused.append(f"cell {cell.label}")
        report.results.append(result)
        on_result(result)
    for key in graph.detection:  # the detection track's stored results
        if key not in pending:
            found = detection_result(store, graph, graph.stage(key))
            if found is not None:
                report.detection.append(found)
    needed_keys = {s.key for s in graph.needed([graph.cell_keys[c] for c in cells] + list(graph.detection))}
    report.reused += [s.label for s in graph.stages.values() if s.key in needed_keys and s.key not in pending
                      and s.kind != "cell" and rerun != "never"]

    tracebacks: dict[str, str] = {}  # failed stage label → its traceback

    def on_outcome(out) -> None:
        for label in out.reused:
            if label not in report.reused:
                report.reused.append(label)
        report.computed += out.computed
        report.corrupt += [c for c in out.corrupt if c not in report.corrupt]
        if out.seconds is not None:
            report.computed.append((out.label, out.seconds))
            report.nodes.setdefault(out.node or "local", []).append(out.label)
        elif not out.error and out.kind != "cell":
            report.reused.append(out.label)
        stage = graph.stage(out.key)
        if stage.kind in ("detect", "screen") and not out.error:
            found = detection_result(store, graph, stage)
            if found is not None:
                report.detection.append(found)
        if stage.kind != "cell":
            if out.error:
                report.failed_stages.append((stage.label, out.error))
                if out.result and out.result.get("traceback"):
                    tracebacks[stage.label] = out.result["traceback"]
            return
        if out.result and "cell" in out.result:  # the cell's own result (stored by the worker)
            result = out.result
        else:  # it was not run (an input failed) or raised outside its own handler: store why
            result = failed_result(graph, stage, out.error)
            if out.result and out.result.get("traceback"):
                result["traceback"] = out.result["traceback"]
            else:  # not run: the traceback of the stage it needed, which failed
                for label, tb in tracebacks.items():
                    if (out.error or "").startswith(f"needs {label}, "):
                        result["traceback"] = tb
            store.save_result(graph.preset.name, stage.cell.id, result)
        if out.seconds is None and result.get("status") == "ok":
            report.reused.append(f"cell {stage.cell.label}")
        report.results.append(result)
        on_result(result)

    if todo:
        executor.execute(graph, todo, forced, runtime, on_outcome, **_local_extras(executor, registry, echo))
    made = {label for label, _ in report.computed}  # what one worker computed, another one loaded
    report.reused = [label for label in report.reused if label not in made]
    return report


def _local_extras(executor, registry, echo) -> dict[str, Any]:
    """The in-process executor may reuse this process's registry and console."""
    from .executors.local import LocalExecutor

    return {"registry": registry, "echo": echo} if isinstance(executor, LocalExecutor) else {}


def failed_result(graph: Graph, stage: Stage, error: str | None) -> dict[str, Any]:
    cell = stage.cell
    return {"cell": cell.id, "preset": cell.preset, "attack": cell.attack, "merger": cell.merger,
            "defense": cell.defense, "seed": cell.seed, "setting": stage.params.get("setting", {}),
            "key": stage.key, "status": "failed", "error": error or "unknown error",
            "plugins": {k: dict(graph.plugins[(k, n)]) for k, n in
                        (("attack", cell.attack), ("merger", cell.merger), ("defense", cell.defense))},
            "metrics": {}, "info": {}, "durations": {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(preset, store: Store | str, attacks: list[str] | None = None, mergers: list[str] | None = None,
        defenses: list[str] | None = None, seeds: list[int] | None = None, *, overrides=None, registry=None,
        device: str = "cpu", jobs: int = 1, rerun: str = "missing", quiet: bool = True,
        detectors: list[str] | None = None) -> Report:
    """Plan and run a selection from Python (the CLI's ``mmbench run`` without the console):
    ``run(preset, ".mmbench", ["badnets"], ["ta"], ["none"]).results``. ``detectors`` as the
    CLI's ``--detector``: None runs every installed detector for the full cross product and none
    for a slice; ``.detection`` holds their results."""
    from .execute import Runtime
    from .executors.local import LocalExecutor
    from .graph import plan
    from .plugins import load

    registry = registry if registry is not None else load()
    store = store if isinstance(store, Store) else Store(store)
    if detectors is None and (attacks or mergers or defenses):
        detectors = []
    graph = plan(registry, preset, attacks, mergers, defenses, seeds, overrides, detectors=detectors)
    return execute_graph(graph, list(graph.cells), store, LocalExecutor(jobs), Runtime(str(store.root), device,
                         quiet=quiet), rerun=rerun, registry=registry)
