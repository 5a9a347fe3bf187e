"""Recording the suite's figures and writing docs/performance.md (with plots and JSON)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

SECTIONS = ("Merging at ViT-B-32 scale", "Evaluation", "Fine-tuning", "AdaMerging and DAM",
            "Start-up and reruns", "How cost grows", "Memory found by reading the code")


@dataclass
class Figure:
    id: str
    section: str
    what: str
    measured: str            # the subject, with its unit
    reference: str           # the reference measured in the same run, with its unit
    ratio: float | None      # measured ÷ reference (or the figure the target is stated on)
    ratio_label: str         # how to read the ratio, e.g. "× the bound"
    target: str
    ok: bool | None          # None: no target / not measurable here
    note: str = ""
    fix: str = ""            # the proposed change when the target is missed


@dataclass
class Recorder:
    strict: bool = False
    figures: list[Figure] = field(default_factory=list)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    open_items: list[tuple[str, str]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def add(self, **kw) -> Figure:
        fig = Figure(**kw)
        self.figures = [f for f in self.figures if f.id != fig.id] + [fig]
        print(f"\n  [{fig.section}] {fig.what}: {fig.measured} vs {fig.reference} → "
              f"{'' if fig.ratio is None else f'{fig.ratio:.3g} '}{fig.ratio_label} "
              f"(target {fig.target}: {'—' if fig.ok is None else 'pass' if fig.ok else 'MISS'})")
        if self.strict and fig.ok is False:
            import pytest
            pytest.fail(f"{fig.what}: {fig.measured} misses its target {fig.target}", pytrace=False)
        return fig

    def add_series(self, name: str, **data) -> None:
        self.series[name] = data

    def add_open(self, title: str, text: str) -> None:
        self.open_items = [o for o in self.open_items if o[0] != title] + [(title, text)]


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": None if mem is None else round(mem / 2 ** 30, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "cuda": torch.cuda.is_available(),
            "load_average_at_end": round(os.getloadavg()[0], 2), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _plots(rec: Recorder, folder: Path) -> list[tuple[str, str]]:
    """PNG plots of the recorded series; (title, file name) of each."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    merge = {k: v for k, v in rec.series.items() if k.startswith("merge-vs-")}
    if merge:
        fig, axes = plt.subplots(1, len(merge), figsize=(5.5 * len(merge), 4), squeeze=False)
        for ax, (name, s) in zip(axes[0], sorted(merge.items())):
            for label, ys in s["lines"].items():
                ax.plot(s["x"], ys, marker="o", label=label)
            if "bound" in s:
                ax.plot(s["x"], s["bound"], linestyle="--", color="gray", label="memory-bandwidth bound")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(s["xlabel"])
            ax.set_ylabel("seconds per merge (1 thread)")
            ax.set_title(s["title"], fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "performance-merge-scaling.png", dpi=110)
        plt.close(fig)
        made.append(("Merge time against the number of tasks and the parameters per task",
                     "performance-merge-scaling.png"))
    cells = rec.series.get("run-vs-cells")
    if cells:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(cells["x"], cells["y"], marker="o", label="mmbench run (cold store), measured")
        ax.plot(cells["x"], cells["naive"], linestyle="--", color="gray",
                label="cells × the one-cell run (no sharing)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells (preset smoke, growing selections)")
        ax.set_ylabel("wall seconds")
        ax.set_title(cells["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "performance-cells.png", dpi=110)
        plt.close(fig)
        made.append(("Run time against the number of cells", "performance-cells.png"))
    return made


CHANGES = "## Changes made"


def changes_made(path: Path) -> list[str]:
    """The hand-written "Changes made" section of the current file (a change to the code, with its
    figure before and after), carried over unchanged: the rest of the file is generated."""
    if not path.exists():
        return []
    text = path.read_text()
    if CHANGES not in text:
        return []
    section = text[text.index(CHANGES):]
    end = section.find("\n## ", len(CHANGES))
    section = section if end < 0 else section[:end]
    return section.rstrip("\n").split("\n") + [""]


def write_report(rec: Recorder, path: Path, seconds: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec.machine = machine()
    m = rec.machine
    # a partial run (-k, one file) keeps the figures it did not measure from the last run, marked
    kept = 0
    previous_json = path.with_suffix(".json")
    if previous_json.exists():
        try:
            previous = json.loads(previous_json.read_text())
        except ValueError:
            previous = {}
        ids = {f.id for f in rec.figures}
        for old in previous.get("figures", []):
            if old["id"] not in ids:
                fig = Figure(**old)
                if "earlier run" not in fig.note:
                    fig.note = (fig.note + "; " if fig.note else "") + \
                        f"from an earlier run, {previous.get('machine', {}).get('date', '?')}"
                rec.figures.append(fig)
                kept += 1
        for name, data in previous.get("series", {}).items():
            rec.series.setdefault(name, data)
        if kept:  # a partial run: the open items of the parts it did not run stay, marked
            titles = {t for t, _ in rec.open_items}
            rec.open_items += [(o[0], o[1] if "(from an earlier run)" in o[1] else f"{o[1]} (from an earlier run)")
                               for o in previous.get("open", []) if o[0] not in titles]
        if kept and previous.get("suite_seconds"):
            seconds = previous["suite_seconds"]
    plots = _plots(rec, path.parent)
    lines = [
        "# Performance",
        "",
        "Written by the benchmark suite (`.venv/bin/python -m pytest benchmarks`, `benchmarks/`); do not "
        "edit by hand, except the section \"Changes made\" at the end, which the suite carries over. Every figure is a ratio against a reference measured in the same run, so it holds "
        "on a noisy machine; the absolute figures are this machine's.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_gib']} GiB; CUDA: "
        f"{'yes' if m['cuda'] else 'no GPU'}",
        f"- torch {m['torch']}, Python {m['python']}, {m['platform']}",
        f"- commit {m['commit']}, {m['date']}; load average at the end {m['load_average_at_end']}",
        "- run: `.venv/bin/python -m pytest benchmarks` (`--perf-doc PATH` writes elsewhere, `--perf-strict` "
        "fails a missed target, `--perf-cold-log` names the log of a cold `mmbench run --preset tiny`, whose seed-0 stages the tiny figures need in leaderboard/store (`cp -al STORE/artifacts leaderboard/store/`); `MMBENCH_BENCH_LAYERS`, "
        "`MMBENCH_BENCH_PRESET=smoke`, `MMBENCH_BENCH_QUICK=1` shrink it for a quick check).",
        "- CPU measurements run with one intra-op thread, as `mmbench run` runs each stage on a CPU "
        "(docs/architecture.md); the copy bandwidth is one thread's too.",
        f"- the whole suite took {seconds / 60:.1f} min" + (f" ({kept} figures kept from an earlier run, "
                                                           "marked so)." if kept else "."),
        "",
        "## Figures",
        "",
        "| figure | measured | reference (same run) | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(SECTIONS)}
    figures = sorted(rec.figures, key=lambda f: order.get(f.section, len(order)))
    section = None
    for f in figures:
        if f.section != section:
            section = f.section
            lines.append(f"| **{section}** | | | | | |")
        ratio = "—" if f.ratio is None else f"{f.ratio:.3g} {f.ratio_label}"
        result = "—" if f.ok is None else "pass" if f.ok else "**miss**"
        what = f.what + (f" ({f.note})" if f.note else "")
        lines.append(f"| {what} | {f.measured} | {f.reference} | {ratio} | {f.target} | {result} |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for title, name in plots:
            lines += [f"{title}:", "", f"![{title}]({name})", ""]
    lines += ["## Open", "",
              "What misses its target, or could not be measured here, and the proposed change. Changes "
              "to `mmbench/{train,evaluate,execute,context,data,hf,...}.py` and `plugins/` are proposed, "
              "not made: their source is fingerprinted into the stage keys, so editing them recomputes "
              "the leaderboard.", "",
              "The figures above are this commit's; changes already made, each with its before and after, "
              "are listed under \"Changes made\".", ""]
    n = 0
    for f in figures:
        if f.ok is False:
            n += 1
            ratio = "" if f.ratio is None else f"{f.ratio:.3g} {f.ratio_label}; "
            lines.append(f"{n}. **{f.what}**: {f.measured} against {f.reference} ({ratio}"
                         f"target {f.target}). {f.fix or 'No change proposed yet.'}")
    for title, text in rec.open_items:
        n += 1
        lines.append(f"{n}. **{title}**: {text}")
    if n == 0:
        lines.append("Nothing: every figure meets its target.")
    lines.append("")
    lines += changes_made(path)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(
        {"machine": m, "suite_seconds": seconds, "figures": [asdict(f) for f in figures],
         "series": rec.series, "open": rec.open_items}, indent=1) + "\n")
    return path
