"""Executors: where and when the stages of a planned graph run.

An executor is a plugin, registered through the ``mmbench_register_executors`` hook as
``register(name, factory)``; ``factory(**options)`` returns an object with the
:class:`Executor` interface. mmbench's own (entry point ``executors``, this module):

* ``local`` (default): this machine; ``--jobs 1`` in this process, ``--jobs N`` in N
  worker processes (:mod:`mmbench.executors.local`);
* ``ray``: a Ray cluster (``pip install 'mmbench[ray]'``, ``--executor ray --address
  ADDRESS``; :mod:`mmbench.executors.ray_executor`).

Every executor runs each stage through :func:`mmbench.worker.run_stage` against a store
that every process it uses can reach, and schedules from the graph alone: a stage is
started once every stage it needs is done. The driver (:func:`mmbench.run.execute_graph`)
has already dropped the stages the store holds.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import mmbench

from ..graph import Graph, Stage


class Executor(Protocol):
    name: str

    def execute(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Any,
                on_outcome: Callable[[Any], None]) -> None:
        """Run every stage of ``todo`` (inputs before the stages that need them; ``forced``
        keys are recomputed even when stored), calling ``on_outcome`` with each stage's
        :class:`~mmbench.execute.Outcome` as it finishes, in this process. A stage whose
        input failed is not run: the executor reports it through ``on_outcome`` as an
        Outcome with ``error`` "input ... failed" (:func:`skipped`)."""


# the order in which ready stages start: long ones first, so that the many short cells
# fill the gaps (a rough critical-path rule: the graph is shallow)
RANK = {"data": 0, "base": 1, "heads": 2, "finetune": 3, "attack": 4, "merge": 5, "eval-finetuned": 6, "cell": 7}


def skipped(stage: Stage, failed: Stage, error: str):
    from ..execute import Outcome

    return Outcome(stage.key, stage.kind, stage.label, error=f"needs {failed.label}, which failed: {error}")


def waiting(todo: list[Stage]) -> dict[str, set[str]]:
    """For each stage of ``todo``: the keys of the stages of ``todo`` it still waits for."""
    keys = {s.key for s in todo}
    return {s.key: {i for i in s.inputs if i in keys} for s in todo}


class Schedule:
    """The bookkeeping every executor that runs stages side by side needs: which stages are
    ready (every input of ``todo`` done; long kinds first, then graph order), and, as each
    outcome comes back, which stages it unblocks or, when it failed, which ones (transitively)
    are reported as not run (:func:`skipped`) instead of being started."""

    def __init__(self, todo: list[Stage]) -> None:
        import heapq

        self._heapq = heapq
        self.order = {s.key: i for i, s in enumerate(todo)}
        self.stages = {s.key: s for s in todo}
        self.blocked = waiting(todo)
        self.users: dict[str, list[str]] = {k: [] for k in self.stages}
        for key, needs in self.blocked.items():
            for i in needs:
                self.users[i].append(key)
        self.failed: dict[str, tuple[Stage, str]] = {}
        self._ready: list[tuple[int, int, str]] = []
        for key, needs in self.blocked.items():
            if not needs:
                self._push(key)

    def _push(self, key: str) -> None:
        self._heapq.heappush(self._ready, (RANK.get(self.stages[key].kind, 9), self.order[key], key))

    def __bool__(self) -> bool:
        """Is a stage ready to start?"""
        return bool(self._ready)

    def pop(self) -> str:
        return self._heapq.heappop(self._ready)[2]

    def finish(self, out) -> list:
        """Record ``out`` (an Outcome of a stage of ``todo``); what to report now, in order: ``out``,
        then a :func:`skipped` outcome for each stage that needed it when it failed."""
        key = out.key
        finished = [out]
        if out.error:  # what needs it (transitively) is reported, not run
            self.failed[key] = (self.stages[key], out.error)
            stack = list(self.users[key])
            while stack:
                user = stack.pop()
                if user in self.failed:
                    continue
                self.failed[user] = self.failed[key]
                finished.append(skipped(self.stages[user], *self.failed[key]))
                stack.extend(self.users[user])
            return finished
        for user in self.users[key]:
            self.blocked[user].discard(key)
            if not self.blocked[user] and user not in self.failed:
                self._push(user)
        return finished


@mmbench.hookimpl
def mmbench_register_executors(register):
    from .local import LocalExecutor

    def ray_factory(**options: Any):
        from .ray_executor import RayExecutor  # imports ray: only when chosen

        return RayExecutor(**options)
    register("local", LocalExecutor)
    register("ray", ray_factory)
