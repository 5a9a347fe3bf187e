"""Sparse Backdoor Vectors, SBV and SBV_SC (Pawlak, Dubiński, Marczak, Twardowski,
2025, "Backdoor Vectors: a Task Arithmetic View on Backdoor Attacks and
Defenses"). The combination rule is RECONSTRUCTED (docs/methods.md); no public code.

A backdoor vector is BV = θ_backdoored − θ_clean, both fine-tuned on the same
task from θ_pre. n BVs with the same target class but different seeds and
patch positions (where the paper finds backdoor transfer strongest) are
combined into one sparse vector:

    SBV    = TopK_ρ(Σ_i BV_i)
    SBV_SC = TopK_ρ(Σ_i BV_i ⊙ 1[all sign(BV_i) agree])     (sign-consistent)

TopK_ρ keeps the ρ largest-magnitude entries over the whole vector
(``mmbench.vectors.topk``). "Signs agree" means all BV_i > 0 or all < 0 at
that entry (a zero in any BV breaks agreement). The adversary submits
θ_clean + λ_SBV·SBV, i.e. τ_adv = θ_clean − θ_pre + λ_SBV·SBV.

Reconstructed details:
- BV i is built with the base attack (BadNets, ``plugins/attacks/badnets.py``)
  at corner i (bottom-right, top-left, top-right, bottom-left, cycling) and
  fine-tune seed s_i = seed + 1000·i, and its clean twin is the shared clean
  fine-tune with the SAME seed s_i (so BV_i holds the backdoor, not seed
  noise, and no data-order noise either: ``mmbench.train`` draws the poisoning
  from its own generator, so both fine-tunes see the same batches in the same
  order); θ_clean of the submission is the seed-s_0 = cell-seed fine-tune.
  Each BV is a cached stage ``sbv.backdoor_vector`` shared by sbv and sbv_sc.
- ASR (the harness's) uses BV 0's trigger (bottom-right checkerboard).

What ``info`` compares with what. Every single BV goes through the SBV's own
calibration, so the two are compared at their best operating points, not the
SBV at a tuned (ρ, λ ≤ 3) against the BVs at λ = 1. The "probe merge" is
θ_pre + λ_TA·(τ_adv + Σ_{k≠adv} τ_k): the ``ta`` merger's own function on the
cell seed's clean task vectors, in the preset's task order, so with λ_TA equal
to the cell's ``ta.lambda`` it IS the merge of the ``<attack>/ta/none`` cell,
bit for bit.

The SBV submission, τ_adv = θ_clean − θ_pre + λ_SBV·SBV:
- ``fraction``, ``lambda_sbv``: its calibrated ρ and λ_SBV; ``dev_acc``,
  ``dev_asr``: dev ACC / ASR (trigger 0) there; ``calibration``: θ_clean's dev
  ACC, the tolerance and every grid row tried; ``kept``: nonzero fraction of SBV.
- ``asr_per_trigger[i]``: θ_pre + τ_adv alone, test ASR with BV i's trigger.
- ``probe_lambda``: λ_TA; ``probe_merged_acc``: the adversary task's test ACC
  after the probe merge (the ta/none cell's ``attacked_task_acc``);
  ``probe_merged_asr_per_trigger[i]``: test ASR after it with trigger i ([0] is
  the ta/none cell's ``asr``).

Single BV i, ``single_bvs[i]`` (cached stage ``sbv.single_bv``, one per BV,
shared by sbv and sbv_sc: with one vector the sign-consistent mask keeps exactly
BV_i's nonzero entries, so both rules give the same TopK). Its submission is
τ_i = θ_clean − θ_pre + λ_i·TopK_ρi(BV_i), same θ_clean, chosen by the SAME
search: the same candidates (``fraction_grid`` × ``lambda_grid``, or the values
set), the same ``acc_tolerance`` rule (:func:`choose_operating_point`), the same
dev split, with its own trigger i:
- ``position``, ``seed``: its corner and fine-tune seed s_i;
- ``backdoored_acc``, ``backdoored_asr``: the BadNets fine-tune θ_clean_i + BV_i
  itself (test, trigger i);
- ``fraction``, ``lambda``, ``dev_acc``, ``dev_asr``, ``calibration``, ``kept``:
  as for the SBV;
- ``acc``, ``asr``: the calibrated submission θ_pre + τ_i alone (test, trigger i);
- ``probe_merged_acc``, ``probe_merged_asr``: after the same probe merge;
- ``uncalibrated_acc``, ``uncalibrated_asr``, ``uncalibrated_probe_merged_asr``:
  the BV as built, θ_clean + BV_i (ρ = 1, λ = 1), alone and probe-merged.
``best_single_probe_merged_asr`` = max_i ``single_bvs[i].probe_merged_asr``.

"SBV_SC keeps a higher ASR after merging than the best single BV it was built
from" compares the sbv_sc ta/none cell's ``asr`` (= ``probe_merged_asr_per_trigger[0]``,
trigger 0) with ``best_single_probe_merged_asr`` (each BV with its own trigger);
per trigger, ``probe_merged_asr_per_trigger[i]`` against ``single_bvs[i].probe_merged_asr``
is the same-trigger pair. λ_TA is ``probe_lambda``, else the preset's ``ta.lambda``,
else 0.3 (ta's default). ``--set ta.lambda=X`` changes the cells' merges but not
the probe (a stored attack artifact cannot depend on a merger's parameter): the
cell's ``asr`` then differs from the probe's figures. Check that the cell's
``info.merge.lambda`` equals ``info.attack.probe_lambda``, or pass
``--set sbv_sc.probe_lambda=X`` (and ``sbv.probe_lambda=X``) along with it.

Hyperparameters (defaults):
- ``task`` / ``target_class``: null → the preset's adversary task and target.
- ``base_attack`` "badnets" (the only one implemented).
- ``n`` 3.
- ``fraction`` (ρ) and ``lambda_sbv`` (λ_SBV): a number, or "auto" (default,
  reconstructed): the attacker calibrates on its OWN dev split, over
  ``fraction_grid`` [0.01, 0.02, 0.05, 0.1, 0.2] × ``lambda_grid`` [0.25, 0.5,
  0.75, 1, 1.5, 2, 3], taking the highest dev ASR (trigger 0) whose dev ACC
  stays within ``acc_tolerance`` 0.02 of θ_clean's ("ACC stays flat"; the
  paper gives no numbers). The grid is in ``info["calibration"]``; each single
  BV is calibrated the same way (above). On ``tiny``
  the BVs trade ACC for ASR steeply, so a fixed pair good there (ρ 0.05,
  λ 0.75) would not carry over to another preset.
- ``poison_rate`` 0.1, ``patch_area`` 0.015625: the BadNets fine-tunes.
- ``probe_lambda`` null → the preset's ``ta.lambda`` or 0.3 (λ_TA of the probe merge).
"""
from __future__ import annotations

import time
from typing import Any

from mmbench.lazy import torch  # torch on first use: listing plugins does not import it

import mmbench
from mmbench.api import Attack, AttackResult, Context, Cost, Param, PluginError, Sizes, StateDict
from mmbench.vectors import task_arithmetic, topk, weighted_sum

from mmbench.triggers import badnets_finetune, make_trigger

# Part of the cached stage keys (which also hold this package's code): bump when what a stage
# computes changes from outside it. 2: poisoning draws from its own generator (mmbench.train).
REVISION = 2
TA_DEFAULT_LAMBDA = 0.3  # the ta merger's default λ
CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")
SEED_STRIDE = 1000


def sign_consistent_mask(vectors: list[StateDict]) -> StateDict:
    """1 where every vector is > 0, or every vector is < 0 (bool, per tensor)."""
    out = {}
    for k in vectors[0]:
        positive = torch.stack([v[k] > 0 for v in vectors]).all(0)
        negative = torch.stack([v[k] < 0 for v in vectors]).all(0)
        out[k] = positive | negative
    return out


def sparse_backdoor_vector(vectors: list[StateDict], fraction: float, sign_consistent: bool) -> StateDict:
    """TopK_ρ(Σ_i BV_i), optionally masked to the sign-consistent entries first (SBV_SC)."""
    total = weighted_sum(vectors, [1.0] * len(vectors))
    if sign_consistent:
        mask = sign_consistent_mask(vectors)
        total = {k: v * mask[k] for k, v in total.items()}
    return topk(total, fraction)


def choose_operating_point(table: list[dict[str, float]], clean_acc: float, tolerance: float) -> dict[str, float]:
    """The (fraction, lambda) row with the highest ``asr`` among rows whose ``acc`` stays within
    ``tolerance`` of ``clean_acc`` (ties: smaller λ, then smaller ρ); if none does, the row with
    the highest ``acc``."""
    feasible = [row for row in table if row["acc"] >= clean_acc - tolerance]
    if not feasible:
        return max(table, key=lambda row: (row["acc"], -row["lambda"], -row["fraction"]))
    return max(feasible, key=lambda row: (row["asr"], -row["lambda"], -row["fraction"]))


def bv_plan(n: int, seed: int) -> list[tuple[str, int]]:
    """(corner, fine-tune seed) of BV i: corners cycle, seeds step by SEED_STRIDE."""
    return [(CORNERS[i % len(CORNERS)], seed + SEED_STRIDE * i) for i in range(n)]


def kept(vector: StateDict) -> float:
    """The fraction of nonzero entries."""
    return float(sum(int((v != 0).sum()) for v in vector.values()) / sum(v.numel() for v in vector.values()))


def search_grid(params: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The candidate ρ and λ (ascending) of a calibration: the grids where ``fraction`` /
    ``lambda_sbv`` are "auto", else the one value set. The SBV and every single BV search these."""
    fractions = params["fraction_grid"] if params["fraction"] == "auto" else [params["fraction"]]
    lambdas = params["lambda_grid"] if params["lambda_sbv"] == "auto" else [params["lambda_sbv"]]
    return [float(f) for f in fractions], sorted(float(lam) for lam in lambdas)


def calibrate(ctx: Context, task: str, target: int, clean: StateDict, vectors: list[StateDict], trigger,
              fractions: list[float], lambdas: list[float], tolerance: float,
              sign_consistent: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Pick ρ and λ for θ_clean + λ·TopK_ρ(combined ``vectors``) on the adversary's own dev split:
    the highest dev ASR (with ``trigger``) whose dev ACC stays within ``tolerance`` of θ_clean's
    (:func:`choose_operating_point`; reconstructed, the attacker owns this data). For each ρ, λ
    rises until the dev ACC leaves the tolerance (it only falls further with λ). Returns the
    chosen row (fraction, lambda, dev acc, dev asr) and {clean_dev_acc, tolerance, grid}."""
    clean_acc = ctx.accuracy(clean, task, split="dev")
    table = []
    for fraction in fractions:
        sparse = sparse_backdoor_vector(vectors, fraction, sign_consistent)
        for lam in lambdas:
            weights = {k: clean[k] + lam * sparse[k] for k in clean}
            row = {"fraction": fraction, "lambda": lam, "acc": ctx.accuracy(weights, task, split="dev"),
                   "asr": ctx.attack_success_rate(weights, task, trigger, target, split="dev")}
            table.append(row)
            if row["acc"] < clean_acc - tolerance:
                break
    chosen = choose_operating_point(table, clean_acc, tolerance)
    return chosen, {"clean_dev_acc": clean_acc, "tolerance": tolerance, "grid": table}


def probe_lambda(ctx: Context, params: dict[str, Any]) -> float:
    """λ_TA of the probe merge: ``probe_lambda``, else the preset's ``ta.lambda``, else ``ta``'s
    default. Never a ``--set ta.lambda`` (the attack's stored artifact cannot depend on a merger's
    override; see the module docstring)."""
    lam = params["probe_lambda"]
    if lam is None:
        lam = ctx.preset.plugin_params.get("ta", {}).get("lambda", TA_DEFAULT_LAMBDA)
    return float(lam)


def probe_merge(ctx: Context, task: str, adversary_vector: StateDict, lam: float) -> StateDict:
    """θ_pre + λ·(τ_adv + Σ_{k≠adv} τ_k): the ``ta`` merger's own function on the cell seed's clean
    task vectors in the preset's task order, τ_adv in the adversary's place, as the harness merges a
    cell: with ``lam`` = the cell's ``ta.lambda`` this is the ``ta``/``none`` cell's merge, bit for bit."""
    vectors = {t: adversary_vector if t == task else ctx.task_vector(t) for t in ctx.tasks}
    return task_arithmetic(ctx.pretrained(), vectors, lam)


def single_bv(ctx: Context, task: str, target: int, clean: StateDict, bv: StateDict, trigger,
              fractions: list[float], lambdas: list[float], tolerance: float, ta_lambda: float
              ) -> tuple[StateDict, dict[str, Any]]:
    """BV i on its own, given the SBV's calibration (same candidates, rule, dev split; its own
    trigger): τ_i = θ_clean − θ_pre + λ_i·TopK_ρi(BV_i). With one vector the sign-consistent mask
    is exactly BV_i's nonzero entries, so this is the same for sbv and sbv_sc (one cached stage)."""
    start = time.perf_counter()
    pre = ctx.pretrained()
    chosen, table = calibrate(ctx, task, target, clean, [bv], trigger, fractions, lambdas, tolerance,
                              sign_consistent=False)
    sparse = sparse_backdoor_vector([bv], chosen["fraction"], sign_consistent=False)
    vector = {k: clean[k] - pre[k] + chosen["lambda"] * sparse[k] for k in clean}
    submitted = {k: pre[k] + v for k, v in vector.items()}
    merged = probe_merge(ctx, task, vector, ta_lambda)
    as_built = {k: clean[k] + bv[k] for k in clean}  # ρ = 1, λ = 1
    merged_as_built = probe_merge(ctx, task, {k: as_built[k] - pre[k] for k in as_built}, ta_lambda)
    info = {"fraction": chosen["fraction"], "lambda": chosen["lambda"],
            "dev_acc": chosen["acc"], "dev_asr": chosen["asr"], "calibration": table, "kept": kept(sparse),
            "acc": ctx.accuracy(submitted, task), "asr": ctx.attack_success_rate(submitted, task, trigger, target),
            "probe_merged_acc": ctx.accuracy(merged, task),
            "probe_merged_asr": ctx.attack_success_rate(merged, task, trigger, target),
            "uncalibrated_acc": ctx.accuracy(as_built, task),
            "uncalibrated_asr": ctx.attack_success_rate(as_built, task, trigger, target),
            "uncalibrated_probe_merged_asr": ctx.attack_success_rate(merged_as_built, task, trigger, target)}
    info["seconds"] = time.perf_counter() - start
    return {}, info


class _SparseBackdoorVector(Attack):
    sign_consistent = False
    params = {
        "task": Param(None, "str", help="the adversary's task; null → the preset's adversary task"),
        "target_class": Param(None, "int", min=0, help="the backdoor's target class; null → the preset's"),
        "base_attack": Param("badnets", "str", choices=("badnets",),
                             help="the attack that builds each backdoor vector (only badnets is implemented)"),
        "n": Param(3, "int", min=1, help="backdoor vectors combined (corners cycle, fine-tune seeds step by 1000)"),
        "fraction": Param("auto", "float", min=0, max=1, min_exclusive=True, special=("auto",),
                          help="ρ: fraction of entries TopK keeps; auto → calibrated on the attacker's dev "
                               "split over fraction_grid"),
        "lambda_sbv": Param("auto", "float", min=0, special=("auto",),
                            help="λ_SBV: scale of the SBV added to θ_clean; auto → calibrated over lambda_grid"),
        "acc_tolerance": Param(0.02, "float", min=0, max=1,
                               help="calibration: how far the dev ACC may fall below θ_clean's"),
        "fraction_grid": Param([0.01, 0.02, 0.05, 0.1, 0.2], "list[float]", min=0, max=1, min_exclusive=True,
                               help="calibration: the ρ tried when fraction is auto"),
        "lambda_grid": Param([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0], "list[float]", min=0,
                             help="calibration: the λ_SBV tried when lambda_sbv is auto"),
        "poison_rate": Param(0.1, "float", min=0, max=1, help="BadNets fine-tunes: fraction of each batch poisoned"),
        "patch_area": Param(0.015625, "float", min=0, max=1, min_exclusive=True,
                            help="BadNets fine-tunes: patch area as a fraction of the image"),
        "probe_lambda": Param(None, "float", min=0,
                              help="λ of the probe TA merge reported in info; null → the preset's ta.lambda or 0.3"),
    }

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        # n BadNets fine-tunes (the clean twin is the shared fine-tune) and their dev calibration
        train, test = sizes.finetune_images.get(sizes.adversary_task), sizes.test_images.get(sizes.adversary_task)
        if train is None or test is None:
            return None
        return Cost(train_images=3 * train, eval_images=8 * test)

    def run(self, ctx: Context, params: dict[str, Any]) -> AttackResult:
        task = params["task"] or ctx.adversary_task
        if task not in ctx.tasks:
            raise PluginError(f"{self.name}: task {task!r} is not a task of preset {ctx.preset.name!r}")
        if params["base_attack"] != "badnets":
            raise PluginError(f"{self.name}: base_attack {params['base_attack']!r} is not implemented (badnets)")
        if int(params["n"]) < 1:
            raise PluginError(f"{self.name}: n must be ≥ 1")
        target = ctx.target_class if params["target_class"] is None else int(params["target_class"])
        triggers, vectors, built = [], [], []
        for corner, seed in bv_plan(int(params["n"]), ctx.seed):
            trigger = make_trigger(ctx, task, params["patch_area"], corner)
            key = {"revision": REVISION, "base_attack": "badnets", "task": task, "target_class": target,
                   "position": corner, "seed": seed, "poison_rate": params["poison_rate"],
                   "patch_area": params["patch_area"]}
            tensors, info = ctx.cached(
                "sbv.backdoor_vector", key,
                lambda: self.backdoor_vector(ctx, task, target, trigger, params["poison_rate"], seed),
                label=f"{task}, {corner}, fine-tune seed {seed}")
            triggers.append(trigger)
            vectors.append(tensors)
            built.append((key, info))
        start = time.perf_counter()
        pre = ctx.pretrained()
        clean = ctx.clean_finetune(task)
        fractions, lambdas = search_grid(params)
        tolerance = float(params["acc_tolerance"])
        chosen, table = calibrate(ctx, task, target, clean, vectors, triggers[0], fractions, lambdas, tolerance,
                                  self.sign_consistent)
        sbv = sparse_backdoor_vector(vectors, chosen["fraction"], self.sign_consistent)
        lam = chosen["lambda"]
        task_vector = {k: clean[k] - pre[k] + lam * sbv[k] for k in clean}
        seconds = time.perf_counter() - start
        ta_lambda = probe_lambda(ctx, params)
        merged = probe_merge(ctx, task, task_vector, ta_lambda)
        submitted = {k: pre[k] + v for k, v in task_vector.items()}
        singles = []
        for (key, bv_info), bv, trigger in zip(built, vectors, triggers):
            _, single = ctx.cached(
                "sbv.single_bv",
                {"revision": REVISION, "backdoor_vector": key, "fractions": fractions, "lambdas": lambdas,
                 "acc_tolerance": tolerance, "probe_lambda": ta_lambda},
                lambda: single_bv(ctx, task, target, clean, bv, trigger, fractions, lambdas, tolerance, ta_lambda),
                label=f"{task}, {key['position']}, fine-tune seed {key['seed']}")
            singles.append({"position": key["position"], "seed": key["seed"],
                            "backdoored_acc": bv_info["acc"], "backdoored_asr": bv_info["asr"], **single})
        info = {"evaluated_trigger": 0, "fraction": chosen["fraction"], "lambda_sbv": lam,
                "dev_acc": chosen["acc"], "dev_asr": chosen["asr"], "calibration": table,
                "combine_seconds": seconds, "kept": kept(sbv),
                "asr_per_trigger": [ctx.attack_success_rate(submitted, task, t, target) for t in triggers],
                "probe_lambda": ta_lambda,
                "probe_merged_acc": ctx.accuracy(merged, task),
                "probe_merged_asr_per_trigger": [ctx.attack_success_rate(merged, task, t, target) for t in triggers],
                "single_bvs": singles,
                "best_single_probe_merged_asr": max(s["probe_merged_asr"] for s in singles)}
        if self.sign_consistent:
            mask = sign_consistent_mask(vectors)
            info["sign_consistent"] = float(sum(int(m.sum()) for m in mask.values())
                                            / sum(m.numel() for m in mask.values()))
        return AttackResult(task=task, task_vector=task_vector, trigger=triggers[0], target_class=target, info=info)

    @staticmethod
    def backdoor_vector(ctx: Context, task: str, target: int, trigger, poison_rate: float, seed: int):
        start = time.perf_counter()
        backdoored = badnets_finetune(ctx, task, target, trigger, poison_rate, seed=seed, desc=f"sbv bv seed {seed}")
        clean = ctx.clean_finetune(task, seed=seed)
        info = {"acc": ctx.accuracy(backdoored, task),
                "asr": ctx.attack_success_rate(backdoored, task, trigger, target),
                "seconds": time.perf_counter() - start}
        return {k: v - clean[k] for k, v in backdoored.items()}, info


class SparseBackdoorVector(_SparseBackdoorVector):
    name = "sbv"
    description = "SBV (Pawlak et al., 2025; reconstructed): TopK of the sum of several backdoor vectors"


class SignConsistentSparseBackdoorVector(_SparseBackdoorVector):
    name = "sbv_sc"
    description = "SBV_SC (Pawlak et al., 2025; reconstructed): TopK of the sign-consistent sum of backdoor vectors"
    sign_consistent = True


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(SparseBackdoorVector())
    register(SignConsistentSparseBackdoorVector())
