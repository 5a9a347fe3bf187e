"""A third-party plugin package is discovered, listed and run without touching mmbench."""
import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mmbench-average"


def test_example_plugin_installs_lists_and_runs(tmp_path, smoke_store):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = subprocess.run([sys.executable, "-m", "mmbench.cli", "plugins"], env=env,
                            capture_output=True, text=True, check=True).stdout
    line = next(l for l in listed.splitlines() if " average " in f" {l} ")
    assert "merger" in line and "mmbench-average" in line and "0.1.0" in line
    # its declared parameter is listed, and checked before anything runs
    shown = subprocess.run([sys.executable, "-m", "mmbench.cli", "plugins", "--params", "average"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert next(l for l in shown.splitlines() if l.startswith("scale")).split()[:3] == ["scale", "float", "1.0"]
    bad = subprocess.run([sys.executable, "-m", "mmbench.cli", "plan", "--preset", "smoke", "--merger", "average",
                          "--set", "average.scale=-1", "--store", str(tmp_path / "unused")], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "average.scale is a float ≥ 0 (default 1.0)" in bad.stderr

    store = tmp_path / "store"
    import shutil
    shutil.copytree(smoke_store, store)
    subprocess.run([sys.executable, "-m", "mmbench.cli", "run", "--preset", "smoke", "--attack", "none",
                    "--merger", "average", "--defense", "none", "--store", str(store), "--quiet"],
                   env=env, check=True)
    r = json.loads((store / "results" / "smoke" / "none__average__none__seed0.json").read_text())
    assert r["status"] == "ok"
    merger = r["plugins"]["merger"]
    assert merger == {"name": "average", "distribution": "mmbench-average", "version": "0.1.0",
                      "code": merger["code"]} and len(merger["code"]) == 12
    ta = json.loads((store / "results" / "smoke" / "none__ta__none__seed0.json").read_text())
    # averaging two task vectors is task arithmetic with λ = 1/2; the smoke baseline used the preset's λ
    assert r["info"]["merge"] == {"coefficient": 0.5}
    assert ta["metrics"]["finetuned_acc_per_task"] == r["metrics"]["finetuned_acc_per_task"]


def _fake_package(site: Path, module: str, source: str) -> None:
    """An installed distribution ``module`` (a dist-info with one ``mmbench`` entry point) in ``site``."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mmbench]\n{module} = {module}\n")


def test_check_plugin_passes_the_example_and_names_a_merger_that_merges_nothing(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    _fake_package(target, "keep_base", '''
import mmbench
from mmbench.api import Merged, Merger


class KeepBase(Merger):
    name = "keep_base"
    description = "returns the pretrained weights: merges nothing"

    def merge(self, pretrained, task_vectors, ctx, params):
        return Merged({k: v.clone() for k, v in pretrained.items()})


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(KeepBase())
''')
    env = {**os.environ, "PYTHONPATH": str(target)}
    good = subprocess.run([sys.executable, "-m", "mmbench.cli", "check-plugin", "average"], env=env,
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "average: passes the contract on smoke" in good.stdout
    bad = subprocess.run([sys.executable, "-m", "mmbench.cli", "check-plugin", "keep_base"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1
    line = next(l for l in bad.stdout.splitlines() if "the clean merge" in l)
    assert line.startswith("FAIL") and "gain +0.0" in line and "is anything merged?" in line
    # the example package's own test uses the same check
    own = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(EXAMPLE / "tests")], env=env, capture_output=True, text=True)
    assert own.returncode == 0, own.stdout[-2000:]


def test_a_plugin_that_raises_fails_only_its_own_cells_and_the_status_says_so(tmp_path, smoke_store):
    target = tmp_path / "site"
    target.mkdir()
    _fake_package(target, "broken_plugins", '''
import mmbench
from mmbench.api import Attack, Merger


class Boom(Merger):
    name = "boom"

    def merge(self, pretrained, task_vectors, ctx, params):
        raise RuntimeError("boom merger is broken")


class Kaboom(Attack):
    name = "kaboom"

    def run(self, ctx, params):
        raise ValueError("kaboom attack is broken")


@mmbench.hookimpl
def mmbench_register_mergers(register):
    register(Boom())


@mmbench.hookimpl
def mmbench_register_attacks(register):
    register(Kaboom())
''')
    import shutil
    store = tmp_path / "store"
    shutil.copytree(smoke_store, store)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-m", "mmbench.cli", "run", "--preset", "smoke", "--attack", "none",
                           "--attack", "kaboom", "--merger", "ta", "--merger", "boom", "--defense", "none",
                           "--store", str(store), "--jobs", "1"], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]   # some cells failed: status 1 (docs/architecture.md)
    results = {p.stem: json.loads(p.read_text()) for p in (store / "results" / "smoke").glob("*.json")}
    assert results["none__ta__none__seed0"]["status"] == "ok"
    boom = results["none__boom__none__seed0"]   # its merge stage failed: the cell says so, with the traceback
    assert boom["status"] == "failed"
    assert boom["error"] == "needs merge none/boom (seed 0), which failed: RuntimeError: boom merger is broken"
    assert "boom merger is broken" in boom["traceback"] and "Traceback" in boom["traceback"]
    for merger in ("ta", "boom"):   # the attack failed once; its cells say why, without running
        cell = results[f"kaboom__{merger}__none__seed0"]
        assert cell["status"] == "failed" and "kaboom attack is broken" in cell["traceback"]
        assert cell["error"] == "needs attack kaboom (seed 0), which failed: ValueError: kaboom attack is broken"
    assert "failed: attack kaboom (seed 0): ValueError: kaboom attack is broken" in done.stderr
    assert "traceback in" in done.stdout
