"""Is a committed result file well-formed? (``mmbench leaderboard --check``)

The published leaderboard is built from result files committed under
``leaderboard/store/results/<preset>/<cell>.json``, one per cell and seed, exactly as
``mmbench run`` writes them; a third party contributes results by a pull request that adds
such files (docs/leaderboard.md). The store skips a file it cannot parse, so a broken
submission would silently drop out of the page: :func:`problems` names every such file, and
every file whose name, fields or figures do not hold together. Whether a result's key is the
one the current code gives its cell (else it is ``stale``) is checked by the leaderboard.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .graph import setting_tag

REQUIRED = ("cell", "preset", "attack", "merger", "defense", "seed", "key", "status", "plugins")
FRACTIONS = ("acc", "normalized_acc", "asr", "standalone_acc", "standalone_asr",
             "standalone_clean_acc", "standalone_clean_asr", "dev_acc")


def _fraction(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            and 0.0 <= value <= 1.0)


def result_problems(result: Any, name: str = "", preset_dir: str = "") -> list[str]:
    """What is wrong with one parsed result (empty when well-formed); ``name`` is its file
    name without ``.json`` and ``preset_dir`` the folder it is in, when known."""
    if not isinstance(result, dict):
        return ["not a JSON object"]
    out = [f"missing field {f!r}" for f in REQUIRED if f not in result]
    if out:
        return out
    for f in ("cell", "preset", "attack", "merger", "defense", "key"):
        if not isinstance(result[f], str) or not result[f]:
            out.append(f"{f} must be a non-empty string")
    if not isinstance(result["seed"], int) or isinstance(result["seed"], bool) or result["seed"] < 0:
        out.append("seed must be an integer ≥ 0")
    if out:
        return out
    setting = result.get("setting") or {}
    if not isinstance(setting, dict) or any(not isinstance(v, dict) for v in setting.values()):
        return out + ["setting must be an object of {plugin: {parameter: value}}"]
    # a cell run with --set or --sweep carries its setting's tag in its id (graph.setting_tag)
    tag = f"__{setting_tag(setting)}" if setting else ""
    cell = f"{result['attack']}__{result['merger']}__{result['defense']}{tag}__seed{result['seed']}"
    if result["cell"] != cell:
        what = "attack__merger__defense__set-...__seedN" if tag else "attack__merger__defense__seedN"
        out.append(f"cell {result['cell']!r} is not {what} = {cell!r}")
    if name and name != result["cell"]:
        out.append(f"file name {name}.json is not the cell's, {result['cell']}.json")
    if preset_dir and preset_dir != result["preset"]:
        out.append(f"in folder {preset_dir}/ but preset is {result['preset']!r}")
    if result["status"] not in ("ok", "failed"):
        out.append(f"status {result['status']!r} is not ok or failed")
    plugins = result["plugins"]
    if not isinstance(plugins, dict) or any(
            not isinstance(plugins.get(k), dict) or plugins[k].get("name") != result[k]
            for k in ("attack", "merger", "defense")):
        out.append("plugins must name the cell's attack, merger and defense (name, distribution, version, code)")
    if result["status"] == "ok":
        metrics = result.get("metrics")
        if not isinstance(metrics, dict):
            return out + ["an ok result needs metrics"]
        if "acc" not in metrics:
            out.append("an ok result needs metrics.acc")
        for f in FRACTIONS:
            if metrics.get(f) is not None and not _fraction(metrics[f]):
                out.append(f"metrics.{f} must be a fraction in [0, 1], not {metrics[f]!r}")
        counts = metrics.get("asr_counts")
        if counts is not None:
            if (not isinstance(counts, list) or len(counts) != 2 or not all(isinstance(c, int) for c in counts)
                    or not 0 <= counts[0] <= counts[1]):
                out.append(f"metrics.asr_counts must be [k, n] with 0 ≤ k ≤ n, not {counts!r}")
            elif counts[1] and _fraction(metrics.get("asr")) and abs(counts[0] / counts[1] - metrics["asr"]) > 1e-9:
                out.append(f"metrics.asr {metrics['asr']} is not asr_counts k/n = {counts[0]}/{counts[1]}")
    return out


def problems(store_root: Path, presets: list[str] | None = None) -> list[str]:
    """One line per malformed result file under ``<store_root>/results/<preset>/``."""
    base = Path(store_root) / "results"
    out = []
    folders = [base / p for p in presets] if presets else sorted(p for p in base.glob("*") if p.is_dir())
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                out.append(f"{path}: not readable JSON ({str(exc).splitlines()[0]})")
                continue
            out += [f"{path}: {p}" for p in result_problems(result, path.stem, folder.name)]
    return out
