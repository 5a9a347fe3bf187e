"""The papers' claims as data, checked against stored cell results.

A :class:`Claim` names its paper, states the claim in one line, says how it is computed
(an expression over stored results, printed with the verdict) and holds a function from
the ok cells of one preset (a DataFrame, :func:`frame`) to per-seed values, one mapping
``{seed: value}`` per condition and sub-line (per merger, per attack × merger). Values that
compare two cells are paired: one difference per seed, from the two cells of that seed.

The verdict of a condition (docs/statistics.md), from the 95 % t-interval of its
per-seed values against the claimed side of the threshold:

- ``reproduced``: the interval lies entirely on the claimed side;
- ``not reproduced``: it lies entirely on the other side;
- ``inconclusive``: it contains the threshold, or fewer than 2 seeds give no interval;
- ``not measured``: no seed has the cells (or the claim is not measurable here).

A claim with several conditions (DAM: ASR down *and* ACC kept) is reproduced only when
every condition is, not reproduced when one is not reproduced (even if another is not
measured), otherwise not measured when one is not measured, else inconclusive.
Nothing here computes a model: ``mmbench findings`` reads the store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd

from . import stats
from .leaderboard import per_seed_mean

Values = dict[int, float]
Measure = Callable[[pd.DataFrame], dict[str, list[Values]]]
COLALIGN = ("left", "left", "right", "left", "right", "left", "left")  # claim … why
SYMBOL = {">": ">", ">=": "≥", "<": "<", "<=": "≤"}


@dataclass(frozen=True)
class Condition:
    label: str          # what the values are, e.g. "ASR dam − none"
    op: str             # ">", ">=", "<", "<="
    threshold: float
    difference: bool = False  # the values are differences (shown signed)

    @property
    def claimed(self) -> str:
        return f"{SYMBOL[self.op]} {self.threshold:g}"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    claim: str
    computed: str
    conditions: tuple[Condition, ...]
    measure: Measure
    note: str = ""      # said with every verdict of the claim (e.g. a reconstructed threshold)
    unmeasurable: str = ""  # why no stored result can hold it: always "not measured"


@dataclass
class Verdict:
    verdict: str
    interval: stats.Interval
    why: str = ""


@dataclass
class Line:
    claim: Claim
    sub: str                                    # "" for the claim's own line
    verdict: str
    why: str = ""
    parts: list[tuple[Condition, Verdict]] = field(default_factory=list)


# the cells ------------------------------------------------------------------------------
METRICS = ("acc", "normalized_acc", "asr", "acc_per_task", "normalized_acc_per_task", "finetuned_acc_per_task",
           "base_acc_per_task", "standalone_acc", "standalone_asr", "standalone_clean_acc",
           "standalone_clean_asr", "asr_counts", "asr_ci", "acc_counts_per_task", "acc_ci_per_task",
           "dev_acc", "dev_normalized_acc")


def frame(results: Iterable[dict[str, Any]], sweeps: Iterable[dict[str, Any]] = ()) -> pd.DataFrame:
    """The ok results as a DataFrame: preset, attack, merger, defense, seed, every metric of
    :data:`METRICS` (None where a result lacks it), ``attack_info`` (the result's
    ``info.attack``, {} without an attack) and ``merge_info`` (``info.merge``). Results of another status (failed, stale) are left out.
    ``sweeps``: the preset's sweep points (:func:`mmbench.sweeps.collect`), kept in
    ``df.attrs["sweeps"]`` for the claims measured along a swept parameter (a :class:`_Shared`
    tuple: every frame derived from ``df`` shares it rather than copying it)."""
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        m = r.get("metrics") or {}
        rows.append({"preset": r.get("preset"), "attack": r.get("attack"), "merger": r.get("merger"),
                     "defense": r.get("defense"), "seed": int(r.get("seed")),
                     **{k: m.get(k) for k in METRICS},
                     "attack_info": (r.get("info") or {}).get("attack") or {},
                     "merge_info": (r.get("info") or {}).get("merge") or {}})
    columns = ["preset", "attack", "merger", "defense", "seed", *METRICS, "attack_info", "merge_info"]
    df = pd.DataFrame(rows, columns=columns)
    df = df.sort_values(["preset", "attack", "merger", "defense", "seed"], kind="mergesort").reset_index(drop=True)
    df.attrs["sweeps"] = _Shared(sweeps)
    return df


class _Shared(tuple):
    """A tuple that ``copy.deepcopy`` returns as it is. pandas deep-copies ``attrs`` into every
    frame derived from another (each filter, each column): copying the sweep points as a list
    took 33.6 of the 40 s the claims spent under cProfile in ``mmbench leaderboard``, whose
    wall time went from 30.6 to 14.2 s without it. Read-only by convention: the claims only
    read the points."""

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self


def _where(df: pd.DataFrame, attack: str | None = None, merger: str | None = None,
           defense: str | None = None) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for column, value in (("attack", attack), ("merger", merger), ("defense", defense)):
        if value is not None:
            mask &= df[column] == value
    return df[mask]


def _finite(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def by_seed(df: pd.DataFrame, column: str, **where: str) -> Values:
    """{seed: value of ``column``} of the cell picked by ``where`` (first in sorted order)."""
    out: Values = {}
    picked = _where(df, **where)
    for seed, value in zip(picked["seed"].tolist(), picked[column].tolist()):
        if int(seed) not in out and _finite(value):
            out[int(seed)] = float(value)
    return out


def mergers(df: pd.DataFrame) -> list[str]:
    return sorted(df.merger.unique())


def attacks(df: pd.DataFrame) -> list[str]:
    return sorted(a for a in df.attack.unique() if a != "none")


def defense_effect(df: pd.DataFrame, defense: str, merger: str, column: str) -> Values:
    """Per seed, the mean over attacks (the ones every seed has) of the paired difference
    ``column``(attack/merger/defense) − ``column``(attack/merger/none)."""
    rows = []
    for attack in attacks(df):
        d = stats.paired_values(by_seed(df, column, attack=attack, merger=merger, defense=defense),
                                by_seed(df, column, attack=attack, merger=merger, defense="none"))
        rows += [{"attack": attack, "seed": s, "value": v} for s, v in d.items()]
    values, _ = per_seed_mean(pd.DataFrame(rows, columns=["attack", "seed", "value"]), "value")
    return values


# the claims' measures ------------------------------------------------------------------
def _finetune_gain(df: pd.DataFrame) -> dict[str, list[Values]]:
    out: Values = {}
    for _, r in df.iterrows():
        ft, base = r.finetuned_acc_per_task, r.base_acc_per_task
        if int(r.seed) in out or not isinstance(ft, dict) or not isinstance(base, dict):
            continue
        tasks = sorted(set(ft) & set(base))
        if tasks:
            out[int(r.seed)] = sum(ft[t] - base[t] for t in tasks) / len(tasks)
    return {"": [out]}


def _ta_normalized(df: pd.DataFrame) -> dict[str, list[Values]]:
    return {"": [by_seed(df, "normalized_acc", attack="none", merger="ta", defense="none")]}


def _merger_order(df: pd.DataFrame) -> dict[str, list[Values]]:
    norm = {m: by_seed(df, "normalized_acc", attack="none", merger=m, defense="none")
            for m in ("adamerging", "ties", "ta")}
    return {"": [stats.paired_values(norm["adamerging"], norm["ties"]),
                 stats.paired_values(norm["ties"], norm["ta"])]}


def _classic_collapses(df: pd.DataFrame) -> dict[str, list[Values]]:
    return {m: [by_seed(df, "asr", attack="badnets", merger=m, defense="none")] for m in mergers(df)}


def _badmerging_survives(df: pd.DataFrame) -> dict[str, list[Values]]:
    return {f"{a}/{m}": [by_seed(df, "asr", attack=a, merger=m, defense="none")]
            for a in ("badmerging", "badmerging_off") for m in mergers(df)}


def _over_tasks(df: pd.DataFrame, attack: str, first: int = 2, last: int = 8) -> dict[str, list[Values]]:
    """Per merger of the task-count sweep (``merge.tasks``, the preset's own cells at K = all):
    per seed, the smallest ASR of ``attack``/<merger>/none over K = ``first`` … ``last`` (the Ks
    the preset has), for the seeds that hold every one of those Ks."""
    points = [p for p in df.attrs.get("sweeps", ()) if p["param"] == "merge.tasks"
              and p["attack"] == attack and p["defense"] == "none" and first <= p["value"] <= last]
    out: dict[str, list[Values]] = {}
    for merger in sorted({p["merger"] for p in points}):
        mine = [p for p in points if p["merger"] == merger]
        ks = sorted(p["value"] for p in mine)
        if len(ks) < 2:
            continue  # one K is no sweep
        seeds = set.intersection(*(set(p["seeds"]) for p in mine))
        values = {s: min(p["seeds"][s]["asr"] for p in mine) for s in sorted(seeds)
                  if all(_finite(p["seeds"][s]["asr"]) for p in mine)}
        out[f"{merger}, K {ks[0]:g}–{ks[-1]:g}"] = [values]
    return out


def _lobam_survives(df: pd.DataFrame) -> dict[str, list[Values]]:
    return {m: [by_seed(df, "asr", attack="lobam", merger=m, defense="none")] for m in mergers(df)}


def _merge_backdoor(df: pd.DataFrame) -> dict[str, list[Values]]:
    """Per merger: the merge's ASR, and the largest ASR of one upload alone (the attacker's own
    task's model and each further one, from the attack's ``standalone`` figures)."""
    out: dict[str, list[Values]] = {}
    for m in mergers(df):
        alone: Values = {}
        for _, r in _where(df, attack="merge_backdoor", merger=m, defense="none").iterrows():
            own = (r.attack_info or {}).get("standalone") or {}
            values = [own.get("asr"), *(c.get("asr") for c in (own.get("contributions") or {}).values())]
            values = [float(v) for v in values if _finite(v)]
            if values and int(r.seed) not in alone:
                alone[int(r.seed)] = max(values)
        out[m] = [by_seed(df, "asr", attack="merge_backdoor", merger=m, defense="none"), alone]
    return out


def _sbv_sc_vs_single(df: pd.DataFrame) -> dict[str, list[Values]]:
    out: Values = {}
    for _, r in _where(df, attack="sbv_sc", merger="ta", defense="none").iterrows():
        info = r.attack_info or {}
        # the single BVs were merged at the attack's probe λ: only comparable with a cell merged at that λ
        merged_at = (r.merge_info or {}).get("lambda")
        if merged_at is not None and info.get("probe_lambda") is not None \
                and abs(float(merged_at) - float(info["probe_lambda"])) > 1e-12:
            continue
        singles = [b.get("probe_merged_asr") for b in info.get("single_bvs") or []]
        singles = [float(s) for s in singles if _finite(s)]
        if singles and _finite(r.asr) and int(r.seed) not in out:
            out[int(r.seed)] = float(r.asr) - max(singles)
    return {"": [out]}


def _sbv_sc_vs_sbv(df: pd.DataFrame) -> dict[str, list[Values]]:
    return {m: [stats.paired_values(by_seed(df, "asr", attack="sbv_sc", merger=m, defense="none"),
                                    by_seed(df, "asr", attack="sbv", merger=m, defense="none"))]
            for m in mergers(df)}


def _badtv_negation(df: pd.DataFrame) -> dict[str, list[Values]]:
    out: Values = {}
    cells = _where(df, attack="badtv")
    # the attack's info is the same in every cell of a seed; ta/none first, then any
    cells = pd.concat([_where(cells, merger="ta", defense="none"), cells])
    for _, r in cells.iterrows():
        entry = ((r.attack_info or {}).get("negation") or {}).get("0.3") or {}
        if int(r.seed) not in out and _finite(entry.get("asr")):
            out[int(r.seed)] = float(entry["asr"])
    return {"": [out]}


def _defense_lowers_asr(defense: str) -> Measure:
    def measure(df: pd.DataFrame) -> dict[str, list[Values]]:
        return {m: [defense_effect(df, defense, m, "asr")] for m in mergers(df)}
    return measure


def _asr_and_acc(defense: str) -> Measure:
    def measure(df: pd.DataFrame) -> dict[str, list[Values]]:
        return {m: [defense_effect(df, defense, m, "asr"), defense_effect(df, defense, m, "acc")]
                for m in mergers(df)}
    return measure


_dam = _asr_and_acc("dam")


CLAIMS: tuple[Claim, ...] = (
    Claim("finetune_gain", "task arithmetic papers (Ilharco et al. 2023)",
          "fine-tuning gains accuracy over the pretrained base",
          "mean over tasks of finetuned_acc_per_task − base_acc_per_task (any ok cell of the seed)",
          (Condition("fine-tuned − base ACC", ">", 0.0, True),), _finetune_gain),
    Claim("ta_keeps_60", "Ilharco et al. 2023 (task arithmetic)",
          "task arithmetic keeps ≥ 60 % normalised accuracy",
          "none/ta/none normalized_acc",
          (Condition("normalised ACC", ">=", 0.60),), _ta_normalized),
    Claim("merger_order", "AdaMerging (Yang et al. 2024)",
          "AdaMerging > TIES > TA in normalised accuracy",
          "paired normalized_acc of none/adamerging/none − none/ties/none and none/ties/none − none/ta/none",
          (Condition("adamerging − ties", ">", 0.0, True), Condition("ties − ta", ">", 0.0, True)), _merger_order),
    Claim("classic_collapses", "BadMerging (Zhang et al. 2024)",
          "a classic backdoor (BadNets) falls below ~30 % ASR after merging",
          "badnets/<merger>/none asr, per merger",
          (Condition("ASR", "<", 0.30),), _classic_collapses),
    Claim("badmerging_survives", "BadMerging (Zhang et al. 2024)",
          "BadMerging keeps ≥ 90 % ASR under every merger",
          "badmerging/<merger>/none and badmerging_off/<merger>/none asr, per attack × merger",
          (Condition("ASR", ">=", 0.90),), _badmerging_survives),
    Claim("badmerging_over_tasks", "BadMerging (Zhang et al. 2024)",
          "BadMerging's ASR stays above 92 % from 2 to 8 merged tasks",
          "per merger and seed, the smallest badmerging/<merger>/none asr over merge.tasks = 2 … 8 "
          "(the task-count sweep: mmbench run --sweep merge.tasks=2,3,...; the preset's own cell at K = all)",
          (Condition("smallest ASR over K", ">", 0.92),), lambda df: _over_tasks(df, "badmerging"),
          note="K stops at the preset's number of tasks"),
    Claim("lobam_survives", "LoBAM (Yin et al. 2024)",
          "an attacker limited to LoRA keeps > 98 % ASR after merging by amplifying τ_mal − τ_ben",
          "lobam/<merger>/none asr, per merger (info.attack.lam: the λ its rule chose)",
          (Condition("ASR", ">", 0.98),), _lobam_survives,
          note="the method is reconstructed from the abstract (no public code)"),
    Claim("merge_backdoor_needs_merge", "MergeBackdoor (Wang et al. 2025)",
          "two uploads that are clean alone carry the backdoor once merged",
          "merge_backdoor/<merger>/none asr, and the largest asr of one upload alone "
          "(info.attack.standalone and its contributions)",
          (Condition("merged ASR", ">=", 0.90), Condition("largest ASR of an upload alone", "<=", 0.10)),
          _merge_backdoor,
          note="thresholds reconstructed (the paper: near 100 % merged, about chance alone)"),
    Claim("sbv_sc_beats_single_bv", "Backdoor Vectors (SBV)",
          "SBV_SC's merged ASR beats the best single backdoor vector's",
          "sbv_sc/ta/none asr − max_i info.attack.single_bvs[i].probe_merged_asr (same seed)",
          (Condition("ASR SBV_SC − best single BV", ">", 0.0, True),), _sbv_sc_vs_single),
    Claim("sbv_sc_beats_sbv", "Backdoor Vectors (SBV)",
          "SBV_SC's merged ASR beats SBV's",
          "paired asr sbv_sc/<merger>/none − sbv/<merger>/none, per merger",
          (Condition("ASR sbv_sc − sbv", ">", 0.0, True),), _sbv_sc_vs_sbv),
    Claim("badtv_survives_negation", "BadTV",
          "BadTV's backdoor survives task negation θ_pre − 0.3·τ",
          'info.attack.negation["0.3"].asr of badtv (the attack alone, negated)',
          (Condition("ASR under negation", ">=", 0.5),), _badtv_negation,
          note="threshold 0.5 reconstructed (the paper reports high ASR, no number to hold it to)"),
    Claim("badtv_survives_analogy", "BadTV",
          "BadTV's backdoor survives task analogies",
          "— (no stored result holds it)",
          (Condition("ASR under analogy", ">=", 0.5),), lambda df: {},
          unmeasurable="the badtv plugin does not evaluate task analogies (only addition and negation)"),
    Claim("ibvs_lowers_asr", "Backdoor Vectors (IBVS)",
          "IBVS lowers the ASR of attacks it does not know",
          "per merger and seed, mean over attacks of paired asr <attack>/<merger>/ibvs − <attack>/<merger>/none",
          (Condition("ASR ibvs − none", "<", 0.0, True),), _defense_lowers_asr("ibvs")),
    Claim("dam_lowers_asr", "DAM (−2 to −10 ASR points for ≈ 1 ACC point)",
          "DAM lowers ASR at a cost of ≤ 3 points of ACC",
          "per merger and seed, mean over attacks of paired (dam − none) asr and of (dam − none) acc",
          (Condition("ASR dam − none", "<", 0.0, True), Condition("ACC dam − none", ">=", -0.03, True)), _dam),
    Claim("fine_pruning_lowers_asr", "Fine-Pruning (Liu et al. 2018)",
          "fine-pruning weakens or removes the backdoor at a small cost in clean accuracy",
          "per merger and seed, mean over attacks of paired (fine_pruning − none) asr and of "
          "(fine_pruning − none) acc",
          (Condition("ASR fine_pruning − none", "<", 0.0, True),
           Condition("ACC fine_pruning − none", ">=", -0.01, True)), _asr_and_acc("fine_pruning"),
          note="ACC threshold reconstructed (the abstract: a 0.4-point drop); the adaptation to a merged "
               "ViT is reconstructed, and it fine-tunes on labelled dev data"),
)


# verdicts ---------------------------------------------------------------------------------
def verdict(values: Values | Iterable[float], condition: Condition) -> Verdict:
    """The verdict of one condition from its per-seed values (see the module docstring)."""
    iv = stats.t_interval(values.values() if isinstance(values, dict) else values)
    if iv.n == 0:
        return Verdict("not measured", iv, "the cells are missing")
    if iv.n < 2:
        return Verdict("inconclusive", iv, "1 seed: no interval (needs ≥ 2 seeds)")
    t, lo, hi = condition.threshold, iv.lo, iv.hi
    above = {">": lo > t, ">=": lo >= t, "<": hi < t, "<=": hi <= t}[condition.op]
    other = {">": hi <= t, ">=": hi < t, "<": lo >= t, "<=": lo > t}[condition.op]
    if above:
        return Verdict("reproduced", iv)
    if other:
        return Verdict("not reproduced", iv)
    return Verdict("inconclusive", iv, f"the interval contains {t:g}")


def combine(parts: list[Verdict]) -> tuple[str, str]:
    """A claim's verdict from its conditions' (and the reason, when not reproduced)."""
    names = [p.verdict for p in parts]
    if "not reproduced" in names:   # one condition fails: the conjunction fails, measured or not
        return "not reproduced", ""
    if "not measured" in names:
        return "not measured", next(p.why for p in parts if p.verdict == "not measured")
    if all(n == "reproduced" for n in names):
        return "reproduced", ""
    return "inconclusive", next(p.why for p in parts if p.verdict == "inconclusive")


def evaluate(df: pd.DataFrame, claims: Iterable[Claim] = CLAIMS) -> list[Line]:
    """Every claim's line (and sub-lines) on the ok cells ``df`` of one preset."""
    lines = []
    for claim in claims:
        measured = claim.measure(df) if len(df) and not claim.unmeasurable else {}
        if not measured:
            measured = {"": [{} for _ in claim.conditions]}
        for sub, values in measured.items():
            parts = [(c, verdict(v, c)) for c, v in zip(claim.conditions, values)]
            name, why = combine([p for _, p in parts])
            if claim.unmeasurable:
                name, why = "not measured", claim.unmeasurable
            elif claim.note:
                why = "; ".join(x for x in (why, claim.note) if x)
            lines.append(Line(claim, sub, name, why, parts))
    return lines


# output ------------------------------------------------------------------------------------
def _value(x: float, difference: bool) -> str:
    return "" if x is None or math.isnan(x) else (f"{x:+.3f}" if difference else f"{x:.3f}")


def rows(lines: list[Line]) -> list[dict[str, str]]:
    """Table rows: one per claim line, and one per condition under a line with several."""
    out = []
    for line in lines:
        label = line.claim.id + (f" / {line.sub}" if line.sub else "")
        show = [(label, line.verdict, line.why, line.parts)] if len(line.parts) == 1 else (
            [(label, line.verdict, line.why, [])] + [(f"  · {c.label}", v.verdict, v.why, [(c, v)])
                                                    for c, v in line.parts])
        for name, verdict_, why, parts in show:
            entry = {"claim": name, "verdict": verdict_, "mean": "", "95 % interval": "", "n": "",
                     "claimed": "", "why": why}
            if parts:
                c, v = parts[0]
                iv = v.interval
                entry.update({"mean": _value(iv.mean, c.difference),
                              "95 % interval": (f"[{_value(iv.lo, c.difference)}, {_value(iv.hi, c.difference)}]"
                                                if iv.has_interval else ""),
                              "n": str(iv.n), "claimed": f"{c.label} {c.claimed}"})
            out.append(entry)
    return out


def legend(claims: Iterable[Claim] = CLAIMS) -> list[str]:
    return [f"{c.id} [{c.paper}]: {c.claim}. Computed: {c.computed}." for c in claims]


def text(preset: str, df: pd.DataFrame, lines: list[Line], stale: int = 0) -> str:
    """The plain-text report of ``mmbench findings`` for one preset."""
    from tabulate import tabulate

    seeds = sorted(int(s) for s in df.seed.unique()) if len(df) else []
    head = (f"preset {preset}: {len(df)} ok cells, seeds {', '.join(map(str, seeds)) or 'none'}"
            + (f"; {stale} stale result(s) left out" if stale else "")
            + ". Verdicts from the 95 % t-interval over seeds of each claim's per-seed values "
              "(paired where two cells are compared).")
    table = tabulate(pd.DataFrame(rows(lines)), headers="keys", tablefmt="simple", showindex=False,
                     disable_numparse=True, colalign=COLALIGN)
    return "\n".join([head, "", table, "", *legend({l.claim.id: l.claim for l in lines}.values())])


def markdown(preset: str, df: pd.DataFrame, lines: list[Line]) -> str:
    """The findings section of the leaderboard page for one preset."""
    from .leaderboard import tab

    seeds = sorted(int(s) for s in df.seed.unique()) if len(df) else []
    return "\n".join([
        f"### Findings, preset `{preset}` (seeds {', '.join(map(str, seeds)) or 'none'})", "",
        "Each paper's claim, checked on the ok cells: `reproduced` when the 95 % t-interval over seeds of "
        "the per-seed values (paired where two cells are compared) lies entirely on the claimed side, "
        "`not reproduced` when entirely on the other, `inconclusive` otherwise or with fewer than 2 seeds, "
        "`not measured` without the cells. Same as `mmbench findings`.", "",
        tab(pd.DataFrame(rows(lines)), COLALIGN), "",
        *[f"- {entry}" for entry in legend({l.claim.id: l.claim for l in lines}.values())]])
