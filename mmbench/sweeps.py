"""Parameter sweeps: ``mmbench run --sweep ta.lambda=0.1,0.3,0.5`` and the curves the
leaderboard draws from them.

A sweep is a list of ``--set`` settings (a plugin's parameter, or the harness's own
``merge.tasks``, the number of merged tasks): each value (each combination, when several
``--sweep`` options are given) is its own setting, so its cells have their own keys and
result files (``<cell>__set-...__seed<N>.json``) and never replace the preset's own. The
shared stages (data, base, fine-tunes and, when the swept plugin is a merger or defense,
the attacks) are computed once for all values.

The leaderboard (:func:`collect`, :func:`markdown`, :func:`plot`) reads every stored result
whose setting changes exactly one parameter of one plugin and whose key is the key its cell
has under that setting now (a stale point is left out), adds the preset's own cells as the
point at the preset's value, and draws ASR and ACC against the value, one line per attack,
merger and defense, mean over seeds (the table gives the intervals).
"""
from __future__ import annotations

import itertools
import json
from typing import Any, Iterable

from .keys import canonical_json
from .plugins import UsageError


def parse(items: Iterable[str], registry) -> list[dict[str, dict[str, Any]]]:
    """``["ta.lambda=0.1,0.3", "ties.k=0.1,0.2"]`` → one overrides dict per combination (the
    cartesian product, in the order given). Each value is parsed as JSON, else kept as a
    string; a value holding a comma (a list) cannot be swept here: give it with ``--set``."""
    from .graph import parse_overrides

    axes: list[list[tuple[str, str]]] = []
    for item in items:
        target, eq, values = item.partition("=")
        if not eq or "." not in target or not values:
            raise UsageError(f"--sweep wants PLUGIN.PARAM=V1,V2,..., got {item!r}")
        parts = [v.strip() for v in values.split(",")]
        if any(not v for v in parts):
            raise UsageError(f"--sweep {item!r} has an empty value")
        if len(set(parts)) != len(parts):
            raise UsageError(f"--sweep {item!r} repeats a value")
        axes.append([(target, v) for v in parts])
    combos = []
    for combo in itertools.product(*axes):
        try:
            overrides = parse_overrides([f"{t}={v}" for t, v in combo], registry)
        except UsageError as exc:
            raise UsageError(str(exc).replace("--set", "--sweep")) from None
        combos.append(overrides)
    return combos


def merge_overrides(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for plugin, values in extra.items():
        out.setdefault(plugin, {}).update(values)
    return out


# --- the leaderboard's side -------------------------------------------------------------------------
def _single(setting: Any) -> tuple[str, str, Any] | None:
    """(plugin, param, value) when ``setting`` changes exactly one parameter, else None."""
    if not isinstance(setting, dict) or len(setting) != 1:
        return None
    (plugin, values), = setting.items()
    if not isinstance(values, dict) or len(values) != 1:
        return None
    (param, value), = values.items()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None  # a curve needs a numeric axis
    return plugin, param, value


def current_results(registry, store, preset) -> list[dict[str, Any]]:
    """The ok results of ``preset`` stored with one setting (a sweep's cells) whose key is the
    key their cell has now, in the order of their settings."""
    from .graph import plan

    swept: dict[str, list[dict[str, Any]]] = {}
    for r in store.results(preset.name):
        if _single(r.get("setting")) is None or r.get("status") != "ok":
            continue
        swept.setdefault(canonical_json(r["setting"]), []).append(r)
    out: list[dict[str, Any]] = []
    for setting_json, results in sorted(swept.items()):
        seeds = sorted({r["seed"] for r in results if isinstance(r.get("seed"), int)})
        try:
            graph = plan(registry, preset, seeds=seeds, overrides=json.loads(setting_json), detectors=[])
        except UsageError:
            continue  # a plugin or parameter that no longer exists
        keys = {c.id: graph.cell_keys[c] for c in graph.cells}
        out += [r for r in results if keys.get(r.get("cell")) == r.get("key")]
    return out


def collect(registry, store, preset, current: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The sweep points of ``preset``: one entry per (plugin.param, attack, merger, defense,
    value) with the per-seed ASR, ACC and normalised ACC of the ok results whose key is current."""
    from .graph import HARNESS, plan

    current = current_results(registry, store, preset) if current is None else current
    if not current:
        return []
    points: dict[tuple, dict[str, Any]] = {}

    def add(plugin: str, param: str, value: Any, r: dict[str, Any]) -> None:
        key = (f"{plugin}.{param}", r["attack"], r["merger"], r["defense"], float(value))
        entry = points.setdefault(key, {"param": key[0], "attack": key[1], "merger": key[2], "defense": key[3],
                                        "value": key[4], "seeds": {}})
        m = r.get("metrics") or {}
        entry["seeds"][r["seed"]] = {"asr": m.get("asr"), "acc": m.get("acc"),
                                     "normalized_acc": m.get("normalized_acc")}

    params_seen: set[tuple[str, str]] = set()
    for r in current:
        plugin, param, value = _single(r["setting"])
        add(plugin, param, value, r)
        params_seen.add((plugin, param))
    if not points:
        return []
    # the preset's own value of each swept parameter, from its own cells
    own_graph = plan(registry, preset, detectors=[])
    own_keys = {c.id: own_graph.cell_keys[c] for c in own_graph.cells}
    combos = {(k[0], k[1], k[2], k[3]) for k in points}
    for r in store.results(preset.name):
        if r.get("setting") or r.get("status") != "ok" or own_keys.get(r.get("cell")) != r.get("key"):
            continue
        for plugin, param in params_seen:
            if (f"{plugin}.{param}", r["attack"], r["merger"], r["defense"]) in combos:
                if plugin == HARNESS:  # merge.tasks: the preset's own cells merge every task
                    add(plugin, param, len(preset.task_names), r)
                    continue
                kind = next((k for k in ("attack", "merger", "defense") if plugin in registry.names(k)), None)
                if kind is None:
                    continue
                value = own_graph.params.get((kind, plugin), {}).get(param)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    add(plugin, param, value, r)
    return [points[k] for k in sorted(points)]


def markdown(preset: str, points: list[dict[str, Any]]) -> str:
    """The README's sweep section of one preset ('' without sweeps)."""
    if not points:
        return ""
    from . import stats
    from .leaderboard import fmt_interval, tab

    import pandas as pd

    def iv(entry: dict[str, Any], metric: str) -> str:
        return fmt_interval(stats.t_interval(s.get(metric) for s in entry["seeds"].values()))
    lines = [f"### Sweeps, preset `{preset}`", "",
             "Cells stored with one parameter changed (`mmbench run --sweep PLUGIN.PARAM=...`), with the "
             "preset's own cells at its own value; mean ± 95 % t-interval over the seeds stored, in %.", "",
             tab(pd.DataFrame({
                 "parameter": [p["param"] for p in points], "attack": [p["attack"] for p in points],
                 "merger": [p["merger"] for p in points], "defense": [p["defense"] for p in points],
                 "value": [f"{p['value']:g}" for p in points], "n": [len(p["seeds"]) for p in points],
                 "ASR": [iv(p, "asr") for p in points], "ACC": [iv(p, "acc") for p in points],
                 "Norm ACC": [iv(p, "normalized_acc") for p in points]})), ""]
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], salt: str) -> str | None:
    """ASR (solid) and ACC (dotted) against the swept value, one panel per parameter, one
    colour per attack/merger/defense; mean over the stored seeds. SVG text, or None."""
    from .site import _Plotting, _colors, _svg

    if not points:
        return None
    params = sorted({p["param"] for p in points})
    with _Plotting(salt) as Figure:
        fig = Figure(figsize=(4.6 * len(params), 3.2))
        axes = fig.subplots(1, len(params), squeeze=False)[0]
        for ax, param in zip(axes, params):
            mine = [p for p in points if p["param"] == param]
            lines = sorted({(p["attack"], p["merger"], p["defense"]) for p in mine})
            colors = _colors(["/".join(line) for line in lines])
            for line in lines:
                pts = sorted((p for p in mine if (p["attack"], p["merger"], p["defense"]) == line),
                             key=lambda p: p["value"])
                xs = [p["value"] for p in pts]

                def mean(p: dict[str, Any], metric: str) -> float:
                    vals = [s[metric] for s in p["seeds"].values() if s.get(metric) is not None]
                    return 100 * sum(vals) / len(vals) if vals else float("nan")
                name = "/".join(line)
                if line[0] != "none":
                    ax.plot(xs, [mean(p, "asr") for p in pts], "-o", color=colors[name], label=f"{name} ASR",
                            markersize=3)
                ax.plot(xs, [mean(p, "acc") for p in pts], ":", color=colors[name], label=f"{name} ACC")
            ax.set_xlabel(param)
            ax.set_ylabel("%")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=6, loc="best")
        return _svg(fig, salt)
