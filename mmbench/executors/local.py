"""The ``local`` executor: the stages of a graph on this machine.

``jobs`` = 1 runs them in this process, in graph order. ``jobs`` > 1 starts that many
worker processes (spawned, not forked: forking a process whose OpenMP pool has run can
hang the child); the parent hands each a stage as soon as every stage it needs is done,
long stages first (fine-tunes and attacks before cells). Each worker keeps what it has
loaded (base model, heads, fine-tunes) for the stages it runs next. A stage that several
processes need at once (a plugin's cached stage) is computed by one while the others wait
on the store's lock and then load it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mmbench.execute imports torch; registering this executor must not
    from ..execute import Outcome, Runtime
from ..graph import Graph, Stage
from . import Schedule, skipped


class WorkerDied(RuntimeError):
    """A worker process ended without reporting (killed, out of memory)."""


_graph: Graph | None = None
_runtime: Runtime | None = None


def _init(graph: Graph, runtime: Runtime, parent: int) -> None:
    global _graph, _runtime
    _graph, _runtime = graph, runtime
    _exit_with_parent(parent)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (killed, even by SIGKILL) stops at once instead of finishing
    its stage for nobody: what it had not stored is recomputed by the next run."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="mmbench-parent-watch").start()


def _run(key: str, force: bool) -> Outcome:
    from ..worker import run_stage

    return run_stage(_graph, _runtime, key, force)


def _width(todo: list[Stage]) -> int:
    """The most stages of ``todo`` that could run at once, by depth (stages at one depth of the
    graph never need each other): 1 for a chain, such as a single cell rerun."""
    depth: dict[str, int] = {}
    keys = {s.key for s in todo}
    for stage in todo:  # inputs come first
        depth[stage.key] = 1 + max((depth[i] for i in stage.inputs if i in keys), default=-1)
    counts: dict[int, int] = {}
    for d in depth.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts.values(), default=0)


class LocalExecutor:
    name = "local"

    def __init__(self, jobs: int = 1, **unused: Any) -> None:
        self.jobs = max(1, int(jobs))

    def execute(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Runtime,
                on_outcome: Callable[[Outcome], None], registry=None, echo=None) -> None:
        if self.jobs == 1 or _width(todo) <= 1:  # nothing to run side by side: no worker start-up
            self._serial(graph, todo, forced, runtime, on_outcome, registry, echo)
        else:
            self._parallel(graph, todo, forced, runtime, on_outcome)

    def _serial(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Runtime,
                on_outcome: Callable[[Outcome], None], registry, echo) -> None:
        from ..worker import Worker

        worker = Worker(graph, runtime, registry=registry, echo=echo)
        failed: dict[str, tuple[Stage, str]] = {}
        for stage in todo:
            bad = next((failed[i] for i in stage.inputs if i in failed), None)
            out = skipped(stage, *bad) if bad else worker.run(stage.key, stage.key in forced)
            if out.error:
                failed[stage.key] = bad or (stage, out.error)
            on_outcome(out)

    def _parallel(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Runtime,
                  on_outcome: Callable[[Outcome], None]) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool
        from dataclasses import replace

        schedule = Schedule(todo)
        workers = min(self.jobs, len(todo))
        runtime = replace(runtime, bars=False, tag=runtime.tag or "")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                 initargs=(graph, runtime, os.getpid())) as pool:
            running: dict[Any, str] = {}
            try:
                while schedule or running:
                    while schedule and len(running) < workers:
                        key = schedule.pop()
                        running[pool.submit(_run, key, key in forced)] = key
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        running.pop(future)
                        for item in schedule.finish(future.result()):
                            on_outcome(item)
            except BaseException as exc:
                # no new stage starts; running ones finish (every store write is atomic, so
                # what they leave is complete) and a rerun picks up the rest
                pool.shutdown(wait=False, cancel_futures=True)
                if isinstance(exc, BrokenProcessPool):
                    raise WorkerDied("a worker process died (out of memory?); the stages it finished are "
                                     "stored: rerun, perhaps with --jobs 1") from None
                raise
