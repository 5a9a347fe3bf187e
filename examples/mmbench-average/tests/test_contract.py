"""The plugin's own test: mmbench's contract check on the smoke preset (about 15 s on a CPU).

Run with the package installed: ``pytest examples/mmbench-average/tests``."""
from mmbench.check import check_plugin
from mmbench.plugins import load


def test_average_passes_the_mmbench_contract():
    findings = check_plugin("average", load())
    problems = [f.text for f in findings if f.level == "FAIL"]
    assert not problems, problems
