"""Stored cell results → a table (pandas), ``leaderboard/README.md`` (tabulate) and
``leaderboard/results.csv``. Every cell of the installed cross product appears:
status ok / failed from its result, ``not run`` where no result is stored, ``stale``
where the stored result's key is not the cell's current key (it was made with other
parameters, plugin versions or preset content; its figures are shown, but no Δ is
taken against it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pandas as pd

COLUMNS = ["preset", "attack", "merger", "defense", "seed", "status", "acc", "normalized_acc", "asr",
           "standalone_acc", "standalone_asr", "standalone_clean_acc", "d_acc_vs_none", "d_asr_vs_none",
           "seconds", "error"]


def row(result: dict[str, Any]) -> dict[str, Any]:
    m = result.get("metrics") or {}
    return {
        "preset": result.get("preset"), "attack": result.get("attack"), "merger": result.get("merger"),
        "defense": result.get("defense"), "seed": result.get("seed"), "status": result.get("status"),
        "acc": m.get("acc"), "normalized_acc": m.get("normalized_acc"), "asr": m.get("asr"),
        "standalone_acc": m.get("standalone_acc"), "standalone_asr": m.get("standalone_asr"),
        "standalone_clean_acc": m.get("standalone_clean_acc"),
        "seconds": (result.get("durations") or {}).get("total"),
        "error": result.get("error", ""),
    }


def table(results: Iterable[dict[str, Any]], expected: Iterable[tuple] = ()) -> pd.DataFrame:
    """One row per cell; ``expected`` (preset, attack, merger, defense, seed) tuples without a
    result become ``not run`` rows. Adds each defense's ΔACC/ΔASR against ``none``."""
    rows = [row(r) for r in results]
    have = {(r["preset"], r["attack"], r["merger"], r["defense"], r["seed"]) for r in rows}
    for cell in expected:
        if tuple(cell) not in have:
            rows.append(dict(zip(("preset", "attack", "merger", "defense", "seed"), cell), status="not run"))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    ok = df[(df.status == "ok") & (df.defense == "none")].set_index(["preset", "attack", "merger", "seed"])
    for i, r in df.iterrows():
        ref_key = (r.preset, r.attack, r.merger, r.seed)
        if r.status == "ok" and r.defense != "none" and ref_key in ok.index:
            ref = ok.loc[ref_key]
            df.at[i, "d_acc_vs_none"] = r.acc - ref.acc
            if pd.notna(r.asr) and pd.notna(ref.asr):
                df.at[i, "d_asr_vs_none"] = r.asr - ref.asr
    order = {"none": 0}
    df["_a"] = df.attack.map(lambda a: order.get(a, 1))
    df = df.sort_values(["preset", "_a", "attack", "merger", "defense", "seed"]).drop(columns="_a")
    return df.reset_index(drop=True)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return f"{100 * float(value):.1f}"


def _signed(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return f"{100 * float(value):+.1f}"


def over_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of each (preset, attack, merger,
    defense), from its ``ok`` cells only; ``seeds`` counts them (std is NaN for one seed)."""
    ok = df[df.status == "ok"]
    keys = ["preset", "attack", "merger", "defense"]
    if ok.empty:
        return pd.DataFrame(columns=keys + ["seeds"])
    grouped = ok.groupby(keys, sort=False)
    out = grouped.size().rename("seeds").to_frame()
    for column in ("acc", "normalized_acc", "asr"):
        values = grouped[column]
        out[f"{column}_mean"] = values.mean()
        out[f"{column}_std"] = values.std(ddof=1)
    return out.reset_index()


def _mean_std(mean: Any, std: Any) -> str:
    if mean is None or pd.isna(mean):
        return ""
    return _pct(mean) + ("" if std is None or pd.isna(std) else f" ± {100 * float(std):.1f}")


def markdown(df: pd.DataFrame, title: str = "mmbench leaderboard", notes: str = "") -> str:
    from tabulate import tabulate

    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["ACC: mean top-1 over the merged tasks' clean test sets. Norm ACC: merged ÷ fine-tuned ACC, "
              "averaged over tasks. ASR: triggered test images of the target task (target-class samples "
              "excluded) classified as the target. Alone: the backdoored model before merging. "
              "ΔACC/ΔASR: against defense `none` for the same attack and merger. All figures in %.", ""]
    for preset, part in df.groupby("preset", sort=False):
        lines += [f"## Preset `{preset}`", ""]
        show = pd.DataFrame({
            "attack": part.attack, "merger": part.merger, "defense": part.defense, "seed": part.seed,
            "status": part.status, "ACC": part.acc.map(_pct), "Norm ACC": part.normalized_acc.map(_pct),
            "ASR": part.asr.map(_pct), "ΔACC": part.d_acc_vs_none.map(_signed),
            "ΔASR": part.d_asr_vs_none.map(_signed), "ACC alone": part.standalone_acc.map(_pct),
            "ASR alone": part.standalone_asr.map(_pct),
            "s": part.seconds.map(lambda s: "" if pd.isna(s) else f"{s:.1f}"),
        })
        lines += [tabulate(show, headers="keys", tablefmt="github", showindex=False), ""]
        if part[part.status == "ok"].seed.nunique() > 1:
            agg = over_seeds(part)
            lines += [f"### Preset `{preset}` over seeds (mean ± sample std of the ok cells)", "",
                      tabulate(pd.DataFrame({
                          "attack": agg.attack, "merger": agg.merger, "defense": agg.defense,
                          "seeds": agg.seeds,
                          "ACC": [_mean_std(m, s) for m, s in zip(agg.acc_mean, agg.acc_std)],
                          "Norm ACC": [_mean_std(m, s) for m, s in zip(agg.normalized_acc_mean,
                                                                       agg.normalized_acc_std)],
                          "ASR": [_mean_std(m, s) for m, s in zip(agg.asr_mean, agg.asr_std)],
                      }), headers="keys", tablefmt="github", showindex=False), ""]
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


def write(df: pd.DataFrame, out_dir: Path, notes: str = "") -> tuple[Path, Path]:
    from .store import atomic_write_bytes

    out_dir = Path(out_dir)
    md, csv = out_dir / "README.md", out_dir / "results.csv"
    atomic_write_bytes(md, markdown(df, notes=notes).encode())
    atomic_write_bytes(csv, df.to_csv(index=False).encode())
    return md, csv
