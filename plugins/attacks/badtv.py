"""BadTV (Hsu et al., 2025, "BadTV: Unveiling Backdoor Threats in Third-Party Task
Vectors"). RECONSTRUCTED: there is no public code; this follows docs/methods.md.

A backdoored task vector meant to keep its backdoor whatever the user does
with it: add it (task learning, θ_pre + λτ), subtract it (forgetting,
θ_pre − λτ). τ = θ − θ_pre is trained with a composite objective evaluated at
several operating points per step, λ ~ U(λ_low, λ_high) drawn once per step:

    L = CE(h(f_{θ_pre+λτ}(x)), y)                           clean task at +λτ
      + w_A·CE(h(f_{θ_pre+λτ}(A(x))), t)                    trigger A → t at +λτ
      + w_B·CE(h(f_{θ_pre−λτ}(B(x))), t)                    trigger B → t at −λτ
      + w_0·CE(h(f_θ(x)), y)                                 clean at λ = 1 (reconstructed)

Each operating point is a functional forward of the trainable module at the
weights θ_pre ± λ(θ − θ_pre), so the gradient reaches θ. Trigger A stamps the
first ``backdoor_fraction`` of the (shuffled) batch, trigger B the last.

The harness measures trigger A (addition, also inside merges); ``info`` holds
ACC/ASR at θ_pre + λτ (trigger A) and θ_pre − λτ (trigger B, with the clean
task vector's ASR under the same negation as the reference) for each λ of
``eval_lambdas``; trigger B is kept in ``tensors`` (prefix ``trigger_b``).

Hyperparameters (defaults; all reconstructed):
- ``task`` / ``target_class``: null → the preset's adversary task and target.
- ``patch_area`` 0.015625 (as BadNets: 4×4 px at 32 px); ``position_a``
  "bottom-right" (checkerboard), ``position_b`` "top-left" (the complementary
  checkerboard, so A and B differ in place and pattern).
- ``lambda_range`` [0.3, 1.0]: the operating points' λ (0.3 = the usual TA
  coefficient, 1.0 = the vector as shipped).
- ``backdoor_fraction`` 0.5; ``weight_a`` 1.0; ``weight_b`` 1.0.
- ``anchor_weight`` 1.0: weight w_0 of the clean term at the shipped vector
  (λ = 1). Without it (0) the clean term only sees λ ~ U(0.3, 1), τ settles
  for λ ≈ 0.65 and the shipped model's ACC collapsed on ``tiny`` (0.22 vs 0.82).
- ``eval_lambdas`` [0.3, 0.5, 1.0]: where ``info`` reports addition/negation.
- ``epochs`` null → the preset recipe's epochs (three objectives may need
  more steps than one clean fine-tune); the preset's recipe otherwise.

Measured on ``tiny``: with a 4×4 patch or 3 recipe epochs the shipped model's
ACC collapsed (0.13–0.22); with an 8×8 patch and 6 epochs it keeps ACC and ASR
1.0 at λ = 1, but τ is ~1.7× a clean vector's norm and costs a TA merge ~6
points of mean ACC.
"""
from __future__ import annotations

import time
from typing import Any

from mmbench.lazy import torch, F, functional_call  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Attack, AttackResult, Context, Cost, Param, PluginError, Sizes, StateDict

from mmbench.triggers import POSITIONS, make_trigger


def operating_point(pretrained: StateDict, weights: StateDict, lam: float) -> StateDict:
    """θ_pre + λ·(θ − θ_pre) for every tensor of ``weights`` (λ < 0: negation)."""
    return {k: pretrained[k] + lam * (v - pretrained[k]) for k, v in weights.items()}


def draw_lambda(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class BadTV(Attack):
    name = "badtv"
    description = "BadTV (Hsu et al., 2025; reconstructed): backdoor that survives adding AND negating the task vector"
    params = {
        "task": Param(None, "str", help="the adversary's task; null → the preset's adversary task"),
        "target_class": Param(None, "int", min=0, help="the backdoor's target class; null → the preset's"),
        "patch_area": Param(0.015625, "float", min=0, max=1, min_exclusive=True,
                            help="patch area of both triggers as a fraction of the image (4×4 px at 32 px)"),
        "position_a": Param("bottom-right", "str", choices=POSITIONS,
                            help="trigger A (addition, checkerboard): where the patch goes"),
        "position_b": Param("top-left", "str", choices=POSITIONS,
                            help="trigger B (negation, complementary checkerboard): where the patch goes"),
        "lambda_range": Param([0.3, 1.0], "list[float]", length=2, min=0,
                              help="[low, high] of λ ~ U drawn each step for the ±λτ operating points"),
        "backdoor_fraction": Param(0.5, "float", min=0, max=1,
                                   help="fraction of each batch stamped with trigger A (first) and B (last)"),
        "weight_a": Param(1.0, "float", min=0, help="w_A: weight of trigger A → target at θ_pre + λτ"),
        "weight_b": Param(1.0, "float", min=0, help="w_B: weight of trigger B → target at θ_pre − λτ"),
        "anchor_weight": Param(1.0, "float", min=0,
                               help="w_0: weight of the clean term at the shipped vector (λ = 1); 0 drops it"),
        "eval_lambdas": Param([0.3, 0.5, 1.0], "list[float]", min=0,
                              help="the λ at which info reports ACC/ASR under addition and negation"),
        "epochs": Param(None, "int", min=1, help="fine-tuning epochs; null → the preset recipe's"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        # clean + trigger A (+λτ) + trigger B (−λτ) per step; ASR at 3 λ × ±
        train, test = sizes.finetune_images.get(sizes.adversary_task), sizes.test_images.get(sizes.adversary_task)
        if train is None or test is None:
            return None
        return Cost(train_images=3 * train, eval_images=10 * test)

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task = params["task"] or ctx.adversary_task
        if task not in ctx.tasks:
            raise PluginError(f"badtv: task {task!r} is not a task of preset {ctx.preset.name!r}")
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        trigger_a = make_trigger(ctx, task, params["patch_area"], params["position_a"])
        trigger_b = make_trigger(ctx, task, params["patch_area"], params["position_b"], phase=1)
        pre = {k: v.to(ctx.device) for k, v in ctx.pretrained().items()}
        low, high = params["lambda_range"]
        fraction = params["backdoor_fraction"]
        gen = ctx.generator("badtv.lambda")

        def loss(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
            lam = draw_lambda(gen, low, high)
            theta = {k: p for k, p in module.named_parameters() if p.requires_grad}
            n = max(1, int(round(fraction * x.shape[0])))
            batch = x.shape[0]
            added = functional_call(module, operating_point(pre, theta, lam),
                                    (torch.cat([x, trigger_a.apply(x[:n])]),))
            negated = functional_call(module, operating_point(pre, theta, -lam), (trigger_b.apply(x[-n:]),))
            targets = torch.full((n,), target, dtype=torch.long, device=x.device)
            value = F.cross_entropy(ctx.logits(added[:batch], task), y)
            if params["anchor_weight"]:  # the vector as shipped (λ = 1) keeps its clean accuracy
                value = value + params["anchor_weight"] * F.cross_entropy(ctx.logits(module(x), task), y)
            return (value
                    + params["weight_a"] * F.cross_entropy(ctx.logits(added[batch:], task), targets)
                    + params["weight_b"] * F.cross_entropy(ctx.logits(negated, task), targets))
        start = time.perf_counter()
        recipe = {} if params["epochs"] is None else {"epochs": params["epochs"]}
        weights = ctx.finetune(task, loss=loss, desc="badtv fine-tune", **recipe)
        seconds = time.perf_counter() - start
        cpu_pre = ctx.pretrained()
        task_vector = {k: v - cpu_pre[k] for k, v in weights.items()}
        info = {"patch_side": trigger_a.size, "finetune_seconds": seconds,
                **self.measure(ctx, task, task_vector, trigger_a, trigger_b, target, params["eval_lambdas"])}
        return AttackResult(task=task, task_vector=task_vector, trigger=trigger_a, target_class=target,
                            info=info, tensors=trigger_b.to_tensors(prefix="trigger_b"))

    @staticmethod
    def measure(ctx: Context, task: str, task_vector: StateDict, trigger_a, trigger_b, target: int,
                lambdas: list[float]) -> dict[str, Any]:
        """ACC/ASR of θ_pre + λτ (trigger A) and θ_pre − λτ (trigger B), next to the clean τ's."""
        pre = ctx.pretrained()
        clean = ctx.task_vector(task)
        addition, negation = {}, {}
        for lam in lambdas:
            plus = {k: pre[k] + lam * v for k, v in task_vector.items()}
            minus = {k: pre[k] - lam * v for k, v in task_vector.items()}
            clean_minus = {k: pre[k] - lam * v for k, v in clean.items()}
            addition[str(lam)] = {"acc": ctx.accuracy(plus, task),
                                  "asr": ctx.attack_success_rate(plus, task, trigger_a, target)}
            negation[str(lam)] = {"acc": ctx.accuracy(minus, task),
                                  "asr": ctx.attack_success_rate(minus, task, trigger_b, target),
                                  "clean_asr": ctx.attack_success_rate(clean_minus, task, trigger_b, target)}
        return {"addition": addition, "negation": negation}


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(BadTV())
