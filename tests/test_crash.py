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
POINTS = ["store.save.tensors:5", "store.save_result", "base.step:20", "finetune.step:5", "merge", "cell"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MMBENCH_KILL_AT"}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _run(store: Path, *, kill_at: str | None = None, selection: list[str] = SELECTION,
         **env_extra: str) -> subprocess.CompletedProcess:
    env = _env(MMBENCH_KILL_AT=kill_at, **env_extra) if kill_at else _env(**env_extra)
    return subprocess.run([sys.executable, "-m", "mmbench.cli", "run", *selection, "--store", str(store)],
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
        if json.loads(meta.read_text())["kind"] == "checkpoint":  # dropped once its stage is saved
            continue
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


def test_kill_while_writing_the_leaderboard_leaves_whole_files(reference, tmp_path):
    """SIGKILL after the leaderboard's first file: every file is either absent or whole, and a
    rerun writes the same files as an uninterrupted one."""
    store = tmp_path / "store"
    assert _run(store).returncode == 0
    board, clean = tmp_path / "board", tmp_path / "clean"
    argv = [sys.executable, "-m", "mmbench.cli", "leaderboard", "--preset", "smoke", "--store", str(store)]
    killed = subprocess.run(argv + ["--out", str(board)], env=_env(MMBENCH_KILL_AT="leaderboard"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    written = sorted(p.name for p in board.iterdir() if p.is_file())
    assert written and not _leftovers(board)
    assert subprocess.run(argv + ["--out", str(clean)], env=_env(), capture_output=True, timeout=300).returncode == 0
    assert len(written) < len([p for p in clean.iterdir() if p.is_file()])
    for name in written:  # what was written before the kill is whole
        assert (board / name).read_bytes() == (clean / name).read_bytes()
    assert subprocess.run(argv + ["--out", str(board)], env=_env(), capture_output=True, timeout=300).returncode == 0
    assert ({p.name: p.read_bytes() for p in board.iterdir() if p.is_file()}
            == {p.name: p.read_bytes() for p in clean.iterdir() if p.is_file()})


@pytest.mark.parametrize("merger, point", [("ta", "finetune.step:8"), ("adamerging", "step.adamerging:3")])
def test_a_long_stage_resumes_from_its_checkpoint(merger, point, tmp_path):
    """A fine-tune (or AdaMerging) killed part-way resumes from its last checkpoint (saved every
    step here: MMBENCH_CHECKPOINT_SECONDS=0) and ends exactly where an uninterrupted run does."""
    selection = ["--preset", "smoke", "--attack", "none", "--merger", merger, "--defense", "none",
                 "--seed", "0", "--jobs", "1"]
    clean, store = tmp_path / "clean", tmp_path / "store"
    assert _run(clean, selection=selection).returncode == 0
    killed = _run(store, kill_at=point, selection=selection, MMBENCH_CHECKPOINT_SECONDS="0")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = _run(store, selection=selection, MMBENCH_CHECKPOINT_SECONDS="0")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"resuming .* from step [1-9]", rerun.stderr), rerun.stderr[-2000:]
    assert _results(store) == _results(clean)  # bit for bit: same keys, same metrics
    kinds = [json.loads(p.read_text())["kind"] for p in (store / "artifacts").glob("*/*.json")]
    assert "checkpoint" not in kinds and _leftovers(store) == []


def _marked(mark: str) -> list[int]:
    """pids of live processes whose environment holds ``MMBENCH_TEST_MARK=mark``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"MMBENCH_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_workers_stop_when_the_run_is_killed(tmp_path):
    """SIGKILL the parent of a --jobs 2 run: its worker processes stop within seconds instead of
    computing on for nobody (and competing with the rerun for the cores)."""
    mark = f"{os.getpid()}-{time.time()}"
    proc = subprocess.Popen([sys.executable, "-m", "mmbench.cli", "run", "--preset", "smoke", "--attack", "none",
                             "--attack", "badnets", "--merger", "ta", "--defense", "none", "--seed", "0",
                             "--jobs", "2", "--store", str(tmp_path / "store")],
                            env=_env(MMBENCH_TEST_MARK=mark), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_marked(mark)) < 3 and time.monotonic() < deadline:  # the run and its two workers
            time.sleep(0.2)
        assert len(_marked(mark)) >= 3, "the workers never started"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60  # a worker still importing torch stops once it has
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _marked(mark) == []
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)
