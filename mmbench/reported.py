"""Figures the papers report, as data: ``leaderboard/reported.json``.

The leaderboard page shows each reported figure beside mmbench's figure for the same cell
(preset, attack, merger, defense, metric). A figure enters this file only when someone read it
in the paper and names where: ``source`` = {paper, table, row}. Nothing is filled from
memory; a cell without a verified figure stays blank on the page.

The file::

    {"about": "…free text…",
     "figures": [
       {"preset": "vit-b-32-6task", "attack": "badmerging", "merger": "ta", "defense": "none",
        "metric": "asr", "value": 0.985,
        "source": {"paper": "BadMerging (Zhang et al. 2024)", "table": "Table 2", "row": "TA / CIFAR100"},
        "note": "optional free text"}
     ]}

``value`` is a fraction (98.5 % → 0.985), as every figure mmbench stores. :func:`load`
validates the file and raises :class:`ReportedError` with one line naming the file, the entry
and what is wrong.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

FILENAME = "reported.json"
METRICS = ("acc", "normalized_acc", "asr", "standalone_acc", "standalone_asr")
FIELDS = ("preset", "attack", "merger", "defense", "metric", "value", "source")
OPTIONAL = ("note",)
SOURCE_FIELDS = ("paper", "table", "row")


class ReportedError(ValueError):
    """A bad reported.json: the message is one line."""


@dataclass(frozen=True)
class Figure:
    preset: str
    attack: str
    merger: str
    defense: str
    metric: str
    value: float
    paper: str
    table: str
    row: str
    note: str = ""

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return self.preset, self.attack, self.merger, self.defense


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def parse(data: Any, where: str = FILENAME, presets: Iterable[str] | None = None) -> list[Figure]:
    """The figures of a parsed reported.json (see the module docstring); ``presets``, when
    given, are the preset names an entry may use."""
    known = sorted(presets) if presets is not None else None
    if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
        raise ReportedError(f'{where}: expected an object with a list "figures" (see docs/leaderboard.md)')
    unknown_top = sorted(set(data) - {"about", "figures"})
    if unknown_top:
        raise ReportedError(f"{where}: unknown top-level field(s) {', '.join(unknown_top)} (allowed: about, figures)")
    out: list[Figure] = []
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(data["figures"], 1):
        at = f"{where}: figure {i}"
        if not isinstance(entry, dict):
            raise ReportedError(f"{at}: expected an object, got {type(entry).__name__}")
        missing = [f for f in FIELDS if f not in entry]
        if missing:
            raise ReportedError(f"{at}: missing {', '.join(missing)}")
        extra = sorted(set(entry) - set(FIELDS) - set(OPTIONAL))
        if extra:
            raise ReportedError(f"{at}: unknown field(s) {', '.join(extra)}")
        for f in ("preset", "attack", "merger", "defense"):
            if not _text(entry[f]):
                raise ReportedError(f"{at}: {f} must be a non-empty string")
        if known is not None and entry["preset"] not in known:
            raise ReportedError(f"{at}: unknown preset {entry['preset']!r} (known: {', '.join(known)})")
        if entry["metric"] not in METRICS:
            raise ReportedError(f"{at}: metric {entry['metric']!r} is not one of {', '.join(METRICS)}")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not 0.0 <= value <= 1.0:
            raise ReportedError(f"{at}: value must be a fraction in [0, 1] (98.5 % is 0.985), not {value!r}")
        source = entry["source"]
        if not isinstance(source, dict) or any(not _text(source.get(f)) for f in SOURCE_FIELDS):
            raise ReportedError(f"{at}: source must be an object with non-empty paper, table and row")
        extra = sorted(set(source) - set(SOURCE_FIELDS))
        if extra:
            raise ReportedError(f"{at}: unknown source field(s) {', '.join(extra)}")
        note = entry.get("note", "")
        if not isinstance(note, str):
            raise ReportedError(f"{at}: note must be a string")
        key = (entry["preset"], entry["attack"], entry["merger"], entry["defense"], entry["metric"],
               source["paper"])
        if key in seen:
            raise ReportedError(f"{at}: the same cell, metric and paper as figure {seen[key]}")
        seen[key] = i
        out.append(Figure(entry["preset"], entry["attack"], entry["merger"], entry["defense"], entry["metric"],
                          float(value), source["paper"], source["table"], source["row"], note))
    return sorted(out, key=lambda f: (f.preset, f.attack, f.merger, f.defense, f.metric, f.paper))


def load(path: Path, presets: Iterable[str] | None = None) -> list[Figure]:
    """The figures of ``path``; none when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ReportedError(f"{path}: not valid JSON ({exc})") from None
    return parse(data, str(path), presets)
