"""Executors: where and when the stages of a planned graph run.

An executor is a plugin, registered through the ``mmbench_register_executors`` hook as
``register(name, factory)``; ``factory(**options)`` returns an object with the
:class:`Executor` interface. mmbench's own (entry point ``executors``, this module):

* ``local`` (default): this machine; ``--jobs 1`` in this process, ``--jobs N`` in N
  worker processes (:mod:`mmbench.executors.local`);
* ``ray``: a Ray cluster (``pip install 'mmbench[ray]'``, ``--executor ray --address
  ADDRESS``; :mod:`mmbench.executors.ray_executor`).

Every executor runs each stage through :func:`mmbench.execute.run_stage` against a store
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


@mmbench.hookimpl
def mmbench_register_executors(register):
    from .local import LocalExecutor

    def ray_factory(**options: Any):
        from .ray_executor import RayExecutor  # imports ray: only when chosen

        return RayExecutor(**options)
    register("local", LocalExecutor)
    register("ray", ray_factory)
