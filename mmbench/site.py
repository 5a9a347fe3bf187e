"""The leaderboard as one self-contained static page, ``leaderboard/index.html``, with plots.

Built by ``mmbench leaderboard`` next to README.md, results.csv and summary.csv, from the same
stored results, and compared byte for byte by ``mmbench leaderboard --check``. The page needs
no network when it is viewed: styles and the small sorting/filtering script are inline, and
the plots are inline SVG (each also written to ``plots/<preset>-<name>.svg``).

Per preset the page shows: every attack × merger × defense cell over seeds (sortable,
filterable; mean ± 95 % t-interval, paired Δ against defense ``none``, DER), every cell and
seed (with the Wilson interval of its ASR), the rankings of attacks and defenses
(:func:`mmbench.leaderboard.attack_ranking` / :func:`~mmbench.leaderboard.defense_ranking`),
the findings' verdicts (:mod:`mmbench.findings`), the plots and the provenance (mmbench and
plugin versions and code fingerprints, parameters, seeds, data, environment, when the
results were made: all read from the result JSONs). Then the figures the papers report
beside mmbench's (:mod:`mmbench.reported`).

Determinism: nothing here reads a clock; rows are sorted; matplotlib runs on its defaults
(not the user's matplotlibrc) with ``svg.fonttype = none`` (text stays text), a fixed
``svg.hashsalt`` per plot (the ids in the SVG) and no date or creator in the metadata.
The bytes of the SVGs depend on matplotlib's version, which pyproject.toml pins to one
minor release for that reason.
"""
from __future__ import annotations

import html
import io
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from . import findings as findings_mod
from . import leaderboard, reported, stats

PLOTS = "plots"
MARKERS = ("s", "^", "D", "v", "P", "X", "*")          # defended cells, in defense order
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")
TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# numbers ---------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _esc(value: Any) -> str:
    return html.escape("" if _missing(value) else str(value), quote=True)


def _iv(values: Iterable[Any]) -> stats.Interval:
    return stats.t_interval(v for v in values if not _missing(v))


def _interval_cell(iv: stats.Interval | None, scale: float = 100.0, digits: int = 1, signed: bool = False,
                   n: int | None = None) -> str:
    """A <td> with ``mean ± half`` (and its sort value and the interval as a tooltip)."""
    if iv is None or iv.n == 0:
        return '<td class="num" data-v=""></td>'
    text = leaderboard.fmt_interval(iv, signed=signed, n=n, scale=scale, digits=digits)
    title = f"n = {iv.n}"
    if iv.has_interval:
        title += f"; 95 % t-interval [{scale * iv.lo:.{digits}f}, {scale * iv.hi:.{digits}f}]"
    cls = "num sig" if signed and iv.excludes(0.0) else "num"
    return f'<td class="{cls}" data-v="{scale * iv.mean:.6g}" title="{_esc(title)}">{_esc(text)}</td>'


def _value_cell(value: Any, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    if _missing(value):
        return '<td class="num" data-v=""></td>'
    v = scale * float(value)
    return f'<td class="num" data-v="{v:.6g}">{v:{"+" if signed else ""}.{digits}f}</td>'


def _text_cell(value: Any, cls: str = "") -> str:
    return f'<td{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{_esc(value)}</td>'


def _int_cell(value: Any) -> str:
    if _missing(value):
        return '<td class="num" data-v=""></td>'
    return f'<td class="num" data-v="{int(value)}">{int(value)}</td>'


def _choices(values: Iterable[Any]) -> list[str]:
    """The distinct values of a column as text, for a filter's drop-down (missing ones left out)."""
    return sorted({str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                   for v in values if not _missing(v)}, key=lambda t: (len(t), t) if t.isdigit() else (0, t))


def _md_inline(text: str) -> str:
    """Escape, then `code` → <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


# tables ----------------------------------------------------------------------------------
def _table(tid: str, header: Sequence[tuple[str, str]], rows: list[str], filters: Sequence[int] = (),
           options: dict[int, list[str]] | None = None, caption: str = "") -> str:
    """A sortable table; ``header`` is (label, tooltip); ``filters`` are the columns that get a
    drop-down (with ``options``) beside the free-text filter."""
    out = []
    if filters or options is not None:
        out.append(f'<div class="filters" data-filter="{tid}"><input type="search" placeholder="filter rows…" '
                   f'aria-label="filter rows">')
        for col in filters:
            label = header[col][0]
            opts = "".join(f'<option value="{_esc(o)}">{_esc(o)}</option>' for o in (options or {}).get(col, []))
            out.append(f'<label>{_esc(label)} <select data-col="{col}"><option value="">all</option>{opts}'
                       f'</select></label>')
        out.append(f'<span class="count">{len(rows)} of {len(rows)} rows</span></div>')
    head = "".join(f'<th title="{_esc(tip)}">{_esc(label)}</th>' if tip else f"<th>{_esc(label)}</th>"
                   for label, tip in header)
    cap = f"<caption>{caption}</caption>" if caption else ""
    out.append(f'<div class="scroll"><table id="{tid}" class="sortable">{cap}<thead><tr>{head}</tr></thead>'
               f'<tbody>\n' + "\n".join(rows) + "\n</tbody></table></div>")
    return "\n".join(out)


def _status_text(statuses: Iterable[str]) -> str:
    counts = Counter(statuses)
    order = ["ok", "stale", "failed", "not run"]
    return ", ".join(f"{s} {counts[s]}" for s in order + sorted(set(counts) - set(order)) if counts.get(s))


CELL_HEADER = (("attack", ""), ("merger", ""), ("defense", ""),
               ("n", "seeds with an ok result (the figures are over these)"),
               ("status", "results per status, over the seeds stored or declared"),
               ("ACC", "mean top-1 over the merged tasks' clean test sets, %"),
               ("Norm ACC", "merged ÷ fine-tuned ACC, averaged over tasks, %"),
               ("ASR", "attack success rate after merging, %"),
               ("ACC alone", "the attacked model alone, before merging: its ACC on its task, %"),
               ("ASR alone", "the attacked model alone, before merging: its ASR, %"),
               ("ΔACC", "ACC with the defense − without (defense none), paired per seed, points"),
               ("ΔASR", "ASR with the defense − without (defense none), paired per seed, points"),
               ("DER", "BackdoorBench's defense effectiveness rating, per seed then the interval"))


def cells_table(part: pd.DataFrame, tid: str) -> str:
    """Every attack × merger × defense of one preset, over seeds."""
    agg = leaderboard.over_seeds(part)
    agg = agg.set_index(leaderboard.KEYS) if len(agg) else agg
    ok = part[part.status == "ok"]
    rows = []
    groups = part.groupby(leaderboard.KEYS, sort=False)
    for key, cells in groups:
        preset, attack, merger, defense = key
        mine = ok[(ok.attack == attack) & (ok.merger == merger) & (ok.defense == defense)]
        n = int(mine.seed.nunique())
        have = len(agg) and key in agg.index
        r = agg.loc[key] if have else None

        def iv(stat: str) -> stats.Interval | None:
            if r is None:
                return None
            half = (r[f"{stat}_hi"] - r[f"{stat}_lo"]) / 2 if r[f"{stat}_n"] >= 2 else math.nan
            return stats.Interval(int(r[f"{stat}_n"]), r[f"{stat}_mean"], r[f"{stat}_sd"], half)

        tds = [_text_cell(attack), _text_cell(merger), _text_cell(defense),
               f'<td class="num" data-v="{n}">{n}</td>', _text_cell(_status_text(cells.status),
                                                                   "" if set(cells.status) == {"ok"} else "warn"),
               _interval_cell(iv("acc"), n=n), _interval_cell(iv("normalized_acc"), n=n),
               _interval_cell(iv("asr"), n=n), _interval_cell(_iv(mine.standalone_acc) if n else None, n=n),
               _interval_cell(iv("standalone_asr"), n=n),
               _interval_cell(iv("d_acc_vs_none"), signed=True, n=n),
               _interval_cell(iv("d_asr_vs_none"), signed=True, n=n),
               _interval_cell(iv("der_vs_none"), scale=1, digits=3, n=n)]
        rows.append("<tr>" + "".join(tds) + "</tr>")
    options = {i: _choices(part[c]) for i, c in ((0, "attack"), (1, "merger"), (2, "defense"))}
    return _table(tid, CELL_HEADER, rows, filters=(0, 1, 2), options=options)


SEED_HEADER = (("attack", ""), ("merger", ""), ("defense", ""), ("seed", ""), ("status", ""),
               ("ACC", "%"), ("Norm ACC", "%"), ("ASR", "%"),
               ("ASR 95 %", "Wilson interval from the cell's counts [k, n]"),
               ("ACC alone", "%"), ("ASR alone", "%"), ("ΔACC", "vs defense none, same seed, points"),
               ("ΔASR", "vs defense none, same seed, points"), ("DER", ""), ("s", "seconds the cell took"))


def seeds_table(part: pd.DataFrame, tid: str) -> str:
    rows = []
    for r in part.itertuples():
        wilson = ("" if _missing(r.asr_lo) or _missing(r.asr_hi)
                  else f"[{100 * r.asr_lo:.1f}, {100 * r.asr_hi:.1f}]")
        counts = "" if _missing(r.asr_k) or _missing(r.asr_n) else f"{int(r.asr_k)} of {int(r.asr_n)}"
        status = r.status if r.status != "failed" else f"failed: {r.error}"
        tds = [_text_cell(r.attack), _text_cell(r.merger), _text_cell(r.defense),
               _int_cell(r.seed), _text_cell(status, "" if r.status == "ok" else "warn"),
               _value_cell(r.acc), _value_cell(r.normalized_acc), _value_cell(r.asr),
               f'<td class="num" data-v="{"" if _missing(r.asr_lo) else f"{100 * r.asr_lo:.6g}"}" '
               f'title="{_esc(counts)}">{wilson}</td>',
               _value_cell(r.standalone_acc), _value_cell(r.standalone_asr),
               _value_cell(r.d_acc_vs_none, signed=True), _value_cell(r.d_asr_vs_none, signed=True),
               _value_cell(r.der_vs_none, scale=1, digits=3), _value_cell(r.seconds, scale=1, digits=1)]
        rows.append("<tr>" + "".join(tds) + "</tr>")
    options = {i: _choices(part[c]) for i, c in ((0, "attack"), (1, "merger"), (2, "defense"), (3, "seed"))}
    return _table(tid, SEED_HEADER, rows, filters=(0, 1, 2, 3), options=options)


def rankings(part: pd.DataFrame, tid: str) -> str:
    attacks = leaderboard.attack_ranking(part)
    defenses = leaderboard.defense_ranking(part)
    out = []
    if len(attacks):
        rows = []
        for r in attacks.itertuples():
            d = r.d_next if isinstance(r.next, str) and r.next else None
            rows.append("<tr>" + "".join([
                _text_cell(r.merger), f'<td class="num" data-v="{r.rank}">{r.rank}</td>', _text_cell(r.attack),
                _interval_cell(r.asr), f'<td class="num" data-v="{r.asr.n}">{r.asr.n}</td>',
                _interval_cell(d, signed=True) if d is not None else '<td data-v=""></td>',
                _text_cell(r.next if d is not None else "")]) + "</tr>")
        out += ["<h4>Attacks by ASR after merging (defense <code>none</code>)</h4>",
                _table(f"{tid}-attacks", (("merger", ""), ("rank", ""), ("attack", ""), ("ASR", "mean ± 95 % "
                       "t-interval, %"), ("n", "seeds"), ("Δ to next", "paired ASR difference to the attack ranked "
                       "below, points; * when its interval excludes 0"), ("next", "")), rows)]
    if len(defenses):
        rows = []
        for r in defenses.itertuples():
            rows.append("<tr>" + "".join([
                _text_cell(r.merger), _text_cell(r.defense), _interval_cell(r.asr_removed, signed=True),
                _interval_cell(r.acc_lost, signed=True), _interval_cell(r.der_vs_none, scale=1, digits=3),
                f'<td class="num" data-v="{r.der_vs_none.n}">{r.der_vs_none.n}</td>',
                f'<td class="num" data-v="{r.attacks}">{r.attacks}</td>']) + "</tr>")
        out += ["<h4>Defenses by DER</h4>",
                "<p>ASR removed = ASR without − with the defense, ACC lost = ACC without − with, in points; "
                "DER = [max(0, ASR removed) − max(0, ACC lost) + 1] / 2. Per seed the mean over the attacks "
                "(<code>all</code>: attack × merger pairs) that every seed has, then the 95 % t-interval.</p>",
                _table(f"{tid}-defenses", (("merger", ""), ("defense", ""), ("ASR removed", "points"),
                                           ("ACC lost", "points"), ("DER", "fraction"), ("n", "seeds"),
                                           ("attacks", "attacks (pairs) averaged")), rows)]
    if out:
        out.insert(0, "<p>Ordered by mean. A rank means something only where the paired difference "
                      "to the next one excludes 0 (marked *).</p>")
    return "\n".join(out)


VERDICT_CLASS = {"reproduced": "v-yes", "not reproduced": "v-no", "inconclusive": "v-maybe",
                 "not measured": "v-none"}


def findings_section(cells: pd.DataFrame, tid: str, lines: list | None = None) -> str:
    """The claims' table; ``lines``: :func:`mmbench.findings.evaluate` of ``cells`` when the caller
    has it already (``mmbench leaderboard`` evaluates once for README.md and the page)."""
    lines = findings_mod.evaluate(cells) if lines is None else lines
    rows = []
    for entry in findings_mod.rows(lines):
        cls = VERDICT_CLASS.get(entry["verdict"], "")
        rows.append("<tr>" + "".join([
            _text_cell(entry["claim"], "claim"), _text_cell(entry["verdict"], cls),
            _text_cell(entry["mean"], "num"), _text_cell(entry["95 % interval"], "num"), _text_cell(entry["n"], "num"),
            _text_cell(entry["claimed"]), _text_cell(entry["why"])]) + "</tr>")
    counts = Counter(line.verdict for line in lines)
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICT_CLASS if counts.get(v))
    legend = "".join(f"<li>{_esc(x)}</li>" for x in findings_mod.legend({l.claim.id: l.claim for l in lines}.values()))
    return "\n".join([
        f"<p>{_esc(summary)} (lines, incl. per-merger sub-lines). <code>reproduced</code> when the 95 % t-interval "
        "over seeds of the per-seed values (paired where two cells are compared) lies entirely on the claimed "
        "side, <code>not reproduced</code> when entirely on the other, <code>inconclusive</code> otherwise or "
        "with fewer than 2 seeds, <code>not measured</code> without the cells. Same as "
        "<code>mmbench findings</code>.</p>",
        _table(tid, (("claim", ""), ("verdict", ""), ("mean", ""), ("95 % interval", ""), ("n", "seeds"),
                     ("claimed", ""), ("why", "")), rows),
        f"<details><summary>What each claim computes</summary><ul>{legend}</ul></details>"])


# provenance ------------------------------------------------------------------------------
def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def provenance(results: list[dict[str, Any]]) -> str:
    """What made the results: versions, code fingerprints, parameters, seeds, data, environment
    and when — every line read from the result JSONs."""
    out = []
    n = len(results)
    versions = Counter(str(r.get("mmbench", "?")) for r in results)
    seeds = Counter(r.get("seed") for r in results)
    started = sorted(str(r["started"]) for r in results if r.get("started"))
    total = math.fsum(float((r.get("durations") or {}).get("total") or 0.0) for r in results)
    devices = Counter(str(r.get("device", "?")) for r in results)
    out.append("<ul>")
    out.append(f"<li>{n} stored result(s); mmbench version(s): "
               + ", ".join(f"{_esc(v)} ({c})" for v, c in sorted(versions.items())) + "</li>")
    out.append("<li>seeds: " + ", ".join(f"{_esc(s)} ({c} results)" for s, c in sorted(seeds.items(), key=str))
               + "</li>")
    if started:
        out.append(f"<li>cells computed between {_esc(started[0])} and {_esc(started[-1])} (each result's "
                   f"<code>started</code>); {total / 60:.1f} min of cell time in all (the sum of "
                   "<code>durations.total</code>, reused stages excluded)</li>")
    out.append("<li>device: " + ", ".join(f"{_esc(d)} ({c})" for d, c in sorted(devices.items())) + "</li>")
    out.append("</ul>")
    # environment
    envs = Counter(_dump(r.get("environment") or {}) for r in results)
    rows = []
    for env, count in sorted(envs.items()):
        e = json.loads(env)
        rows.append("<tr>" + "".join(_text_cell(e.get(k, "")) for k in ("torch", "python", "threads", "platform"))
                    + f'<td class="num">{count}</td></tr>')
    out.append("<h4>Environment</h4>")
    out.append("<table><thead><tr><th>torch</th><th>python</th><th>threads</th><th>platform</th><th>results</th>"
               "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    # plugins
    plugins: dict[tuple, Counter] = {}
    params: dict[tuple, Counter] = {}
    for r in results:
        for kind in ("attack", "merger", "defense"):
            p = (r.get("plugins") or {}).get(kind) or {}
            key = (kind, p.get("name", r.get(kind)), p.get("distribution", ""), p.get("version", ""),
                   p.get("code", ""))
            plugins.setdefault(key, Counter())[r.get("status")] += 1
            pk = (kind, p.get("name", r.get(kind)))
            params.setdefault(pk, Counter())[_dump((r.get("params") or {}).get(kind, {}))] += 1
    rows = []
    for (kind, name, dist, version, code), count in sorted(plugins.items(), key=lambda kv: tuple(map(str, kv[0]))):
        rows.append("<tr>" + "".join(_text_cell(x) for x in (kind, name, dist, version)) +
                    f"<td><code>{_esc(code)}</code></td><td>{_esc(_status_text(count.elements()))}</td></tr>")
    out.append("<h4>Plugins</h4><p>Code: the fingerprint of the plugin's code that made the cell (part of its "
               "key).</p>")
    out.append("<table><thead><tr><th>kind</th><th>name</th><th>distribution</th><th>version</th><th>code</th>"
               "<th>results</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    rows = []
    for (kind, name), count in sorted(params.items(), key=lambda kv: tuple(map(str, kv[0]))):
        for value, c in sorted(count.items()):
            rows.append(f"<tr>{_text_cell(kind)}{_text_cell(name)}<td><code>{_esc(value)}</code></td>"
                        f'<td class="num">{c}</td></tr>')
    out.append("<details><summary>Resolved parameters of each plugin</summary><table><thead><tr><th>kind</th>"
               "<th>name</th><th>parameters</th><th>results</th></tr></thead><tbody>" + "".join(rows)
               + "</tbody></table></details>")
    data = Counter(_dump(r.get("data") or {}) for r in results)
    rows = []
    for value, c in sorted(data.items()):
        for task, prov in sorted(json.loads(value).items()):
            rows.append(f"<tr>{_text_cell(task)}<td><code>{_esc(_dump(prov))}</code></td>"
                        f'<td class="num">{c}</td></tr>')
    out.append("<h4>Data</h4><table><thead><tr><th>task</th><th>provenance</th><th>results</th></tr></thead><tbody>"
               + "".join(rows) + "</tbody></table>")
    return "\n".join(out)


# plots ------------------------------------------------------------------------------------
class _Plotting:
    """matplotlib on its own defaults (not the user's rc), the Agg/SVG path, no pyplot state."""

    RC = {"svg.fonttype": "none", "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8,
          "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
          "axes.spines.right": False, "figure.dpi": 100, "savefig.dpi": 100, "path.simplify": True}

    def __init__(self, salt: str) -> None:
        import matplotlib

        self.mpl = matplotlib
        self.salt = salt
        self._ctx = None

    def __enter__(self):
        self._ctx = self.mpl.rc_context()
        self._ctx.__enter__()
        self.mpl.rcdefaults()
        self.mpl.rcParams.update({**self.RC, "svg.hashsalt": self.salt})
        from matplotlib.figure import Figure

        return Figure

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def _svg(fig: Any, salt: str) -> str:
    """The figure as SVG text, deterministic (fixed hash salt, no date, no creator)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight",
                    pad_inches=0.05)
    # path coordinates to 1/100 pt (matplotlib writes 1/10⁶): a third of the bytes, no visible change
    return re.sub(r' d="[^"]*"', lambda m: _DIGITS.sub(r"\1", m.group(0)), buf.getvalue())


_DIGITS = re.compile(r"(\d\.\d\d)\d+")


def _inline(svg: str) -> str:
    """The SVG without its XML prolog and DOCTYPE, for inlining in HTML."""
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


def _colors(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _mean_table(part: pd.DataFrame) -> pd.DataFrame:
    """Mean ACC and ASR of the ok cells per attack × merger × defense (in %)."""
    ok = part[part.status == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=["attack", "merger", "defense", "acc", "asr"])
    g = ok.groupby(["attack", "merger", "defense"], sort=True)
    return pd.DataFrame({"acc": g.acc.mean() * 100, "asr": g.asr.mean() * 100}).reset_index()


def plot_acc_asr(part: pd.DataFrame, salt: str) -> str | None:
    """Per merger: ACC against ASR of every attack (mean over seeds), an arrow from its
    ``none``-defense cell to each defended cell; the no-attack merge's ACC as a dotted line."""
    means = _mean_table(part)
    means = means[means.asr.notna() | (means.attack == "none")]
    if means[means.attack != "none"].empty:
        return None
    mergers = sorted(means.merger.unique())
    attacks = sorted(a for a in means.attack.unique() if a != "none")
    defenses = sorted(d for d in means.defense.unique() if d != "none")
    colors, markers = _colors(attacks), {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(defenses)}
    with _Plotting(salt) as Figure:
        from matplotlib.lines import Line2D

        fig = Figure(figsize=(3.3 * len(mergers) + 1.4, 3.2))
        axes = fig.subplots(1, len(mergers), squeeze=False, sharey=True)[0]
        for ax, merger in zip(axes, mergers):
            m = means[means.merger == merger].set_index(["attack", "defense"])
            if ("none", "none") in m.index:
                ax.axhline(m.loc[("none", "none"), "acc"], color="#555555", ls=":", lw=1)
            for attack in attacks:
                if (attack, "none") not in m.index or pd.isna(m.loc[(attack, "none"), "asr"]):
                    continue
                x0, y0 = m.loc[(attack, "none"), ["asr", "acc"]]
                ax.plot([x0], [y0], marker="o", ms=6, color=colors[attack], ls="none", zorder=3)
                for d in defenses:
                    if (attack, d) not in m.index or pd.isna(m.loc[(attack, d), "asr"]):
                        continue
                    x1, y1 = m.loc[(attack, d), ["asr", "acc"]]
                    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                                arrowprops={"arrowstyle": "->", "color": colors[attack], "lw": 0.9,
                                            "shrinkA": 4, "shrinkB": 4, "alpha": 0.8})
                    ax.plot([x1], [y1], marker=markers[d], ms=5, mfc="white", mec=colors[attack], ls="none",
                            zorder=3)
            ax.set_title(f"merger {merger}")
            ax.set_xlabel("ASR after merging (%)")
            ax.set_xlim(-4, 104)
            ax.grid(True, lw=0.3, alpha=0.5)
        axes[0].set_ylabel("ACC (%)")
        handles = [Line2D([], [], color=colors[a], marker="o", ls="none", label=a) for a in attacks]
        handles += [Line2D([], [], color="#555555", marker="o", ls="none", label="defense none")]
        handles += [Line2D([], [], color="#555555", marker=markers[d], mfc="white", ls="none",
                           label=f"defense {d}") for d in defenses]
        handles += [Line2D([], [], color="#555555", ls=":", label="no attack, no defense")]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        return _svg(fig, salt)


def plot_heatmap(part: pd.DataFrame, salt: str) -> str | None:
    """Per merger: mean ASR (%) of each attack (rows) under each defense (columns)."""
    means = _mean_table(part)
    means = means[(means.attack != "none") & means.asr.notna()]
    if means.empty:
        return None
    mergers = sorted(means.merger.unique())
    attacks = sorted(means.attack.unique())
    defenses = ["none"] + sorted(d for d in means.defense.unique() if d != "none")
    with _Plotting(salt) as Figure:
        import numpy as np

        fig = Figure(figsize=(1.0 + (0.62 * len(defenses) + 0.5) * len(mergers), 0.9 + 0.32 * len(attacks)))
        axes = fig.subplots(1, len(mergers), squeeze=False, sharey=True)[0]
        image = None
        for ax, merger in zip(axes, mergers):
            m = means[means.merger == merger].set_index(["attack", "defense"]).asr
            grid = np.array([[m.get((a, d), np.nan) for d in defenses] for a in attacks], dtype=float)
            image = ax.imshow(np.ma.masked_invalid(grid), cmap="Reds", vmin=0, vmax=100, aspect="auto")
            for i in range(len(attacks)):
                for j in range(len(defenses)):
                    v = grid[i, j]
                    ax.text(j, i, "" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 60 else "black")
            ax.set_xticks(range(len(defenses)), defenses, rotation=0)
            ax.set_yticks(range(len(attacks)), attacks)
            ax.set_title(f"merger {merger}")
            ax.set_xlabel("defense")
            for spine in ax.spines.values():
                spine.set_visible(False)
        cbar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02)
        cbar.set_label("ASR after merging (%)")
        return _svg(fig, salt)


def _short_layer(name: str) -> str:
    name = re.sub(r"transformer\.resblocks\.(\d+)\.", r"b\1.", name)
    return name.replace(".weight", ".w").replace(".bias", ".b").replace("in_proj_", "in_")


def adamerging_coefficients(cells: pd.DataFrame) -> dict[str, Any]:
    """AdaMerging's learned coefficients per attack (defense ``none`` cells): layers, tasks and
    per seed an array layers × tasks; what else its ``info.merge`` holds."""
    import numpy as np

    out: dict[str, Any] = {}
    ada = cells[(cells.merger == "adamerging") & (cells.defense == "none")] if len(cells) else cells
    for r in ada.itertuples():
        info = r.merge_info or {}
        lam = info.get("lambdas")
        if not lam:
            continue
        arr = np.asarray(lam, dtype=float)
        if arr.ndim == 1:
            arr = arr[:, None] if info.get("granularity") == "layer" else arr[None, :]
        entry = out.setdefault(r.attack, {"layers": info.get("layers") or [str(i) for i in range(arr.shape[0])],
                                          "tasks": info.get("tasks") or [str(j) for j in range(arr.shape[1])],
                                          "init": info.get("init"), "seeds": {}})
        entry["seeds"][int(r.seed)] = arr
    return out


def plot_adamerging(coeffs: dict[str, Any], salt: str) -> str | None:
    """Per attack: AdaMerging's coefficient of each task per layer (parameter tensor), mean over
    seeds with the min–max band."""
    import numpy as np

    if not coeffs:
        return None
    attacks = sorted(coeffs, key=lambda a: (a != "none", a))
    ncols, nrows = 1, len(attacks)
    layers = coeffs[attacks[0]]["layers"]
    with _Plotting(salt) as Figure:
        fig = Figure(figsize=(8.5, 1.2 * nrows + 1.2))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        for k, ax in enumerate(axes.flat):
            if k >= len(attacks):
                ax.set_visible(False)
                continue
            entry = coeffs[attacks[k]]
            stack = np.stack([entry["seeds"][s] for s in sorted(entry["seeds"])])
            x = np.arange(stack.shape[1])
            for j, task in enumerate(entry["tasks"]):
                color = TASK_COLORS[j % len(TASK_COLORS)]
                ax.fill_between(x, stack[:, :, j].min(0), stack[:, :, j].max(0), color=color, alpha=0.18, lw=0)
                ax.plot(x, stack[:, :, j].mean(0), color=color, lw=1, label=task)
            if entry.get("init") is not None:
                ax.axhline(float(entry["init"]), color="#888888", lw=0.6, ls=":")
            ax.set_title(f"attack {attacks[k]} ({len(entry['seeds'])} seed{'s' * (len(entry['seeds']) != 1)})",
                         fontsize=8)
            ax.grid(True, axis="y", lw=0.3, alpha=0.5)
        for k, ax in enumerate(axes.flat):
            if k < len(attacks) and k + ncols >= len(attacks):     # the lowest panel of its column
                ax.set_xticks(range(len(layers)), [_short_layer(n) for n in layers], rotation=90, fontsize=5)
                ax.tick_params(labelbottom=True)
        for ax in axes[:, 0]:
            ax.set_ylabel("coefficient λ")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        return _svg(fig, salt)


def lambda_sweeps(cells: pd.DataFrame) -> dict[str, Any]:
    """The sweeps over a scaling coefficient that the results store: BadTV's backdoored task
    vector alone under addition θ_pre + λ·τ and negation θ_pre − λ·τ (test split; reported,
    chosen on nothing), and SBV / SBV_SC's calibration of λ_SBV on the dev split at the chosen
    ρ. One entry per seed (the attack's info is the same in every cell of a seed)."""
    out: dict[str, Any] = {"badtv": {}, "sbv": {}}
    if not len(cells):
        return out
    for r in cells[cells.attack == "badtv"].itertuples():
        info = r.attack_info or {}
        if int(r.seed) in out["badtv"] or not (info.get("addition") or info.get("negation")):
            continue
        out["badtv"][int(r.seed)] = {
            kind: sorted((float(lam), v.get("asr"), v.get("acc")) for lam, v in (info.get(kind) or {}).items())
            for kind in ("addition", "negation")}
    for attack in ("sbv", "sbv_sc"):
        for r in cells[cells.attack == attack].itertuples():
            info = r.attack_info or {}
            grid = (info.get("calibration") or {}).get("grid") or []
            key = (attack, int(r.seed))
            if key in out["sbv"] or not grid or info.get("fraction") is None:
                continue
            rho = float(info["fraction"])
            points = sorted((float(g["lambda"]), g.get("asr"), g.get("acc")) for g in grid
                            if abs(float(g.get("fraction", -1)) - rho) < 1e-12)
            out["sbv"][key] = {"fraction": rho, "chosen": info.get("lambda_sbv"), "points": points}
    return out


def plot_lambda(sweeps: dict[str, Any], salt: str) -> str | None:
    panels = [k for k in ("badtv", "sbv") if sweeps.get(k)]
    if not panels:
        return None
    with _Plotting(salt) as Figure:
        fig = Figure(figsize=(4.2 * len(panels), 3.0))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            if panel == "badtv":
                for kind, color in (("addition", "#d62728"), ("negation", "#1f77b4")):
                    for seed, data in sorted(sweeps["badtv"].items()):
                        pts = [(lam, asr, acc) for lam, asr, acc in data[kind] if asr is not None]
                        if not pts:
                            continue
                        xs = [p[0] for p in pts]
                        ax.plot(xs, [100 * p[1] for p in pts], color=color, marker="o", ms=3, lw=0.9, alpha=0.85,
                                label=f"ASR, {kind}" if seed == min(sweeps["badtv"]) else None)
                        accs = [(p[0], p[2]) for p in pts if p[2] is not None]
                        ax.plot([a[0] for a in accs], [100 * a[1] for a in accs], color=color, ls=":", lw=0.8,
                                marker=".", ms=3, label=f"ACC, {kind}" if seed == min(sweeps["badtv"]) else None)
                ax.set_title(f"BadTV's task vector alone, θ_pre ± λ·τ (test; {len(sweeps['badtv'])} seeds)",
                             fontsize=8)
                ax.set_xlabel("λ")
            else:
                styles = {"sbv": "-", "sbv_sc": "--"}
                for (attack, seed), data in sorted(sweeps["sbv"].items()):
                    pts = [(lam, asr) for lam, asr, _ in data["points"] if asr is not None]
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], ls=styles.get(attack, "-"),
                            color=PALETTE[seed % len(PALETTE)], marker="o", ms=3, lw=0.9,
                            label=f"{attack} seed {seed} (ρ={data['fraction']:g})")
                    if data.get("chosen") is not None:
                        chosen = [p for p in pts if abs(p[0] - float(data["chosen"])) < 1e-12]
                        if chosen:
                            ax.plot([chosen[0][0]], [100 * chosen[0][1]], marker="*", ms=9, ls="none",
                                    color=PALETTE[seed % len(PALETTE)])
                ax.set_title("SBV calibration of λ_SBV (dev split; ★ chosen)", fontsize=8)
                ax.set_xlabel("λ_SBV")
            ax.set_ylabel("%")
            ax.set_ylim(-4, 104)
            ax.grid(True, lw=0.3, alpha=0.5)
            ax.legend(frameon=False, fontsize=6)
        fig.tight_layout()
        return _svg(fig, salt)


# the page ----------------------------------------------------------------------------------
CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--bg2:#f6f8fa;--acc:#0969da}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
margin:0 auto;max-width:1400px;padding:0 20px 60px}
h1{margin:18px 0 4px}h2{margin-top:34px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{margin-top:26px}h4{margin:16px 0 6px}p,li{max-width:110ch}code{background:var(--bg2);padding:0 3px;border-radius:3px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--line);padding:6px 0;z-index:5}
nav a{margin-right:14px;color:var(--acc);text-decoration:none}
.scroll{overflow-x:auto;max-height:80vh;overflow-y:auto;border:1px solid var(--line);border-radius:4px}
table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
thead th{position:sticky;top:0;background:var(--bg2)}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#eaeef2}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.num{text-align:right}td.sig{font-weight:600}td.warn{color:#9a6700}
tbody tr:nth-child(even){background:#fbfcfd}tbody tr:hover{background:#eef6ff}
.filters{margin:6px 0;display:flex;gap:12px;flex-wrap:wrap;align-items:center;font-size:13px}
.filters input{padding:3px 6px;min-width:220px}.count{color:var(--muted)}
.v-yes{background:#dafbe1}.v-no{background:#ffebe9}.v-maybe{background:#fff8c5}.v-none{color:var(--muted)}
td.claim{white-space:pre}figure{margin:14px 0}figure svg{max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:13px;max-width:110ch}.muted{color:var(--muted)}
details{margin:8px 0}summary{cursor:pointer;color:var(--acc)}
"""

JS = """
(function(){
function val(row,i){var c=row.cells[i];if(!c)return null;var v=c.getAttribute('data-v');
 if(v===null)return c.textContent.trim().toLowerCase();return v===''?null:parseFloat(v);}
document.querySelectorAll('table.sortable').forEach(function(t){
 var ths=t.tHead.rows[0].cells;
 Array.prototype.forEach.call(ths,function(th,i){th.addEventListener('click',function(){
  var dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
  Array.prototype.forEach.call(ths,function(h){h.removeAttribute('aria-sort');});
  th.setAttribute('aria-sort',dir);var s=dir==='ascending'?1:-1;var tb=t.tBodies[0];
  var rows=Array.prototype.slice.call(tb.rows).map(function(r,k){return [r,val(r,i),k];});
  rows.sort(function(a,b){var x=a[1],y=b[1];if(x===null&&y===null)return a[2]-b[2];if(x===null)return 1;
   if(y===null)return -1;var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
   return c!==0?s*c:a[2]-b[2];});
  rows.forEach(function(r){tb.appendChild(r[0]);});});});});
document.querySelectorAll('.filters').forEach(function(box){
 var t=document.getElementById(box.getAttribute('data-filter'));var q=box.querySelector('input');
 var sels=box.querySelectorAll('select');var count=box.querySelector('.count');
 function apply(){var text=q.value.toLowerCase().trim();var rows=t.tBodies[0].rows;var shown=0;
  for(var k=0;k<rows.length;k++){var r=rows[k];var ok=!text||r.textContent.toLowerCase().indexOf(text)>=0;
   for(var j=0;j<sels.length;j++){var s=sels[j];if(s.value&&r.cells[+s.getAttribute('data-col')].textContent.trim()!==s.value)ok=false;}
   r.hidden=!ok;if(ok)shown++;}
  count.textContent=shown+' of '+rows.length+' rows';}
 q.addEventListener('input',apply);sels.forEach(function(s){s.addEventListener('change',apply);});});
})();
"""

LEGEND = ("ACC: mean top-1 over the merged tasks' clean test sets. Norm ACC: merged ÷ fine-tuned ACC, averaged "
          "over tasks. ASR: triggered test images of the target task (target-class samples excluded) classified "
          "as the target. Alone: the backdoored model before merging. ΔACC/ΔASR: against defense none for the same "
          "attack, merger and seed. DER = [max(0, −ΔASR) − max(0, −ΔACC) + 1]/2 (BackdoorBench): 1 removes the "
          "backdoor at no ACC cost, 0.5 changes nothing. Figures in %, DER as a fraction. Over seeds: mean ± "
          "half-width of the 95 % t-interval (n stated; none for n = 1); Δ and DER are paired per seed, and "
          "* (bold) marks a difference whose interval excludes 0. Hover a figure for its interval and n; click a "
          "column header to sort.")


def _figure(name: str, svg: str | None, caption: str, missing: str) -> str:
    if svg is None:
        return f'<p class="muted">{_esc(missing)}</p>'
    return (f'<figure id="{_esc(name)}">{_inline(svg)}<figcaption>{caption} '
            f'(<code>{PLOTS}/{_esc(name)}.svg</code>)</figcaption></figure>')


def _reported_section(figures: list[reported.Figure], df: pd.DataFrame) -> str:
    out = ["<p>Figures the papers report, each with its source (paper, table, row), beside mmbench's figure "
           "for the same cell (mean ± 95 % t-interval over the ok seeds). A figure enters only when someone read "
           "it in the paper and recorded where, in <code>leaderboard/reported.json</code> (docs/leaderboard.md "
           "says how); nothing is filled from memory, and a cell without a verified figure stays blank.</p>"]
    if not figures:
        out.append('<p class="muted"><strong>No reported figure has been verified yet</strong>: the table is empty '
                   "on purpose. The paper presets (<code>vit-b-32-6task</code>, <code>vit-b-32-8task</code>, …) "
                   "are the ones to fill, once their cells have been run.</p>")
    rows = []
    ok = df[df.status == "ok"] if len(df) else df
    for f in figures:
        mine = ok[(ok.preset == f.preset) & (ok.attack == f.attack) & (ok.merger == f.merger)
                  & (ok.defense == f.defense)] if len(ok) else ok
        iv = _iv(mine[f.metric]) if len(mine) and f.metric in mine else None
        diff = stats.Interval(iv.n, iv.mean - f.value, iv.sd, iv.half) if iv is not None and iv.n else None
        rows.append("<tr>" + "".join([
            _text_cell(f.preset), _text_cell(f.attack), _text_cell(f.merger), _text_cell(f.defense),
            _text_cell(f.metric), _value_cell(f.value), _text_cell(f.paper), _text_cell(f.table), _text_cell(f.row),
            _interval_cell(iv) if iv is not None and iv.n else '<td class="muted" data-v="">not run</td>',
            _interval_cell(diff, signed=True) if diff is not None else '<td data-v=""></td>',
            _text_cell(f.note)]) + "</tr>")
    out.append(_table("reported", (("preset", ""), ("attack", ""), ("merger", ""), ("defense", ""),
                                   ("metric", ""), ("reported", "%"), ("paper", ""), ("table", ""), ("row", ""),
                                   ("mmbench", "mean ± 95 % t-interval over seeds, %"),
                                   ("mmbench − reported", "points"), ("note", "")), rows))
    return "\n".join(out)


def render(df: pd.DataFrame, results: list[dict[str, Any]], notes: str = "",
           reported_figures: Iterable[reported.Figure] = (),
           detection: dict[str, list[dict[str, Any]]] | None = None,
           sweep_points: dict[str, list[dict[str, Any]]] | None = None,
           findings_lines: dict[str, list] | None = None) -> dict[str, bytes]:
    """``index.html`` and ``plots/*.svg`` by path relative to the leaderboard folder. ``df`` is
    :func:`mmbench.leaderboard.table` of ``results`` (stale ones carrying status ``stale``);
    ``detection`` maps a preset to its detection-track entries (:mod:`mmbench.detection_report`),
    ``sweep_points`` to its parameter sweeps (:mod:`mmbench.sweeps`; the claims measured along a
    sweep read them), ``findings_lines`` to :func:`mmbench.findings.evaluate` of its cells where
    the caller has evaluated them already (evaluated here otherwise)."""
    from . import detection_report
    from . import sweeps as sweep_mod

    files: dict[str, bytes] = {}
    presets = list(dict.fromkeys(df.preset)) if len(df) else []
    body = []
    nav = [f'<a href="#preset-{_esc(p)}">preset {_esc(p)}</a>' for p in presets]
    nav.append('<a href="#reported">reported vs reproduced</a>')
    for preset in presets:
        part = df[df.preset == preset].reset_index(drop=True)
        mine = [r for r in results if r.get("preset") == preset]
        cells = findings_mod.frame(mine, (sweep_points or {}).get(preset, []))
        ok = part[part.status == "ok"]
        seeds = sorted(int(s) for s in ok.seed.unique())
        pid = re.sub(r"[^A-Za-z0-9_-]", "-", preset)
        counts = _status_text(part.status)
        body.append(f'<h2 id="preset-{_esc(preset)}">Preset <code>{_esc(preset)}</code></h2>')
        body.append(f"<p>{part[leaderboard.KEYS].drop_duplicates().shape[0]} attack × merger × defense cells, "
                    f"{len(part)} cell results ({_esc(counts)}); ok seeds: {_esc(', '.join(map(str, seeds)) or 'none')}."
                    f" Sections: <a href='#{pid}-cells'>cells</a> · <a href='#{pid}-rankings'>rankings</a> · "
                    f"<a href='#{pid}-findings'>findings</a> · <a href='#{pid}-detection'>detection</a> · "
                    f"<a href='#{pid}-plots'>plots</a> · "
                    f"<a href='#{pid}-provenance'>provenance</a></p>")
        body.append(f'<h3 id="{pid}-cells">Every cell, over seeds</h3>')
        body.append(cells_table(part, f"{pid}-cells-table"))
        body.append("<details><summary>Every cell and seed (with the Wilson 95 % interval of its ASR)</summary>")
        body.append(seeds_table(part, f"{pid}-seeds-table"))
        body.append("</details>")
        failed = part[part.status == "failed"]
        if len(failed):
            body.append("<ul>" + "".join(f"<li>failed {_esc(r.attack)}/{_esc(r.merger)}/{_esc(r.defense)} seed "
                                         f"{_esc(r.seed)}: {_esc(r.error)}</li>" for r in failed.itertuples())
                        + "</ul>")
        body.append(f'<h3 id="{pid}-rankings">Rankings ({len(seeds)} seed{"s" * (len(seeds) != 1)})</h3>')
        body.append(rankings(part, pid) or '<p class="muted">No ok cell to rank.</p>')
        body.append(f'<h3 id="{pid}-findings">Findings: the papers\' claims</h3>')
        body.append(findings_section(cells, f"{pid}-findings-table", (findings_lines or {}).get(preset)))
        body.append(f'<h3 id="{pid}-detection">Detection track: flagging the malicious contributor before merging</h3>')
        body.append(detection_report.html_section(preset, (detection or {}).get(preset, []), mine, pid))
        body.append(f'<h3 id="{pid}-plots">Plots</h3>')
        plots = {}
        name = f"{pid}-acc-asr"
        plots[name] = plot_acc_asr(part, name)
        body.append(_figure(name, plots[name],
                            "ACC against ASR after merging, per merger, mean over the ok seeds: a filled circle "
                            "is an attack without defense, an arrow leads to the same attack under each defense "
                            "(open marker). Up and left is better for the defender; the dotted line is the "
                            "no-attack merge's ACC. Intervals are in the table above.",
                            "No ACC/ASR to plot."))
        name = f"{pid}-asr-heatmap"
        plots[name] = plot_heatmap(part, name)
        body.append(_figure(name, plots[name],
                            "ASR after merging (%, mean over the ok seeds) of each attack under each defense, "
                            "per merger.", "No ASR to plot."))
        coeffs = adamerging_coefficients(cells)
        name = f"{pid}-adamerging-coefficients"
        plots[name] = plot_adamerging(coeffs, name)
        stuck = _stuck_layers(coeffs)
        body.append(_figure(name, plots[name],
                            "AdaMerging's learned merge coefficient of each task (line) per layer (each "
                            "parameter tensor: <code>granularity = layer</code>), read from "
                            "<code>info.merge.lambdas</code> of the cells with defense <code>none</code>: mean "
                            "over seeds, the band spans the seeds; the dotted line is the initial value. "
                            + _esc(stuck),
                            "No AdaMerging cell with stored coefficients."))
        sweeps = lambda_sweeps(cells)
        name = f"{pid}-asr-vs-lambda"
        plots[name] = plot_lambda(sweeps, name)
        body.append(_figure(name, plots[name],
                            "ASR against a scaling coefficient, where the results store a sweep. Left: BadTV's "
                            "backdoored task vector alone added to (θ_pre + λ·τ) or subtracted from (θ_pre − λ·τ) "
                            "the pretrained model, on the test split (the attack reports it; nothing is chosen on "
                            "it), ASR solid, ACC dotted, one line per seed. Right: SBV and SBV_SC's calibration "
                            "of λ_SBV on the dev split at the chosen sparsity ρ (the choice is made on dev ACC and "
                            "ASR). No cell sweep of the mergers' λ is stored (every TA/TIES cell is merged at "
                            "the preset's λ, and the tuning sweeps in docs/tuning hold clean dev ACC, no ASR), "
                            "so ASR against the merge λ itself is not plotted.",
                            "No stored sweep with ASR."))
        points = (sweep_points or {}).get(preset, [])
        if points:
            name = f"{pid}-sweeps"
            plots[name] = sweep_mod.plot(points, name)
            body.append(_figure(name, plots[name],
                                "Parameter sweeps (<code>mmbench run --sweep PLUGIN.PARAM=...</code>): ASR (solid) "
                                "and ACC (dotted) against the swept value, one colour per attack/merger/defense, "
                                "mean over the stored seeds; the preset's own cells give the point at its own "
                                "value. Intervals are in README.md's sweep table.", "No sweep stored."))
        body.append('<p class="muted">Not plotted: the attacks\' triggers. They are tensors in the store\'s '
                    "artifacts, which are not committed with the results, and the page is built from the results "
                    "alone.</p>")
        for key, svg in plots.items():
            if svg is not None:
                files[f"{PLOTS}/{key}.svg"] = svg.encode()
        body.append(f'<h3 id="{pid}-provenance">Provenance</h3>')
        body.append(provenance(mine))
    body.append('<h2 id="reported">Reported next to reproduced</h2>')
    body.append(_reported_section(list(reported_figures), df))
    note_html = "".join(f"<p>{_md_inline(p)}</p>" for p in notes.split("\n\n") if p.strip())
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>mmbench leaderboard</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        "<h1>mmbench leaderboard</h1>",
        "<p>Backdoor attacks and defenses in model merging: every attack × merger × defense cell of the "
        "benchmark, with intervals over seeds, rankings, the papers' claims checked, and plots. The same "
        "results as <code>README.md</code>, <code>results.csv</code> and <code>summary.csv</code> beside this "
        "page.</p>",
        note_html, f"<p class='muted'>{_esc(LEGEND)}</p>",
        "<nav>" + " ".join(nav) + "</nav>", *body,
        "<footer><p class='muted'>Generated by <code>mmbench leaderboard</code> from the stored result JSONs "
        "only (no clock is read); <code>mmbench leaderboard --check</code> rebuilds it and compares it byte "
        "for byte. See docs/leaderboard.md.</p></footer>",
        f"<script>{JS}</script>", "</body>", "</html>", ""])
    files["index.html"] = page.encode()
    return dict(sorted(files.items()))


def _stuck_layers(coeffs: dict[str, Any]) -> str:
    """A sentence on the layers whose coefficients never left their initial value."""
    import numpy as np

    if not coeffs:
        return ""
    first = next(iter(coeffs.values()))
    init = first.get("init")
    if init is None:
        return ""
    stacks = [np.stack(list(e["seeds"].values())) for e in coeffs.values() if e["layers"] == first["layers"]]
    if not stacks:
        return ""
    every = np.concatenate(stacks)                        # cells × layers × tasks
    stuck = np.all(np.abs(every - float(init)) < 1e-6, axis=(0, 2))
    if not stuck.any():
        return ""
    return (f"{int(stuck.sum())} of {len(stuck)} layers keep the initial {float(init):g} for every task in "
            f"every cell plotted.")


def files_for(df: pd.DataFrame, results: list[dict[str, Any]], notes: str, out_dir: Path,
              presets: Iterable[str] | None = None,
              detection: dict[str, list[dict[str, Any]]] | None = None,
              sweep_points: dict[str, list[dict[str, Any]]] | None = None,
              findings_lines: dict[str, list] | None = None) -> dict[str, bytes]:
    """The page and its plots for ``mmbench leaderboard``, with the reported figures of
    ``<out_dir>/reported.json`` (validated: a bad entry is a one-line usage error, exit status 2)."""
    from .plugins import UsageError

    try:
        figures = reported.load(Path(out_dir) / reported.FILENAME, presets)
    except reported.ReportedError as exc:
        raise UsageError(str(exc)) from None
    return render(df, results, notes, figures, detection, sweep_points, findings_lines)


def write(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    from .store import atomic_write_bytes

    paths = []
    for name, data in files.items():
        atomic_write_bytes(Path(out_dir) / name, data)
        paths.append(Path(out_dir) / name)
    return paths


def extra_plots(files: dict[str, bytes], out_dir: Path) -> list[str]:
    """Plot files under ``<out_dir>/plots`` that the results no longer give (for --check)."""
    folder = Path(out_dir) / PLOTS
    if not folder.is_dir():
        return []
    return [f"{p}: not made from the stored results (remove it)" for p in sorted(folder.glob("*.svg"))
            if f"{PLOTS}/{p.name}" not in files]
