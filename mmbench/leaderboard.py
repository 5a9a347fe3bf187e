"""Stored cell results → tables (pandas), ``leaderboard/README.md`` (tabulate),
``leaderboard/results.csv`` (one row per cell and seed) and ``leaderboard/summary.csv``
(one row per attack × merger × defense, over seeds).

Every cell of the installed cross product appears in the per-cell table: status ok /
failed from its result, ``not run`` where no result is stored, ``stale`` where the stored
result's key is not the cell's current key (it was made with other parameters, plugin
versions or preset content; its figures are shown, but no Δ is taken against it and it
enters no figure over seeds).

Statistics (docs/statistics.md): within a cell, ASR carries its Wilson 95 % interval from
its counts; over seeds every figure is mean ± 95 % t-interval with n stated; every
difference (a defense against ``none``, merged against the attacked model alone, DER) is
taken per seed and then given its t-interval (a paired difference).

The output depends on the stored result JSONs only (no generation time; rows sorted), so
``mmbench leaderboard --check`` can compare it byte for byte with the committed files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import stats
from .keys import canonical_json

KEYS = ["preset", "attack", "merger", "defense"]
COLUMNS = ["preset", "attack", "merger", "defense", "seed", "status", "acc", "normalized_acc", "asr",
           "asr_lo", "asr_hi", "asr_k", "asr_n",
           "standalone_acc", "standalone_asr", "standalone_clean_acc", "standalone_clean_asr",
           "d_acc_vs_none", "d_asr_vs_none", "der_vs_none", "d_asr_vs_alone", "seconds", "error",
           "attack_distribution", "attack_version", "merger_distribution", "merger_version",
           "defense_distribution", "defense_version"]
# figures over seeds: plain means of the ok cells, then per-seed (paired) differences
SUMMARY_STATS = ["acc", "normalized_acc", "asr", "standalone_asr",
                 "d_acc_vs_none", "d_asr_vs_none", "der_vs_none", "d_asr_vs_alone"]
PAIRED = {"d_acc_vs_none", "d_asr_vs_none", "der_vs_none", "d_asr_vs_alone"}
DIFFERENCES = PAIRED - {"der_vs_none"}  # signed, marked when their interval excludes 0


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def row(result: dict[str, Any]) -> dict[str, Any]:
    m = result.get("metrics") or {}
    k = n = lo = hi = None
    counts = m.get("asr_counts")
    if counts and len(counts) == 2 and counts[1]:
        k, n = int(counts[0]), int(counts[1])
        lo, hi = stats.wilson(k, n)
    elif m.get("asr_ci"):
        lo, hi = (float(x) for x in m["asr_ci"])
    return {
        "preset": result.get("preset"), "attack": result.get("attack"), "merger": result.get("merger"),
        "defense": result.get("defense"), "seed": result.get("seed"), "status": result.get("status"),
        "acc": _num(m.get("acc")), "normalized_acc": _num(m.get("normalized_acc")), "asr": _num(m.get("asr")),
        "asr_lo": lo, "asr_hi": hi, "asr_k": k, "asr_n": n,
        "standalone_acc": _num(m.get("standalone_acc")), "standalone_asr": _num(m.get("standalone_asr")),
        "standalone_clean_acc": _num(m.get("standalone_clean_acc")),
        "standalone_clean_asr": _num(m.get("standalone_clean_asr")),
        "seconds": (result.get("durations") or {}).get("total"),
        "error": result.get("error", ""),
        # which package made each part of the cell (a third party's plugin, or mmbench's own)
        **{f"{kind}_{field}": ((result.get("plugins") or {}).get(kind) or {}).get(field, "")
           for kind in ("attack", "merger", "defense") for field in ("distribution", "version")},
    }


def _sort(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The leaderboard's order: the no-attack baseline first, then by name (stable)."""
    df = df.assign(_a=df.attack.map(lambda a: 0 if a == "none" else 1))
    return df.sort_values(["preset", "_a"] + keys[1:], kind="mergesort").drop(columns="_a").reset_index(drop=True)


def table(results: Iterable[dict[str, Any]], expected: Iterable[tuple] = ()) -> pd.DataFrame:
    """One row per cell; ``expected`` (preset, attack, merger, defense, seed) tuples without a
    result become ``not run`` rows. Adds, per seed, each defense's ΔACC/ΔASR and DER against
    defense ``none`` of the same attack and merger, and merged − alone ASR."""
    rows = [row(r) for r in results]
    have = {(r["preset"], r["attack"], r["merger"], r["defense"], r["seed"]) for r in rows}
    for cell in expected:
        if tuple(cell) not in have:
            rows.append(dict(zip(("preset", "attack", "merger", "defense", "seed"), cell), status="not run"))
            have.add(tuple(cell))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    for column in COLUMNS[6:COLUMNS.index("error")]:
        df[column] = pd.to_numeric(df[column]).astype("Int64" if column in ("asr_k", "asr_n") else float)
    ok = df[(df.status == "ok") & (df.defense == "none")].set_index(["preset", "attack", "merger", "seed"])
    for i, r in df.iterrows():
        if r.status != "ok":
            continue
        if pd.notna(r.asr) and pd.notna(r.standalone_asr):
            df.at[i, "d_asr_vs_alone"] = r.asr - r.standalone_asr
        ref_key = (r.preset, r.attack, r.merger, r.seed)
        if r.defense != "none" and ref_key in ok.index:
            ref = ok.loc[ref_key]
            df.at[i, "d_acc_vs_none"] = r.acc - ref.acc
            if pd.notna(r.asr) and pd.notna(ref.asr):
                df.at[i, "d_asr_vs_none"] = r.asr - ref.asr
                df.at[i, "der_vs_none"] = stats.der(ref.acc, r.acc, ref.asr, r.asr)
    return _sort(df, KEYS + ["seed"])


def over_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (preset, attack, merger, defense) from its ``ok`` cells: ``seeds`` counts
    them; for each figure of :data:`SUMMARY_STATS` ``<figure>_n``, ``_mean``, ``_sd``, ``_lo``
    and ``_hi`` (the 95 % t-interval; NaN for one seed). The Δ figures are per-seed
    differences (paired), so their interval is the paired one."""
    columns = KEYS + ["seeds"] + [f"{s}_{p}" for s in SUMMARY_STATS for p in ("n", "mean", "sd", "lo", "hi")]
    ok = df[df.status == "ok"] if len(df) else df
    if ok.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for key, part in ok.groupby(KEYS, sort=False):
        entry: dict[str, Any] = dict(zip(KEYS, key), seeds=int(part.seed.nunique()))
        for stat in SUMMARY_STATS:
            iv = stats.t_interval(part[stat])
            entry.update({f"{stat}_n": iv.n, f"{stat}_mean": iv.mean, f"{stat}_sd": iv.sd,
                          f"{stat}_lo": iv.lo, f"{stat}_hi": iv.hi})
        out.append(entry)
    return _sort(pd.DataFrame(out, columns=columns), KEYS)


def per_seed_mean(part: pd.DataFrame, column: str, over: str = "attack") -> tuple[dict[int, float], list[str]]:
    """Per seed, the mean of ``column`` over the values of ``over`` (e.g. attacks) that every
    seed has, so that each seed's mean is over the same set; returns it and that set."""
    part = part[part[column].notna()]
    if part.empty:
        return {}, []
    seeds = sorted(part.seed.unique())
    common = set.intersection(*(set(part[part.seed == s][over]) for s in seeds))
    names = sorted(common)
    if not names:
        return {}, []
    kept = part[part[over].isin(names)]
    return {int(s): float(kept[kept.seed == s][column].mean()) for s in seeds}, names


def attack_ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Per merger, the attacks by mean ASR after merging (defense ``none``), highest first,
    each with the paired difference to the next one down."""
    ok = df[(df.status == "ok") & (df.defense == "none") & (df.attack != "none") & df.asr.notna()]
    rows = []
    for merger in sorted(ok.merger.unique()):
        part = ok[ok.merger == merger]
        by_attack = {a: dict(zip(p.seed.astype(int), p.asr)) for a, p in part.groupby("attack")}
        ranked = sorted(by_attack, key=lambda a: (-stats.t_interval(by_attack[a].values()).mean, a))
        for i, attack in enumerate(ranked):
            nxt = ranked[i + 1] if i + 1 < len(ranked) else None
            rows.append({"merger": merger, "rank": i + 1, "attack": attack,
                         "asr": stats.t_interval(by_attack[attack].values()),
                         "next": nxt, "d_next": stats.paired(by_attack[attack], by_attack[nxt]) if nxt else None})
    return pd.DataFrame(rows, columns=["merger", "rank", "attack", "asr", "next", "d_next"])


def defense_ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Per merger (and over all mergers), each defense's ASR removed (ASR_none − ASR_defense),
    ACC lost (ACC_none − ACC_defense) and DER: per seed the mean over the attacks every seed
    has, then the t-interval. Ordered by mean DER, highest first."""
    ok = df[(df.status == "ok") & (df.defense != "none") & (df.attack != "none") & df.der_vs_none.notna()]
    ok = ok.assign(asr_removed=-ok.d_asr_vs_none, acc_lost=-ok.d_acc_vs_none,
                   pair=ok.attack + "/" + ok.merger)
    rows = []
    for merger in sorted(ok.merger.unique()) + ["all"]:
        part = ok if merger == "all" else ok[ok.merger == merger]
        over = "pair" if merger == "all" else "attack"
        block = []
        for defense in sorted(part.defense.unique()):
            d = part[part.defense == defense]
            entry = {"merger": merger, "defense": defense}
            for column in ("asr_removed", "acc_lost", "der_vs_none"):
                values, names = per_seed_mean(d, column, over)
                entry[column] = stats.t_interval(values.values())
                entry["attacks"] = len(names)
            block.append(entry)
        rows += sorted(block, key=lambda e: (-e["der_vs_none"].mean, e["defense"]))
    return pd.DataFrame(rows, columns=["merger", "defense", "asr_removed", "acc_lost", "der_vs_none", "attacks"])


# formatting -----------------------------------------------------------------------
TEXT_COLUMNS = {"attack", "merger", "defense", "status"}


def tab(show: pd.DataFrame, align: Iterable[str] | None = None) -> str:
    """A github table of pre-formatted strings: names left-aligned, figures right-aligned."""
    from tabulate import tabulate

    align = list(align) if align else ["left" if c in TEXT_COLUMNS else "right" for c in show.columns]
    return tabulate(show, headers="keys", tablefmt="github", showindex=False, disable_numparse=True,
                    colalign=align)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _pct(value: Any) -> str:
    return "" if _missing(value) else f"{100 * float(value):.1f}"


def _signed(value: Any) -> str:
    return "" if _missing(value) else f"{100 * float(value):+.1f}"


def _wilson(lo: Any, hi: Any) -> str:
    return "" if _missing(lo) or _missing(hi) else f"[{100 * float(lo):.1f}, {100 * float(hi):.1f}]"


def fmt_interval(iv: stats.Interval | None, signed: bool = False, n: int | None = None,
                 scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± half`` (×``scale``); the mean alone for one value; `` *`` when a difference's
    interval excludes 0; ``(n=k)`` when k is not the table's ``n``."""
    if iv is None or iv.n == 0:
        return ""
    sign = "+" if signed else ""
    text = f"{scale * iv.mean:{sign}.{digits}f}"
    if iv.has_interval:
        text += f" ± {scale * iv.half:.{digits}f}"
        if signed and iv.excludes(0.0):
            text += " *"
    if n is not None and iv.n != n:
        text += f" (n={iv.n})"
    return text


def _summary_cell(r: pd.Series, stat: str) -> str:
    iv = stats.Interval(int(r[f"{stat}_n"]), r[f"{stat}_mean"], r[f"{stat}_sd"],
                        (r[f"{stat}_hi"] - r[f"{stat}_lo"]) / 2 if r[f"{stat}_n"] >= 2 else float("nan"))
    if stat == "der_vs_none":
        return fmt_interval(iv, n=int(r.seeds), scale=1, digits=3)
    return fmt_interval(iv, signed=stat in DIFFERENCES, n=int(r.seeds))


LEGEND = ("ACC: mean top-1 over the merged tasks' clean test sets. Norm ACC: merged ÷ fine-tuned ACC, "
          "averaged over tasks. ASR: triggered test images of the target task (target-class samples "
          "excluded) classified as the target; ASR 95 %: its Wilson interval from the cell's counts. "
          "Alone: the backdoored model before merging. ΔACC/ΔASR: against defense `none` for the same "
          "attack, merger and seed; DER = [max(0, −ΔASR) − max(0, −ΔACC) + 1]/2 (BackdoorBench). "
          "All figures in %, DER as a fraction.")
STATS_LEGEND = ("Over seeds: mean ± half-width of the 95 % t-interval x̄ ± t₀.₉₇₅,ₙ₋₁·s/√n of the ok cells "
                "(n = 3 → t = 4.303; no interval for n = 1). ΔACC, ΔASR, DER and merged − alone are "
                "paired: one difference per seed, then its t-interval; `*` marks an interval that excludes "
                "0 (the only case where the two differ). `(n=k)`: a figure over fewer seeds than the row's n. "
                "See docs/statistics.md.")


def markdown(df: pd.DataFrame, title: str = "mmbench leaderboard", notes: str = "",
             findings: dict[str, str] | None = None) -> str:
    """The leaderboard page; ``findings`` maps a preset to its findings section (markdown)."""
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [LEGEND, ""]
    for preset, part in df.groupby("preset", sort=False):
        lines += [f"## Preset `{preset}`", ""]
        show = pd.DataFrame({
            "attack": part.attack, "merger": part.merger, "defense": part.defense, "seed": part.seed,
            "status": part.status, "ACC": part.acc.map(_pct), "Norm ACC": part.normalized_acc.map(_pct),
            "ASR": part.asr.map(_pct), "ASR 95 %": [_wilson(a, b) for a, b in zip(part.asr_lo, part.asr_hi)],
            "ΔACC": part.d_acc_vs_none.map(_signed), "ΔASR": part.d_asr_vs_none.map(_signed),
            "DER": part.der_vs_none.map(lambda v: "" if _missing(v) else f"{v:.3f}"),
            "ACC alone": part.standalone_acc.map(_pct), "ASR alone": part.standalone_asr.map(_pct),
            "s": part.seconds.map(lambda s: "" if _missing(s) else f"{s:.1f}"),
        })
        lines += [tab(show), ""]
        ok = part[part.status == "ok"]
        seeds = sorted(int(s) for s in ok.seed.unique())
        if len(seeds) > 1:
            agg = over_seeds(part)
            lines += [f"### Preset `{preset}` over seeds {', '.join(map(str, seeds))}", "", STATS_LEGEND, "",
                      tab(pd.DataFrame({
                          "attack": agg.attack, "merger": agg.merger, "defense": agg.defense, "n": agg.seeds,
                          **{label: [_summary_cell(r, stat) for _, r in agg.iterrows()]
                             for label, stat in (("ACC", "acc"), ("Norm ACC", "normalized_acc"),
                                                 ("ASR", "asr"), ("ASR alone", "standalone_asr"),
                                                 ("ΔACC", "d_acc_vs_none"), ("ΔASR", "d_asr_vs_none"),
                                                 ("DER", "der_vs_none"),
                                                 ("ASR merged − alone", "d_asr_vs_alone"))}})), ""]
        lines += _rankings(part, preset, len(seeds))
        if findings and preset in findings:
            lines += [findings[preset], ""]
        stale = part[part.status == "stale"]
        if len(stale):
            lines += [f"{len(stale)} stale cell(s): stored with other parameters, plugin versions or preset "
                      "content than the current ones; `mmbench run` recomputes them.", ""]
        failed = part[part.status == "failed"]
        for _, r in failed.iterrows():
            lines.append(f"- failed {r.attack}/{r.merger}/{r.defense} seed {r.seed}: {r.error}")
        if len(failed):
            lines.append("")
    return "\n".join(lines)


def _rankings(part: pd.DataFrame, preset: str, seeds: int) -> list[str]:
    lines: list[str] = []
    attacks = attack_ranking(part)
    defenses = defense_ranking(part)
    if attacks.empty and defenses.empty:
        return lines
    lines += [f"### Rankings, preset `{preset}` ({seeds} seed{'s' * (seeds != 1)})", "",
              "Ordered by mean; a rank says nothing about a difference unless its paired interval "
              "excludes 0 (`*`).", ""]
    if not attacks.empty:
        lines += ["Attacks by ASR after merging (defense `none`); Δ to next: paired ASR difference to the "
                  "attack ranked below, in points.", "",
                  tab(pd.DataFrame({
                      "merger": attacks.merger, "rank": attacks["rank"], "attack": attacks.attack,
                      "ASR": attacks.asr.map(fmt_interval), "n": attacks.asr.map(lambda iv: iv.n),
                      "Δ to next": [f"{fmt_interval(d, signed=True)} vs {n}" if isinstance(n, str) and n else ""
                                    for d, n in zip(attacks.d_next, attacks.next)]})), ""]
    if not defenses.empty:
        lines += ["Defenses by DER, with ASR removed (ASR without − with the defense) and ACC lost (ACC "
                  "without − with), in points: per seed the mean over the attacks (`all`: attack × merger "
                  "pairs) every seed has, then the t-interval.", "",
                  tab(pd.DataFrame({
                      "merger": defenses.merger, "defense": defenses.defense,
                      "ASR removed": defenses.asr_removed.map(lambda iv: fmt_interval(iv, signed=True)),
                      "ACC lost": defenses.acc_lost.map(lambda iv: fmt_interval(iv, signed=True)),
                      "DER": defenses.der_vs_none.map(lambda iv: fmt_interval(iv, scale=1, digits=3)),
                      "n": defenses.der_vs_none.map(lambda iv: iv.n), "attacks": defenses.attacks})), ""]
    return lines


def render(df: pd.DataFrame, notes: str = "", findings: dict[str, str] | None = None) -> dict[str, bytes]:
    """The leaderboard's files by name: README.md, results.csv, summary.csv."""
    return {"README.md": markdown(df, notes=notes, findings=findings).encode(),
            "results.csv": df.to_csv(index=False).encode(),
            "summary.csv": over_seeds(df).to_csv(index=False).encode()}


def write(df: pd.DataFrame, out_dir: Path, notes: str = "", findings: dict[str, str] | None = None) -> list[Path]:
    from .store import atomic_write_bytes

    out_dir = Path(out_dir)
    paths = []
    from . import faults

    for name, data in render(df, notes, findings).items():
        atomic_write_bytes(out_dir / name, data)  # each file whole; a rerun rewrites them all
        paths.append(out_dir / name)
        faults.point("leaderboard")
    return paths


def differences(files: dict[str, bytes], out_dir: Path) -> list[str]:
    """One line per file of ``files`` that ``out_dir`` lacks or holds with other content."""
    problems = []
    for name, data in files.items():
        path = Path(out_dir) / name
        if not path.exists():
            problems.append(f"{path}: missing (run mmbench leaderboard)")
        elif path.read_bytes() != data:
            problems.append(f"{path}: differs from the stored results (run mmbench leaderboard)")
    return problems


STANDALONE_COUNTS = ("acc_counts", "asr_counts", "clean_asr_counts")


def attack_disagreements(results: Iterable[dict[str, Any]]) -> list[str]:
    """One line per attack stage whose cells disagree on what the attack gave alone.

    Every ok cell of one preset, attack, seed, attack code and attack parameters reads the same
    attack stage (one key), so the figures of the attacker's model alone that the cell records
    (``info.attack.standalone``: test-image counts of ACC, ASR and clean ASR) must be the same in
    all of them, whatever the merger, defense or number of merged tasks. Cells that disagree were
    computed from two computations of that stage with the same key: a store filled on machines
    whose floating point differs, where the stage was recomputed on one of them. Mixing them makes
    a defense's ΔASR, or a sweep's curve, compare two different attacks. (Reading the counts, not
    the attack's weights: two computations that agree on every count pass.) The fix is to recompute
    one side's cells with ``--rerun cells``, which reads the stage the store holds; ``--rerun
    always`` would compute the stage a third time and leave the cells it does not select behind.
    """
    groups: dict[tuple, dict[str, list[str]]] = {}
    for r in results:
        standalone = ((r.get("info") or {}).get("attack") or {}).get("standalone")
        if r.get("status") != "ok" or not isinstance(standalone, dict):
            continue
        code = ((r.get("plugins") or {}).get("attack") or {}).get("code")
        group = (str(r.get("preset")), str(r.get("attack")), r.get("seed"), str(code),
                 canonical_json((r.get("params") or {}).get("attack")))
        figures = canonical_json({k: standalone.get(k) for k in STANDALONE_COUNTS})
        setting = r.get("setting") or []
        label = str(r.get("cell")) + (f" ({canonical_json(setting)})" if setting else "")
        groups.setdefault(group, {}).setdefault(figures, []).append(label)
    lines = []
    for (preset, attack, seed, _, _), by_figures in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(by_figures) < 2:
            continue
        parts = "; ".join(f"{len(cells)} cell(s) with {figures} (e.g. {sorted(cells)[0]})"
                          for figures, cells in sorted(by_figures.items(), key=lambda kv: -len(kv[1])))
        lines.append(f"{preset} {attack} seed {seed}: its cells read different computations of one attack "
                     f"stage: {parts}; recompute the cells that disagree with the stage the store holds "
                     f"(mmbench run --attack {attack} --seed {seed} --rerun cells, with their mergers, "
                     f"defenses and --set/--sweep)")
    return lines
