"""BadNets (Gu et al., 2017, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain"), as the classic baseline of BadMerging (Zhang et
al., CCS 2024) and Backdoor Vectors (Pawlak et al., 2025).

Stamp a fixed patch on a fraction of the adversary's training batches, relabel
them to the target class, and fine-tune with the shared recipe. Its backdoor
mostly does not survive merging: the baseline showing why merge-aware attacks
exist.

Hyperparameters (defaults):
- ``poison_rate`` 0.1: fraction of each training batch poisoned (reconstructed;
  docs/methods.md).
- ``patch_area`` 0.015625: patch area as a fraction of the image (4×4 px at 32 px,
  28×28 px at 224 px) (reconstructed).
- ``pattern`` "checkerboard": black/white checkerboard in normalised space.
- ``position`` "bottom-right" (a corner name or "center").
- ``target_class`` / ``task``: null → the preset's target class and adversary task.
"""
from __future__ import annotations

from typing import Any

import mmbench
from mmbench.api import Attack, AttackResult, Context, Param

from mmbench.triggers import POSITIONS, badnets_finetune, make_trigger


class BadNets(Attack):
    name = "badnets"
    description = "BadNets: patch trigger on a poisoned fraction of the adversary's data (classic baseline)"
    params = {
        "poison_rate": Param(0.1, "float", min=0, max=1, help="fraction of each training batch poisoned"),
        "patch_area": Param(0.015625, "float", min=0, max=1, min_exclusive=True,
                            help="patch area as a fraction of the image (4×4 px at 32 px, 28×28 at 224)"),
        "position": Param("bottom-right", "str", choices=POSITIONS, help="where the checkerboard patch goes"),
        "target_class": Param(None, "int", min=0, help="the backdoor's target class; null → the preset's"),
        "task": Param(None, "str", help="the adversary's task; null → the preset's adversary task"),
    }

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task = params["task"] or ctx.adversary_task
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        trigger = make_trigger(ctx, task, params["patch_area"], params["position"])
        weights = badnets_finetune(ctx, task, target, trigger, params["poison_rate"])
        pre = ctx.pretrained()
        return AttackResult(task=task, task_vector={k: v - pre[k] for k, v in weights.items()},
                            trigger=trigger, target_class=target,
                            info={"patch_side": trigger.size})


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(BadNets())
