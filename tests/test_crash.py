"""End to end through the CLI on the ``smoke`` preset: a run SIGKILLed at a named point
(``MMBENCH_KILL_AT``, see ``mmbench/faults.py``) and then rerun gives the results of an
uninterrupted run, recomputes no stage that had finished, reads no partial file and leaves no
temporary or lock file; two runs started at once on one store compute every stage once.

One uninterrupted reference run is shared by the module; each run is one cell (badnets × ta ×
none, seed 0), single-threaded, about ten seconds.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SELECTION = ["--preset", "smoke", "--attack", "badnets", "--merger", "ta", "--defense", "none",
             "--seed", "0", "--jobs", "1"]
# NAME[:N]: killed the N-th time the run passes NAME. N is chosen so that some stages have
# finished before the kill (so "nothing finished is recomputed" means something)
POINTS = ["store.save.tensors:5", "store.save_result", "base", "finetune:2", "merge", "cell"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MMBENCH_KILL_AT"}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _run(store: Path, *, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = _env(MMBENCH_KILL_AT=kill_at) if kill_at else _env()
    return subprocess.run([sys.executable, "-m", "mmbench.cli", "run", *SELECTION, "--store", str(store)],
                          env=env, capture_output=True, text=True, timeout=600)


def _start(store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmbench.cli", "run", *SELECTION, "--store", str(store)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(store: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted((store / "results").glob("*/*.json")):
        r = json.loads(path.read_text())
        out[f"{path.parent.name}/{path.stem}"] = (r["status"], r.get("key"), r.get("metrics"))
    return out


def _sidecars(store: Path) -> dict[str, tuple]:
    """Every finished artifact: its sidecar's 'created' and both files' mtimes."""
    out = {}
    for meta in (store / "artifacts").glob("*/*.json"):
        tensors = meta.with_suffix(".safetensors")
        out[meta.stem] = (json.loads(meta.read_text())["created"], meta.stat().st_mtime_ns,
                          tensors.stat().st_mtime_ns)
    return out


def _leftovers(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if p.name.endswith(".lock") or (p.name.startswith(".") and p.name.endswith(".tmp")))


def _computing(stderr: str) -> list[str]:
    return re.findall(r"^\s*computing (.+?) \.\.\.$", stderr, flags=re.M)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    done = _run(store)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(store)
    assert results and all(status == "ok" for status, _, _ in results.values())
    return {"results": results, "seconds": time.perf_counter() - start, "stages": _computing(done.stderr)}


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_then_rerun_gives_the_uninterrupted_results(point, reference, tmp_path):
    store = tmp_path / "store"
    killed = _run(store, kill_at=point)
    if killed.returncode != -signal.SIGKILL:
        pytest.skip(f"the run never passed point {point!r} (exit status {killed.returncode}): "
                    "no such fault point in this code")
    finished = _sidecars(store)
    results_before = {p.name: p.stat().st_mtime_ns for p in (store / "results").glob("*/*.json")}

    rerun = _run(store)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _results(store) == reference["results"]
    after = _sidecars(store)
    assert {k: after.get(k) for k in finished} == finished  # no finished stage was recomputed (or rewritten)
    assert {p.name: p.stat().st_mtime_ns for p in (store / "results").glob("*/*.json")
            if p.name in results_before} == results_before
    recomputed = _computing(rerun.stderr)
    assert len(recomputed) == len(set(recomputed))
    assert "failed verification" not in rerun.stderr  # nothing partial was ever read
    assert _leftovers(store) == []


def test_two_runs_at_once_on_one_store_compute_each_stage_once(reference, tmp_path):
    store = tmp_path / "store"
    procs = [_start(store), _start(store)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    assert _results(store) == reference["results"]
    labels = [label for _, err in outs for label in _computing(err)]
    assert sorted(labels) == sorted(set(labels)), "a stage was computed by both runs"
    assert sorted(labels) == sorted(reference["stages"])  # and every stage by one of them
    assert _leftovers(store) == []


def test_a_store_that_cannot_be_written_is_one_line_and_status_2(tmp_path):
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "mmbench.cli", "run", *SELECTION, "--store",
                           str(tmp_path / "file" / "store")], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"mmbench: error: store {tmp_path / 'file' / 'store'} is not writable: Not a directory"]
