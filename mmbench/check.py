"""``mmbench check-plugin NAME``: a plugin run through the contract on ``smoke``, with what is
wrong said in plain words.

What is checked, by kind (every kind: it loaded without a warning, its parameters are declared
with defaults that pass their own checks, ``estimate`` returns a Cost or None):

* attack: its cell under ``ta``/``none`` is ``ok``; the backdoored model alone is triggered more
  than its clean twin (else the attack does nothing here); a rerun gives the same figures;
* merger: its clean merge is ``ok`` and gains ACC over the base model (a merger that returns θ_pre
  gains nothing); it also merges a BadNets cell; a rerun gives the same figures;
* defense: its cells with ``ta`` are ``ok`` with and without an attack; ΔACC and ΔASR against
  ``none`` are reported; a defended merge no better than the base model is flagged;
* detector: its detect and screen stages on ``none`` and BadNets (with ``ta``) are ``ok``; the
  contributor it flags, the malicious one's rank and AUROC are reported; a rerun gives the same
  scores.

Thresholds are loose on purpose (smoke is a sanity check, not a benchmark): a plugin that
passes may still be weak; one that fails has a defect worth reading.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from typing import Any

GAIN = 0.02        # a merge must beat the base model's mean ACC by this much
TRIGGERED = 0.10   # the backdoored model alone must beat its clean twin's ASR by this much


@dataclass
class Finding:
    level: str      # ok | warn | FAIL
    text: str


def _cell(results: list[dict[str, Any]], attack: str, merger: str, defense: str) -> dict[str, Any]:
    for r in results:
        if (r.get("attack"), r.get("merger"), r.get("defense")) == (attack, merger, defense):
            return r
    return {"status": "missing"}


def _status(out: list[Finding], r: dict[str, Any], what: str) -> bool:
    if r.get("status") == "ok":
        return True
    where = f" (traceback in its result JSON: {r['traceback'].strip().splitlines()[-1]})" if r.get("traceback") else ""
    out.append(Finding("FAIL", f"{what}: {r.get('status')}: {r.get('error', 'no result')}{where}"))
    return False


def check_plugin(name: str, registry, store_root: str | None = None, preset_name: str = "smoke") -> list[Finding]:
    from .api import Cost, Sizes
    from .estimate import finetune_images, task_sizes
    from .graph import StageKeys, resolve_params
    from .params import check, declared
    from .plugins import UsageError
    from .run import run
    from .store import Store

    out: list[Finding] = []
    kinds = [k for k in ("attack", "merger", "defense", "detector") if name in registry.names(k)]
    if not kinds:
        from .plugins import unknown_name
        raise unknown_name("plugin", name, sorted({n for k in ("attack", "merger", "defense", "detector")
                                                   for n in registry.names(k)}), registry)
    kind = kinds[0]
    reg = registry.get(kind, name)
    out.append(Finding("ok", f"{kind} {name} loads from {reg.distribution} {reg.version} (code {reg.code})"))
    preset = registry.get("preset", preset_name).obj

    # parameters and the cost estimate
    params = declared(reg.obj)
    try:
        check(kind, name, params, {k: p.default for k, p in params.items()}, "its defaults")
        resolved = resolve_params(reg, preset, {})
        out.append(Finding("ok", f"{len(params)} declared parameter(s); defaults pass their own checks"))
    except UsageError as exc:
        out.append(Finding("FAIL", f"a declared default fails its own declaration: {exc}"))
        return out
    keys = StageKeys(preset)
    found = {t: task_sizes(keys, Store(store_root or tempfile.gettempdir()), t) for t in preset.task_names}
    sizes = Sizes(preset.task_names, {t: finetune_images(keys, t, found[t][0]) for t in preset.task_names},
                  {t: found[t][2] for t in preset.task_names}, {t: found[t][1] for t in preset.task_names},
                  preset.adversary_task)
    try:
        cost = reg.obj.estimate(dict(resolved), sizes)
        if cost is not None and not isinstance(cost, Cost):
            out.append(Finding("FAIL", f"estimate() returned {type(cost).__name__}, not mmbench.api.Cost or None"))
        else:
            out.append(Finding("ok" if cost is not None else "warn",
                               "estimate() gives a cost" if cost is not None else
                               "estimate() gives None: `mmbench plan` shows no time for its stages"))
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported
        out.append(Finding("FAIL", f"estimate() raised {type(exc).__name__}: {exc}"))

    # through the harness on the preset
    with tempfile.TemporaryDirectory(prefix="mmbench-check-") as tmp:
        root = store_root or tmp
        store = Store(root)
        if kind == "detector":
            _check_detector(out, name, preset, store, registry)
            return out
        if kind == "attack":
            sel = dict(attacks=["none", name], mergers=["ta"], defenses=["none"])
        elif kind == "merger":
            sel = dict(attacks=["none", "badnets"] if "badnets" in registry.names("attack") else ["none"],
                       mergers=[name], defenses=["none"])
        else:
            sel = dict(attacks=["none", "badnets"] if "badnets" in registry.names("attack") else ["none"],
                       mergers=["ta"], defenses=["none", name])
        first = run(preset, store, seeds=[0], registry=registry, jobs=1, **sel).results
        again = run(preset, store, seeds=[0], registry=registry, jobs=1, rerun="always", **sel).results
        merger = name if kind == "merger" else "ta"
        defense = name if kind == "defense" else "none"
        clean = _cell(first, "none", merger, defense)
        if kind == "attack":
            r = _cell(first, name, "ta", "none")
            if _status(out, r, f"cell {name}/ta/none"):
                m = r["metrics"]
                alone, twin = m.get("standalone_asr") or 0.0, m.get("standalone_clean_asr") or 0.0
                level = "ok" if alone - twin >= TRIGGERED else "FAIL"
                out.append(Finding(level, f"the backdoored model alone: ASR {100 * alone:.1f} against its clean twin's "
                                          f"{100 * twin:.1f}" + ("" if level == "ok" else
                                          " — the backdoor does not work even before merging")))
                out.append(Finding("ok", f"after a TA merge: ACC {100 * m['acc']:.1f}, ASR {100 * m['asr']:.1f}"))
        elif _status(out, clean, f"cell none/{merger}/{defense}"):
            m = clean["metrics"]
            gain = m["acc_gain_over_base"]
            level = "ok" if gain >= GAIN else "FAIL"
            what = "merge" if kind == "merger" else "defended merge"
            out.append(Finding(level, f"the clean {what}: ACC {100 * m['acc']:.1f} against the base model's "
                                      f"{100 * m['base_acc']:.1f} (gain {100 * gain:+.1f})" + (
                               "" if level == "ok" else f" — no better than the pretrained model: is anything merged?")))
            if kind == "defense":
                plain = _cell(first, "none", "ta", "none").get("metrics", {})
                if plain:
                    out.append(Finding("ok", f"ΔACC against no defense: {100 * (m['acc'] - plain['acc']):+.1f}"))
            attacked = _cell(first, "badnets", merger, defense)
            if attacked.get("status") != "missing" and _status(out, attacked, f"cell badnets/{merger}/{defense}"):
                a = attacked["metrics"]
                line = f"with BadNets: ACC {100 * a['acc']:.1f}, ASR {100 * a['asr']:.1f}"
                if kind == "defense":
                    undefended = _cell(first, "badnets", "ta", "none").get("metrics", {})
                    if undefended:
                        line += f" (no defense: ASR {100 * undefended['asr']:.1f})"
                out.append(Finding("ok", line))
        # a rerun computes the same figures (same keys, same inputs)
        before = {r.get("cell"): r.get("metrics") for r in first if r.get("status") == "ok"}
        after = {r.get("cell"): r.get("metrics") for r in again if r.get("status") == "ok"}
        differ = sorted(c for c in before if after.get(c) != before[c])
        out.append(Finding("ok" if not differ else "FAIL",
                           "a recomputation gives the same figures" if not differ else
                           f"recomputing gives other figures for {', '.join(differ)}: draw randomness only from "
                           "ctx.generator(...) or the generators the harness passes"))
        for r in first:
            try:
                json.dumps(r.get("info"))
            except TypeError as exc:  # the store would have refused it already; belt and braces
                out.append(Finding("FAIL", f"its info is not JSON-able: {exc}"))
    return out


def _check_detector(out: list[Finding], name: str, preset, store, registry) -> None:
    """A detector on smoke: BadNets and no attack, screened under ``ta``, computed twice."""
    from .run import run

    sel = dict(attacks=["none", "badnets"] if "badnets" in registry.names("attack") else ["none"],
               mergers=["ta"], defenses=["none"], detectors=[name])
    first = run(preset, store, seeds=[0], registry=registry, jobs=1, **sel)
    again = run(preset, store, seeds=[0], registry=registry, jobs=1, rerun="always", **sel)
    for label, error in first.failed_stages:
        out.append(Finding("FAIL", f"{label}: {error} (traceback in its result JSON under results/"
                                   f"{preset.name}/detection/)"))
    results = {r["id"]: r for r in first.detection}
    for r in sorted(results.values(), key=lambda r: r["id"]):
        if r.get("kind") == "detect":
            scores = ", ".join(f"{t} {v:.3g}" for t, v in r["scores"].items())
            if r.get("malicious"):
                auc = "none (no clean contributor)" if r.get("auroc") is None else f"{r['auroc']:.2f}"
                out.append(Finding("ok", f"on {r['attack']}: scores {scores}; flags {r['flagged']} (malicious: "
                                         f"{', '.join(r.get('malicious_all') or [r['malicious']])}, "
                                         f"rank {r['rank_of_malicious']}, AUROC {auc})"))
            else:
                out.append(Finding("ok", f"without an attack: scores {scores}; flags {r['flagged']}"))
        else:
            m = r.get("metrics") or {}
            out.append(Finding("ok", f"screened {r['attack']}/ta without {r['left_out']}: ACC {100 * m['acc']:.1f}"
                                     + (f", ASR {100 * m['asr']:.1f}" if m.get("asr") is not None else "")))
    if not first.failed_stages and not results:
        out.append(Finding("FAIL", "no detection result came back"))
    before = {r["id"]: r.get("scores") for r in first.detection if r.get("kind") == "detect"}
    after = {r["id"]: r.get("scores") for r in again.detection if r.get("kind") == "detect"}
    differ = sorted(i for i in before if after.get(i) != before[i])
    out.append(Finding("ok" if not differ else "FAIL",
                       "a recomputation gives the same scores" if not differ else
                       f"recomputing gives other scores for {', '.join(differ)}: draw randomness only from "
                       "ctx.generator(...)"))


def render(name: str, findings: list[Finding]) -> str:
    width = max(len(f.level) for f in findings)
    lines = [f"{f.level:<{width}}  {f.text}" for f in findings]
    bad = sum(f.level == "FAIL" for f in findings)
    lines.append(f"{name}: " + ("passes the contract on smoke" if not bad else f"{bad} problem(s)"))
    return "\n".join(lines)
