"""The detection track on the leaderboard: which results are current, and the two tables.

* **Detection** (per detector and attack): AUROC of the suspicion scores, the malicious
  contributor against the clean ones. Per seed there is one malicious and K−1 clean
  contributors (two malicious for an attack that uploads two, MergeBackdoor), so a seed's
  AUROC is the fraction of (malicious, clean) pairs where the malicious one scores higher
  (ties count one half); the table gives its mean ± 95 % t-interval over seeds, the AUROC
  pooled over seeds (every seed's malicious scores against every seed's clean scores), and
  in how many seeds a malicious contributor was the most suspicious.
* **Screening** (per detector, attack and merger): the merge without the most suspicious
  contributor against the plain merge (the cell ``attack/merger/none``): ASR and
  normalised ACC, each mean ± t-interval, and the paired difference screened − plain.
  For ``--attack none`` it is the price of a false alarm: the ACC lost by leaving out an
  honest contributor.

Reads stored results only (no torch); ``mmbench leaderboard`` renders it into README.md,
``detection.csv`` and the page.
"""
from __future__ import annotations

import html
from typing import Any, Iterable

import pandas as pd

from . import stats

NO_ATTACK = "none"


def collect(store, graph, declared_seeds: Iterable[int]) -> list[dict[str, Any]]:
    """One entry per detect and screen stage of ``graph`` for the declared seeds: the stored
    result with ``status`` ok, or a stub with status stale / failed / not run."""
    from .detect import stage_result_id

    seeds = set(declared_seeds)
    out = []
    for key in graph.detection:
        stage = graph.stage(key)
        if stage.seed not in seeds:
            continue
        rid = stage_result_id(stage)
        stored = store.load_result(graph.preset.name, rid)
        p = stage.params
        stub = {"id": rid, "kind": stage.kind, "preset": graph.preset.name, "attack": stage.attack,
                "detector": p["detector"], "seed": stage.seed, "key": key}
        if stage.kind == "screen":
            stub["merger"] = stage.merger
        if stored is None:
            out.append({**stub, "status": "not run"})
        elif stored.get("status") == "unreadable":
            out.append({**stub, "status": "unreadable", "error": stored.get("error")})
        elif stored.get("key") != key:
            out.append({**stored, "status": "stale"})
        else:
            out.append(stored)
    return out


def problems(entries: list[dict[str, Any]]) -> list[str]:
    """One line per stored entry that is stale, failed or unreadable (``mmbench leaderboard
    --check`` fails on them). A detection stage that was never run is not a problem: the
    detection track is an extra table, reported as "not run" where it is, so that installing a
    detector does not void a preset's published cells (see :func:`not_run`)."""
    return [f"{e['preset']} {e['id']}: {e['status']}" for e in entries if e.get("status") not in ("ok", "not run")]


def not_run(entries: list[dict[str, Any]]) -> int:
    return sum(e.get("status") == "not run" for e in entries)


def frame(entries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per detect / screen result (detection.csv)."""
    rows = []
    for e in entries:
        m = e.get("metrics") or {}
        rows.append({
            "preset": e.get("preset"), "kind": e.get("kind"), "detector": e.get("detector"),
            "attack": e.get("attack"), "merger": e.get("merger", ""), "seed": e.get("seed"),
            "status": e.get("status"), "malicious": e.get("malicious") or "",
            "flagged": e.get("flagged", e.get("left_out", "")) or "",
            "auroc": e.get("auroc"), "rank_of_malicious": e.get("rank_of_malicious"),
            "acc": m.get("acc"), "normalized_acc": m.get("normalized_acc"), "asr": m.get("asr"),
            "scores": ";".join(f"{t}={v:.6g}" for t, v in (e.get("scores") or {}).items()),
            "seconds": e.get("seconds"), "key": e.get("key"),
        })
    cols = ["preset", "kind", "detector", "attack", "merger", "seed", "status", "malicious", "flagged", "auroc",
            "rank_of_malicious", "acc", "normalized_acc", "asr", "scores", "seconds", "key"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["preset", "kind", "detector", "attack", "merger", "seed"], kind="stable").reset_index(
        drop=True)


def detection_table(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (detector, attack) with an attack: AUROC over seeds, pooled AUROC, seeds flagged."""
    from .detect import auroc, malicious_of

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        if e.get("kind") == "detect" and e.get("status") == "ok" and e.get("attack") != NO_ATTACK:
            groups.setdefault((e["detector"], e["attack"]), []).append(e)
    rows = []
    for (detector, attack), group in sorted(groups.items()):
        group.sort(key=lambda e: e["seed"])
        bad = [set(malicious_of(e)) for e in group]
        pos = [e["scores"][t] for e, m in zip(group, bad) for t in m]
        neg = [s for e, m in zip(group, bad) for t, s in e["scores"].items() if t not in m]
        rows.append({"detector": detector, "attack": attack, "n": len(group),
                     "auroc": stats.t_interval(e["auroc"] for e in group),
                     "pooled": auroc(pos, neg),
                     "flagged": sum(e["flagged"] in m for e, m in zip(group, bad)),
                     "rank": stats.t_interval(e["rank_of_malicious"] for e in group),
                     "seeds": [e["seed"] for e in group]})
    return rows


def screening_table(entries: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (detector, attack, merger): screened against plain (defense none) ASR and norm ACC."""
    plain = {(c.get("attack"), c.get("merger"), c.get("seed")): c.get("metrics") or {}
             for c in cells if c.get("defense") == "none" and c.get("status") == "ok" and not c.get("setting")}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in entries:
        if e.get("kind") == "screen" and e.get("status") == "ok":
            groups.setdefault((e["detector"], e["attack"], e["merger"]), []).append(e)
    rows = []
    for (detector, attack, merger), group in sorted(groups.items()):
        screened_asr = {e["seed"]: e["metrics"].get("asr") for e in group}
        screened_acc = {e["seed"]: e["metrics"].get("normalized_acc") for e in group}
        base_asr = {s: plain.get((attack, merger, s), {}).get("asr") for s in screened_asr}
        base_acc = {s: plain.get((attack, merger, s), {}).get("normalized_acc") for s in screened_acc}
        clean = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
        rows.append({
            "detector": detector, "attack": attack, "merger": merger, "n": len(group),
            "left_out_malicious": sum(bool(e.get("left_out_malicious")) for e in group),
            "asr_plain": stats.t_interval(clean(base_asr).values()),
            "asr_screened": stats.t_interval(clean(screened_asr).values()),
            "d_asr": stats.paired(clean(screened_asr), clean(base_asr)) if attack != NO_ATTACK else None,
            "acc_plain": stats.t_interval(clean(base_acc).values()),
            "acc_screened": stats.t_interval(clean(screened_acc).values()),
            "d_acc": stats.paired(clean(screened_acc), clean(base_acc)),
        })
    return rows


def _f(iv: stats.Interval | None, signed: bool = False, scale: float = 100.0, digits: int = 1) -> str:
    from .leaderboard import fmt_interval

    return fmt_interval(iv, signed=signed, scale=scale, digits=digits) if iv is not None else ""


LEGEND = ("AUROC: the malicious contributor's suspicion score against the clean contributors' (1 = always "
          "ranked first, 0.5 = chance); per seed, then mean ± 95 % t-interval over seeds; pooled: every "
          "seed's malicious score against every seed's clean scores. Screened: the merge without the most "
          "suspicious contributor (a tie goes to the first in merge order), ACC over all tasks (the left-out "
          "one included); plain: the cell attack/merger/none. Δ: paired over seeds, screened − plain, in "
          "points; `*`: the interval excludes 0.")


def markdown(preset: str, entries: list[dict[str, Any]], cells: list[dict[str, Any]]) -> str:
    """The leaderboard README's detection section of one preset ('' without detection results)."""
    if not entries:
        return ""
    from .leaderboard import tab

    lines = [f"### Detection track, preset `{preset}`", "", LEGEND, ""]
    det = detection_table(entries)
    if det:
        lines += [tab(pd.DataFrame({
            "detector": [r["detector"] for r in det], "attack": [r["attack"] for r in det],
            "n": [r["n"] for r in det], "AUROC": [_f(r["auroc"], scale=1, digits=2) for r in det],
            "pooled AUROC": [f"{r['pooled']:.2f}" if r["pooled"] is not None else "" for r in det],
            "flagged first": [f"{r['flagged']}/{r['n']}" for r in det],
            "rank of malicious": [_f(r["rank"], scale=1, digits=1) for r in det]})), ""]
    scr = screening_table(entries, cells)
    if scr:
        lines += [tab(pd.DataFrame({
            "detector": [r["detector"] for r in scr], "attack": [r["attack"] for r in scr],
            "merger": [r["merger"] for r in scr], "n": [r["n"] for r in scr],
            "left out = malicious": [f"{r['left_out_malicious']}/{r['n']}" if r["attack"] != NO_ATTACK else "—"
                                     for r in scr],
            "ASR plain": [_f(r["asr_plain"]) for r in scr], "ASR screened": [_f(r["asr_screened"]) for r in scr],
            "ΔASR": [_f(r["d_asr"], signed=True) for r in scr],
            "Norm ACC plain": [_f(r["acc_plain"]) for r in scr],
            "Norm ACC screened": [_f(r["acc_screened"]) for r in scr],
            "ΔNorm ACC": [_f(r["d_acc"], signed=True) for r in scr]})), ""]
    bad = [e for e in entries if e.get("status") != "ok"]
    if bad:
        lines += [f"{len(bad)} detection result(s) not ok: " + ", ".join(
            f"{e['id']} ({e['status']})" for e in bad[:10]) + (" …" if len(bad) > 10 else ""), ""]
    return "\n".join(lines)


def html_section(preset: str, entries: list[dict[str, Any]], cells: list[dict[str, Any]], pid: str) -> str:
    """The page's detection section of one preset (tables in the page's own sortable style)."""
    from .site import _int_cell, _interval_cell, _table, _text_cell, _value_cell

    if not entries:
        return '<p class="muted">No detection results.</p>'
    out = [f"<p>{html.escape(LEGEND)}</p>"]
    det = detection_table(entries)
    rows = ["<tr>" + "".join([
        _text_cell(r["detector"]), _text_cell(r["attack"]), _int_cell(r["n"]),
        _interval_cell(r["auroc"], scale=1, digits=2),
        _value_cell(r["pooled"], scale=1, digits=2), _text_cell(f"{r['flagged']}/{r['n']}"),
        _interval_cell(r["rank"], scale=1, digits=1)]) + "</tr>" for r in det]
    out.append(_table(f"{pid}-detection-table", (("detector", ""), ("attack", ""), ("n", "seeds"),
                                                 ("AUROC", "mean ± 95 % t-interval over seeds"),
                                                 ("pooled AUROC", "all seeds together"),
                                                 ("flagged first", "seeds where the malicious contributor "
                                                                   "had the highest score"),
                                                 ("rank of malicious", "1 = most suspicious")), rows))
    scr = screening_table(entries, cells)
    rows = ["<tr>" + "".join([
        _text_cell(r["detector"]), _text_cell(r["attack"]), _text_cell(r["merger"]), _int_cell(r["n"]),
        _text_cell(f"{r['left_out_malicious']}/{r['n']}" if r["attack"] != NO_ATTACK else "—"),
        _interval_cell(r["asr_plain"]), _interval_cell(r["asr_screened"]),
        _interval_cell(r["d_asr"], signed=True) if r["d_asr"] is not None else '<td class="num" data-v=""></td>',
        _interval_cell(r["acc_plain"]), _interval_cell(r["acc_screened"]),
        _interval_cell(r["d_acc"], signed=True)]) + "</tr>" for r in scr]
    out.append(_table(f"{pid}-screening-table", (
        ("detector", ""), ("attack", ""), ("merger", ""), ("n", "seeds"),
        ("left out = malicious", "seeds where the screen removed the malicious contributor"),
        ("ASR plain", "attack/merger/none, %"), ("ASR screened", "%"), ("ΔASR", "screened − plain, points"),
        ("Norm ACC plain", "%"), ("Norm ACC screened", "%"), ("ΔNorm ACC", "screened − plain, points")), rows))
    bad = [e for e in entries if e.get("status") != "ok"]
    if bad:
        out.append("<p class='muted'>" + html.escape(f"{len(bad)} detection result(s) not ok: " + ", ".join(
            f"{e['id']} ({e['status']})" for e in bad[:10])) + "</p>")
    return "\n".join(out)
