"""benchmarks/report.py: what a rerun of the performance suite keeps from the last report."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report  # noqa: E402


def figure(id_, ok=True):
    return dict(id=id_, section="Evaluation", what=f"figure {id_}", measured="1 s", reference="2 s",
                ratio=0.5, ratio_label="×", target="≤ 1×", ok=ok)


def test_changes_made_section_is_carried_over_and_stale_open_items_dropped(tmp_path):
    doc = tmp_path / "performance.md"
    first = report.Recorder()
    first.add(**figure("a"))
    first.add(**figure("b", ok=False))
    first.add_open("an old open item", "text of the old item")
    report.write_report(first, doc, 60.0)
    text = doc.read_text()
    assert "1. **figure b**" in text and "2. **an old open item**: text of the old item" in text
    assert "## Changes made" not in text

    # a person adds the hand-written section; a full rerun keeps it, and drops the old open item
    doc.write_text(text + "## Changes made\n\n- TIES: 5.0 s before, 1.0 s after.\n")
    full = report.Recorder()
    full.add(**figure("a"))
    full.add(**figure("b"))
    report.write_report(full, doc, 60.0)
    text = doc.read_text()
    assert text.rstrip().endswith("## Changes made\n\n- TIES: 5.0 s before, 1.0 s after.")
    assert "an old open item" not in text and "Nothing: every figure meets its target." in text

    # a partial run keeps the figures and open items it did not measure, marked as such
    partial_before = report.Recorder()
    partial_before.add(**figure("a"))
    partial_before.add(**figure("b"))
    partial_before.add_open("kept item", "measured by b's test")
    report.write_report(partial_before, doc, 60.0)
    partial = report.Recorder()
    partial.add(**figure("a"))
    report.write_report(partial, doc, 10.0)
    text = doc.read_text()
    assert "figure b (from an earlier run" in text
    assert "**kept item**: measured by b's test (from an earlier run)" in text
    assert text.count("## Changes made") == 1
