"""No defense: the merger's output as it is (every cell has a defense)."""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import BoundMerger, Context, Defense, Merged, Param, StateDict


class NoDefense(Defense):
    name = "none"
    description = "No defense: merge as the merger does"
    params: dict[str, Param] = {}

    merges_own_inputs = True  # the merger on the cell's own inputs: one shared merge stage

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict], merger: BoundMerger,
               ctx: Context, params: dict[str, Any]) -> Merged:
        return merger(pretrained, task_vectors)


@mmbench.hookimpl
def mmbench_register_defenses(register):
    register(NoDefense())
