"""The worker the executors run stages in: :class:`mmbench.execute.Worker` plus the
detection track's two stage kinds (:mod:`mmbench.detect`).

They are added here, not in :mod:`mmbench.execute`, because execute's code is part of every
cell's key: a stage kind that changes nothing a cell computes must not recompute the cells.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import detect
from .execute import Outcome, Runtime
from .execute import Worker as CellWorker

if TYPE_CHECKING:
    from .graph import Graph, Stage


class Worker(CellWorker):
    """Runs every kind of stage of one graph in this process (the base class dispatches a
    stage of kind K to ``_K``, with its error handling)."""

    def _detect(self, stage: "Stage", force: bool) -> float | None:
        return self._detection(detect.run_detect, stage, force)

    def _screen(self, stage: "Stage", force: bool) -> float | None:
        return self._detection(detect.run_screen, stage, force)

    def _detection(self, fn: Callable, stage: "Stage", force: bool) -> float | None:
        before = len(self.shared.log.computed)
        fn(self, stage, force)
        new = [c for c in self.shared.log.computed[before:] if c[0] == stage.label]
        return new[-1][1] if new else None


_workers: dict[tuple, Worker] = {}


def run_stage(graph: "Graph", runtime: Runtime, key: str, force: bool = False) -> Outcome:
    """Run stage ``key`` of ``graph`` in this process (a worker kept per graph and runtime)."""
    import socket

    memo = (graph.digest, runtime)
    worker = _workers.get(memo)
    if worker is None:
        _workers.clear()  # one graph at a time per process: free the last one's artifacts
        worker = _workers[memo] = Worker(graph, runtime)
    out = worker.run(key, force)
    out.node = socket.gethostname()
    return out
