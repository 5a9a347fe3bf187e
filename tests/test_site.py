"""The leaderboard's web page (mmbench/site.py), the reported figures (mmbench/reported.py) and
the well-formedness of committed results (mmbench/submissions.py), on hand-made results whose
figures can be checked by hand."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmbench import leaderboard, reported, site, submissions
from mmbench.graph import setting_tag


def result(attack, defense, seed, acc, asr=None, counts=None, merger="ta", preset="p", **extra):
    metrics = {"acc": acc, "normalized_acc": acc / 0.8}
    if asr is not None:
        metrics["asr"] = asr
    if counts is not None:
        metrics["asr_counts"] = counts
    metrics.update(extra)
    return {"cell": f"{attack}__{merger}__{defense}__seed{seed}", "preset": preset, "attack": attack,
            "merger": merger, "defense": defense, "seed": seed, "key": "k" * 64, "status": "ok",
            "mmbench": "0.2.0", "device": "cpu", "started": f"2026-01-0{seed + 1}T00:00:00Z",
            "environment": {"torch": "2.4", "python": "3.11", "threads": 1, "platform": "linux"},
            "data": {"digits": {"source": "sklearn"}},
            "plugins": {k: {"name": v, "distribution": "mmbench", "version": "0.2.0", "code": f"{v}-code"}
                        for k, v in (("attack", attack), ("merger", merger), ("defense", defense))},
            "params": {"attack": {}, "merger": {"lambda": 0.7}, "defense": {}},
            "metrics": metrics, "durations": {"total": 30.0}, "info": {}}


def two_cells():
    """BadNets under TA, seed 0, without and with IBVS. By hand: ΔACC = 0.78 − 0.80 = −2.0 points,
    ΔASR = 0.10 − 0.90 = −80.0 points, DER = [max(0, 0.80) − max(0, 0.02) + 1] / 2 = 0.890;
    Wilson 95 % of 90/100: [0.8256, 0.9448]."""
    return [result("badnets", "none", 0, 0.80, 0.90, [90, 100], standalone_acc=0.82, standalone_asr=0.99),
            result("badnets", "ibvs", 0, 0.78, 0.10, [10, 100], standalone_acc=0.82, standalone_asr=0.99)]


class Tables(HTMLParser):
    """Every <table id=…>'s body rows as lists of cell texts; <select data-col> options too."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.classes: dict[str, list[list[str]]] = {}
        self._table = None
        self._in_body = False
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table], self.classes[self._table] = [], []
        elif tag == "tbody" and self._table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[self._table].append([])
            self.classes[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell = ""
            self.classes[self._table][-1].append(a.get("class") or "")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append(self._cell.strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def page_of(results, figures=()):
    df = leaderboard.table(results)
    files = site.render(df, results, notes="made by `mmbench leaderboard` for a test", reported_figures=figures)
    return files, files["index.html"].decode()


def row(rows, *first):
    found = [r for r in rows if tuple(r[:len(first)]) == first]
    assert len(found) == 1, (first, rows)
    return found[0]


def test_cells_table_shows_hand_checked_figures_and_der():
    files, text = page_of(two_cells())
    tables = Tables(text).tables
    cells = tables["p-cells-table"]
    # attack, merger, defense, n, status, ACC, Norm ACC, ASR, ACC alone, ASR alone, ΔACC, ΔASR, DER
    assert row(cells, "badnets", "ta", "none") == ["badnets", "ta", "none", "1", "ok 1", "80.0", "100.0", "90.0",
                                                   "82.0", "99.0", "", "", ""]
    assert row(cells, "badnets", "ta", "ibvs") == ["badnets", "ta", "ibvs", "1", "ok 1", "78.0", "97.5", "10.0",
                                                   "82.0", "99.0", "-2.0", "-80.0", "0.890"]
    seeds = tables["p-seeds-table"]
    r = row(seeds, "badnets", "ta", "none", "0")
    assert r[5:9] == ["80.0", "100.0", "90.0", "[82.6, 94.5]"]
    # the defense ranking: ASR removed 80.0, ACC lost 2.0, DER 0.890, over 1 seed and 1 attack
    ranking = tables["p-defenses"]
    assert row(ranking, "ta", "ibvs") == ["ta", "ibvs", "+80.0", "+2.0", "0.890", "1", "1"]
    assert row(tables["p-attacks"], "ta") == ["ta", "1", "badnets", "90.0", "1", "", ""]


def test_intervals_over_seeds_and_paired_star():
    """ibvs lowers ASR by 0.10, 0.11, 0.12 in seeds 0–2: mean −11.0, s 1.0, half 4.303·1.0/√3 = 2.5
    points; the paired interval excludes 0 (*). ΔACC −1, 0, −2: mean −1.0 ± 2.5, no star."""
    results = []
    for seed, (a0, a1, s0, s1) in enumerate([(0.70, 0.69, 0.50, 0.40), (0.72, 0.72, 0.70, 0.59),
                                             (0.74, 0.72, 0.90, 0.78)]):
        results += [result("badnets", "none", seed, a0, s0), result("badnets", "ibvs", seed, a1, s1)]
    _, text = page_of(results)
    parsed = Tables(text)
    cells = parsed.tables["p-cells-table"]
    ibvs = row(cells, "badnets", "ta", "ibvs")
    assert ibvs[3] == "3" and ibvs[10] == "-1.0 ± 2.5" and ibvs[11] == "-11.0 ± 2.5 *"
    i = cells.index(ibvs)
    assert "sig" in parsed.classes["p-cells-table"][i][11] and "sig" not in parsed.classes["p-cells-table"][i][10]
    # the per-seed table has every cell and seed
    assert len(parsed.tables["p-seeds-table"]) == 6


def test_page_is_self_contained():
    results = two_cells() + [result("none", "none", 0, 0.81)]
    files, text = page_of(results)
    assert text.startswith("<!DOCTYPE html>")
    assert "<link" not in text and "@import" not in text and not re.search(r"<script[^>]*\bsrc=", text)
    assert not re.search(r"url\(\s*['\"]?(?!#)", text)                      # no CSS url() but to an id
    targets = re.findall(r"(?:href|src)\s*=\s*[\"']([^\"']*)", text)
    outside = [t for t in targets if not t.startswith(("#", "data:image/png;base64,"))]   # the heat map's pixels
    assert targets and outside == []
    # the plots are inline SVG, and also files
    assert "plots/p-acc-asr.svg" in files and "plots/p-asr-heatmap.svg" in files
    assert text.count("<svg") == 2 and "<?xml" not in text
    svg = files["plots/p-acc-asr.svg"].decode()
    assert "merger ta" in svg and "ASR after merging (%)" in svg        # text stays text (svg.fonttype none)
    assert "<dc:date>" not in svg and "Matplotlib" not in svg
    heat = files["plots/p-asr-heatmap.svg"].decode()
    assert ">90</text>" in heat and ">10</text>" in heat             # ASR per attack × defense, in %


def test_page_is_deterministic_across_order_and_processes(tmp_path):
    results = two_cells() + [result("none", "none", 0, 0.81)]
    a, _ = page_of(results)
    b, _ = page_of(list(reversed(results)))
    assert a == b
    (tmp_path / "results.json").write_text(json.dumps(results))
    script = ("import json, sys, hashlib\nfrom mmbench import leaderboard, site\n"
              "r = json.load(open(sys.argv[1]))\n"
              "files = site.render(leaderboard.table(r), r, notes='made by `mmbench leaderboard` for a test')\n"
              "print(hashlib.sha256(b''.join(k.encode() + v for k, v in files.items())).hexdigest())\n")
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "results.json")], env=env,
                             capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    import hashlib
    assert digests == {hashlib.sha256(b"".join(k.encode() + v for k, v in a.items())).hexdigest()}


def test_adamerging_coefficients_plot_and_stuck_layers():
    results = []
    for seed, lam in enumerate([[[0.3, 0.3], [0.5, 0.7]], [[0.3, 0.3], [0.6, 0.8]]]):
        r = result("none", "none", seed, 0.8, merger="adamerging")
        r["info"] = {"merge": {"lambdas": lam, "layers": ["conv1.weight", "transformer.resblocks.0.mlp.c_fc.bias"],
                               "tasks": ["a", "b"], "init": 0.3, "granularity": "layer"}}
        results.append(r)
    files, text = page_of(results)
    assert "plots/p-adamerging-coefficients.svg" in files
    assert "1 of 2 layers keep the initial 0.3 for every task in every cell plotted." in text
    svg = files["plots/p-adamerging-coefficients.svg"].decode()
    assert "b0.mlp.c_fc.b" in svg and "attack none (2 seeds)" in svg


def test_lambda_sweeps_from_badtv_info():
    results = []
    for seed in (0, 1):
        r = result("badtv", "none", seed, 0.7, 0.9)
        r["info"] = {"attack": {"addition": {"0.3": {"acc": 0.6, "asr": 0.25}, "1.0": {"acc": 0.8, "asr": 1.0}},
                                "negation": {"0.3": {"acc": 0.04, "asr": 0.6}}}}
        results.append(r)
    from mmbench import findings
    sweeps = site.lambda_sweeps(findings.frame(results))
    assert sweeps["badtv"][0]["addition"] == [(0.3, 0.25, 0.6), (1.0, 1.0, 0.8)]
    files, _ = page_of(results)
    assert "plots/p-asr-vs-lambda.svg" in files


def test_findings_and_provenance_on_the_page():
    _, text = page_of(two_cells())
    parsed = Tables(text)
    claims = {r[0]: r[1] for r in parsed.tables["p-findings-table"]}
    assert claims["classic_collapses / ta"] == "inconclusive"       # 1 seed: no interval
    assert claims["badtv_survives_analogy"] == "not measured"
    assert "ibvs-code" in text and "2026-01-01T00:00:00Z" in text and "sklearn" in text
    assert "1.0 min of cell time" in text                              # 2 cells × 30 s


def test_claims_measured_along_a_sweep_reach_the_page():
    # the page evaluated its claims without the sweep points once, and showed "not measured"
    # where README.md had a verdict: BadMerging's ASR over the task-count sweep
    results = [result("badmerging", "none", s, 0.6, 0.97, preset="p") for s in (0, 1, 2)]
    points = [{"param": "merge.tasks", "attack": "badmerging", "merger": "ta", "defense": "none", "value": float(k),
               "seeds": {s: {"asr": a, "acc": 0.5, "normalized_acc": 0.7} for s, a in enumerate(asrs)}}
              for k, asrs in ((2, [0.97, 0.96, 0.98]), (3, [0.95, 0.97, 0.96]))]
    files = site.render(leaderboard.table(results), results, sweep_points={"p": points})
    claims = {r[0]: r[1:4] for r in Tables(files["index.html"].decode()).tables["p-findings-table"]}
    # per seed the smaller of K = 2, 3: 0.95, 0.96, 0.96 → mean 0.957, t-interval [0.942, 0.971] > 0.92
    assert claims["badmerging_over_tasks / ta, K 2–3"] == ["reproduced", "0.957", "[0.942, 0.971]"]
    assert "badmerging_over_tasks" not in claims                       # no "not measured" line beside it


def figure_entry(**change):
    entry = {"preset": "p", "attack": "badnets", "merger": "ta", "defense": "none", "metric": "asr",
             "value": 0.95, "source": {"paper": "BadMerging (Zhang et al. 2024)", "table": "Table 9",
                                       "row": "TA, test fixture"}}
    entry.update(change)
    return entry


def test_reported_next_to_reproduced(tmp_path):
    path = tmp_path / "reported.json"
    path.write_text(json.dumps({"about": "a fixture, not a paper's figure", "figures": [figure_entry()]}))
    figures = reported.load(path, presets=["p"])
    assert figures == [reported.Figure("p", "badnets", "ta", "none", "asr", 0.95, "BadMerging (Zhang et al. 2024)",
                                       "Table 9", "TA, test fixture")]
    _, text = page_of(two_cells(), figures)
    rows = Tables(text).tables["reported"]
    # reported 95.0, mmbench 90.0 (one seed), mmbench − reported −5.0 points
    assert rows == [["p", "badnets", "ta", "none", "asr", "95.0", "BadMerging (Zhang et al. 2024)", "Table 9",
                     "TA, test fixture", "90.0", "-5.0", ""]]
    # a figure for a cell without results: the mmbench side says so
    other = reported.parse({"figures": [figure_entry(defense="dam")]})
    _, text = page_of(two_cells(), other)
    assert Tables(text).tables["reported"][0][9] == "not run"
    # none: the table is empty, and the page says why
    _, text = page_of(two_cells())
    assert Tables(text).tables["reported"] == [] and "No reported figure has been verified yet" in text
    assert reported.load(tmp_path / "absent.json") == []


@pytest.mark.parametrize("figures, needle", [
    ([figure_entry(value=95)], "value must be a fraction in [0, 1] (98.5 % is 0.985)"),
    ([figure_entry(metric="accuracy")], "metric 'accuracy' is not one of acc, normalized_acc, asr"),
    ([figure_entry(source={"paper": "X", "table": ""})], "source must be an object with non-empty paper, table and row"),
    ([figure_entry(preset="vit-b-99")], "unknown preset 'vit-b-99'"),
    ([figure_entry(), figure_entry()], "figure 2: the same cell, metric and paper as figure 1"),
    ([{k: v for k, v in figure_entry().items() if k != "source"}], "figure 1: missing source"),
    ([figure_entry(year=2024)], "unknown field(s) year"),
])
def test_bad_reported_entries_are_one_line_errors(tmp_path, figures, needle):
    path = tmp_path / "reported.json"
    path.write_text(json.dumps({"figures": figures}))
    with pytest.raises(reported.ReportedError) as err:
        reported.load(path, presets=["p"])
    message = str(err.value)
    assert needle in message and "\n" not in message and message.startswith(str(path))


def test_bad_json_is_one_line(tmp_path):
    path = tmp_path / "reported.json"
    path.write_text("{not json")
    with pytest.raises(reported.ReportedError, match="not valid JSON"):
        reported.load(path)


def test_committed_reported_file_is_valid():
    path = Path(__file__).resolve().parents[1] / "leaderboard" / reported.FILENAME
    assert path.exists()
    reported.load(path)


def test_submitted_results_are_checked(tmp_path):
    folder = tmp_path / "results" / "p"
    folder.mkdir(parents=True)
    good = two_cells()[0]
    (folder / f"{good['cell']}.json").write_text(json.dumps(good))
    assert submissions.problems(tmp_path) == []
    bad = dict(good, metrics=dict(good["metrics"], asr=0.5))          # 0.5 is not 90/100
    (folder / "renamed.json").write_text(json.dumps(bad))
    (folder / "broken.json").write_text("{")
    lines = submissions.problems(tmp_path)
    assert any(l.startswith(str(folder / "broken.json")) and "not readable JSON" in l for l in lines)
    assert any("file name renamed.json is not the cell's" in l for l in lines)
    assert any("metrics.asr 0.5 is not asr_counts k/n = 90/100" in l for l in lines)
    assert submissions.result_problems({**good, "seed": -1})[0] == "seed must be an integer ≥ 0"
    assert submissions.result_problems({**good, "status": "stale"}) == ["status 'stale' is not ok or failed"]
    # a cell run with --set or --sweep carries the setting's tag (graph.setting_tag) in its id
    setting = {"ta": {"lambda": 0.3}}
    swept = {**good, "setting": setting,
             "cell": good["cell"].replace("__seed", f"__{setting_tag(setting)}__seed")}
    assert setting_tag(setting).startswith("set-ta.lambda=0.3-")
    assert submissions.result_problems(swept) == []
    assert submissions.result_problems({**swept, "setting": {}})[0].startswith(
        f"cell {swept['cell']!r} is not attack__merger__defense__seedN")
    assert submissions.result_problems({**good, "setting": setting})[0].startswith(
        f"cell {good['cell']!r} is not attack__merger__defense__set-...__seedN")


def test_leaderboard_command_writes_and_checks_the_page(store_copy, tmp_path, monkeypatch, capsys):
    from mmbench.cli import main

    monkeypatch.setenv("MMBENCH_PLUGINS", "ta,none,presets")
    board = tmp_path / "board"
    args = ["leaderboard", "--preset", "smoke", "--store", str(store_copy), "--out", str(board)]
    assert main(args) == 0
    text = (board / "index.html").read_text()
    assert "Preset <code>smoke</code>" in text and "No reported figure has been verified yet" in text
    capsys.readouterr()
    assert main(args + ["--check"]) == 0
    assert capsys.readouterr().out.strip() == "leaderboard up to date"
    (board / "index.html").write_text(text.replace("mmbench leaderboard", "edited", 1))
    (board / "plots").mkdir(exist_ok=True)
    (board / "plots" / "old.svg").write_text("<svg/>")
    assert main(args + ["--check"]) == 1
    out = capsys.readouterr().out
    assert f"{board / 'index.html'}: differs" in out and f"{board / 'plots' / 'old.svg'}: not made" in out
    (board / "plots" / "old.svg").unlink()
    # a reported figure: validated, shown, and part of what --check compares
    (board / "reported.json").write_text(json.dumps({"figures": [figure_entry(preset="smoke", attack="none",
                                                                              metric="acc", value=0.5)]}))
    assert main(args) == 0 and main(args + ["--check"]) == 0
    assert "TA, test fixture" in (board / "index.html").read_text()
    (board / "reported.json").write_text(json.dumps({"figures": [figure_entry(preset="nope")]}))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'nope'" in err[0]
    # a broken submitted result is named by --check
    (board / "reported.json").unlink()
    assert main(args) == 0
    (store_copy / "results" / "smoke" / "extra.json").write_text("{")
    capsys.readouterr()
    assert main(args + ["--check"]) == 1
    assert "extra.json: not readable JSON" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="headless Chromium is not installed (Debian package chromium)")
def test_page_in_headless_chromium_sorts_and_filters(tmp_path):
    """The page's own script in a real browser: a click on the ASR header sorts the cells table
    (descending on a second click), the filter box narrows its rows; no console error."""
    results = two_cells() + [result("sbv", "none", 0, 0.79, 0.05, [5, 100]), result("none", "none", 0, 0.81)]
    _, text = page_of(results)
    probe = """<script>
(function(){var t=document.getElementById('p-cells-table');var th=t.tHead.rows[0].cells;
function col(i){return Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[i].textContent;});}
th[7].click();var asc=col(7).join('|');th[7].click();var desc=col(7).join('|');
var box=document.querySelector('[data-filter="p-cells-table"]');var q=box.querySelector('input');
q.value='sbv';q.dispatchEvent(new Event('input'));
var shown=Array.prototype.filter.call(t.tBodies[0].rows,function(r){return !r.hidden;}).length;
var out=document.createElement('pre');out.id='probe';
out.textContent=JSON.stringify({asc:asc,desc:desc,shown:shown,count:box.querySelector('.count').textContent});
document.body.appendChild(out);})();
</script>"""
    page = tmp_path / "index.html"
    page.write_text(text.replace("</body>", probe + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stderr[-2000:]
    probe_out = json.loads(match.group(1).replace("&amp;", "&").replace("&quot;", '"'))
    assert probe_out["asc"] == "5.0|10.0|90.0|" and probe_out["desc"] == "90.0|10.0|5.0|"   # blanks last
    assert probe_out["shown"] == 1 and probe_out["count"] == "1 of 4 rows"
    errors = [l for l in proc.stderr.splitlines() if "CONSOLE" in l and ("Error" in l or "error" in l)]
    assert errors == []
