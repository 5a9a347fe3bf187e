"""The store under concurrent and hostile use: stage locks across processes (no leftover lock
files, a dead holder never blocks, one computation per key), unreadable results, corrupt
artifacts, a store that cannot be written, and the crash points of a write."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT_USER, run_unprivileged
import torch

from mmbench.plugins import UsageError
from mmbench.store import LockTimeout, Store, StoreError

KEY = "ab" * 32
fork = multiprocessing.get_context("fork")  # children only lock and append to files: no torch threads


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith((".lock", ".tmp")))


# locks ----------------------------------------------------------------------------------------
def test_lock_files_do_not_accumulate(tmp_path):
    store = Store(tmp_path)
    for i in range(20):
        with store.lock(f"{i:02d}" + "0" * 62):
            assert store.lock_path(f"{i:02d}" + "0" * 62).exists()  # exists while held
        with store.lock(KEY):
            pass
    assert _leftovers(tmp_path) == []


def _hold_until_killed(root: str, ready) -> None:
    with Store(root).lock(KEY):
        ready.set()
        time.sleep(120)


def test_a_lock_held_by_a_killed_process_is_released(tmp_path):
    ready = fork.Event()
    child = fork.Process(target=_hold_until_killed, args=(str(tmp_path), ready))
    child.start()
    try:
        assert ready.wait(30)
        store = Store(tmp_path)
        holder = []
        with pytest.raises(LockTimeout):  # alive: it really holds the lock
            with store.lock(KEY, timeout=0.2, on_wait=holder.append):
                pass
        assert holder and str(child.pid) in holder[0]  # the lock file names its holder
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        start = time.monotonic()
        with store.lock(KEY, timeout=5):
            waited = time.monotonic() - start
        assert waited < 1.0
        assert _leftovers(tmp_path) == []  # the killed holder's file went with the next holder
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def _count_under_lock(root: str, counter: str, rounds: int) -> None:
    store = Store(root)
    for _ in range(rounds):
        with store.lock(KEY):
            value = int(Path(counter).read_text() or 0)  # read-modify-write: only safe if exclusive
            time.sleep(0.001)
            Path(counter).write_text(str(value + 1))


def test_lock_is_exclusive_while_holders_remove_the_file(tmp_path):
    # each holder unlinks the lock file before releasing it; a waiter that wakes on the unlinked
    # file must notice and lock the new one, else two holders would overlap and lose increments
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [fork.Process(target=_count_under_lock, args=(str(tmp_path / "s"), str(counter), 40))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert counter.read_text() == "160"
    assert _leftovers(tmp_path / "s") == []


def _compute_once(root: str, log: str, go) -> None:
    store = Store(root)
    go.wait(30)
    if store.load(KEY) is None:
        with store.lock(KEY):
            if store.load(KEY) is None:  # another process may have made it while this one waited
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
                time.sleep(0.3)
                store.save(KEY, "test", {"w": torch.tensor([1.0, 2.0])}, {"by": os.getpid()})
    tensors, info = store.load(KEY)
    assert tensors["w"].tolist() == [1.0, 2.0]


def test_two_processes_needing_one_stage_compute_it_once(tmp_path):
    log = tmp_path / "computed.log"
    go = fork.Event()
    procs = [fork.Process(target=_compute_once, args=(str(tmp_path / "s"), str(log), go)) for _ in range(3)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 3
    assert len(log.read_text().split()) == 1
    assert _leftovers(tmp_path / "s") == []


def test_threads_of_one_process_exclude_each_other(tmp_path):
    import threading

    store, inside, overlaps = Store(tmp_path), [], []

    def work():
        for _ in range(20):
            with store.lock(KEY):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and _leftovers(tmp_path) == []


def test_sweep_removes_what_dead_writers_left_and_nothing_live(tmp_path):
    store = Store(tmp_path)
    folder = tmp_path / "artifacts" / "ab"
    folder.mkdir(parents=True)
    (folder / f"{KEY}.lock").write_text("")  # a holder died: nobody holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from mmbench.store import _HOST

    stale = folder / f".{KEY}.safetensors.{_HOST}.{dead.stdout.strip()}.abcd1234.tmp"
    live = folder / f".{KEY}.json.{_HOST}.{os.getpid()}.abcd1234.tmp"
    stale.write_text("partial")
    live.write_text("being written")
    with store.lock("ab" + "1" * 62):  # held: must stay
        removed = store.sweep()
        assert store.lock_path("ab" + "1" * 62).exists()
    assert sorted(p.name for p in removed) == sorted([f"{KEY}.lock", stale.name])
    assert live.exists()


# results ----------------------------------------------------------------------------------------
def test_an_unreadable_result_is_reported_not_hidden(tmp_path):
    store = Store(tmp_path)
    store.save_result("smoke", "badnets__ta__none__seed0", {"cell": "badnets__ta__none__seed0", "status": "ok"})
    bad = store.result_path("smoke", "badnets__ta__dam__seed1")
    bad.write_text('{"cell": "badnets__ta__dam__seed1", "status": "o')  # truncated
    store.result_path("smoke", "x__y__z__seed2").write_text("[1, 2]")  # JSON, but not a result
    rows = {r["cell"]: r for r in store.results("smoke")}
    assert {c: r["status"] for c, r in rows.items()} == {
        "badnets__ta__none__seed0": "ok", "badnets__ta__dam__seed1": "unreadable", "x__y__z__seed2": "unreadable"}
    row = rows["badnets__ta__dam__seed1"]
    assert (row["preset"], row["cell"], row["attack"], row["merger"], row["defense"], row["seed"]) == (
        "smoke", "badnets__ta__dam__seed1", "badnets", "ta", "dam", 1)
    assert "JSONDecodeError" in row["error"]
    assert store.load_result("smoke", "badnets__ta__dam__seed1")["status"] == "unreadable"
    assert store.load_result("smoke", "never__run__here__seed0") is None  # missing stays None
    store.results()
    assert len(store.unreadable) == 2 and str(bad) in store.unreadable[0]  # once each


def test_corrupt_artifacts_are_detected_reported_once_and_recomputed(tmp_path):
    store = Store(tmp_path)
    other = "cd" * 32
    store.save(KEY, "test", {"w": torch.arange(1000.0)}, {"n": 1})
    store.save(other, "test", {"w": torch.arange(10.0)}, {"n": 2})
    tensors = tmp_path / "artifacts" / "ab" / f"{KEY}.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # truncated
    sidecar = tmp_path / "artifacts" / "cd" / f"{other}.json"
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = "0" * 64  # altered
    sidecar.write_text(json.dumps(meta))
    for _ in range(3):  # checked again under the stage lock: still reported once
        assert store.load(KEY) is None and store.load(other) is None
    assert len(store.corrupt) == 2 and [c[:12] for c in store.corrupt] == [KEY[:12], other[:12]]
    store.save(KEY, "test", {"w": torch.arange(1000.0)}, {"n": 3})  # the recomputation replaces it
    assert store.load(KEY)[1] == {"n": 3}


# a store that cannot be written -------------------------------------------------------------
def _as_nobody(fn) -> str:
    """Run ``fn`` (→ str) as the unprivileged user in a forked child when this is root (root
    ignores permissions), else here; its result or ``raise:<line>``."""
    def call():
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            return f"raise:{type(exc).__name__}:{exc}"

    return run_unprivileged(call)


@pytest.fixture
def open_dir():
    # under /tmp with traversable parents (pytest's tmp_path is private to the user running it)
    top = Path(tempfile.mkdtemp(prefix="mmbench-store-"))
    top.chmod(0o777)
    yield top
    for p in top.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    import shutil

    shutil.rmtree(top)


def test_a_read_only_store_is_one_line(open_dir):
    ro = open_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = _as_nobody(lambda: (Store(ro).check_writable(), "ok")[1])
    assert out == f"raise:UsageError:store {ro} is not writable: Permission denied"
    out = _as_nobody(lambda: (Store(ro / "new").check_writable(), "ok")[1])  # cannot even be created
    assert out == f"raise:UsageError:store {ro / 'new'} is not writable: Permission denied"

    def save():
        store = Store(ro)
        try:
            store.save(KEY, "test", {"w": torch.zeros(2)}, {})
        except StoreError as exc:
            assert isinstance(exc, OSError) and isinstance(exc, UsageError)
            return f"raise:{exc}"
        return "ok"

    assert _as_nobody(save) == f"raise:cannot write {ro / 'artifacts' / 'ab' / (KEY + '.safetensors')}: Permission denied"
    rw = open_dir / "rw"
    rw.mkdir()
    rw.chmod(0o777)
    assert _as_nobody(lambda: (Store(rw / "sub").check_writable(), "ok")[1]) == "ok"


def test_a_store_under_a_file_is_one_line(tmp_path):
    # what root meets too: a path that cannot be a folder
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"^store .*/file/store is not writable: Not a directory$"):
        Store(tmp_path / "file" / "store").check_writable()
    Store(tmp_path / "fresh" / "store").check_writable()  # created when missing, left empty
    assert list((tmp_path / "fresh" / "store").iterdir()) == []
    store = Store(tmp_path / "s")
    (tmp_path / "s" / "results").mkdir(parents=True)
    (tmp_path / "s" / "results" / "smoke").write_text("")  # where the preset's folder should be
    with pytest.raises(StoreError, match=r"^cannot write .*badnets__ta__none__seed0\.json: "):
        store.save_result("smoke", "badnets__ta__none__seed0", {"status": "ok"})
    (tmp_path / "s" / "artifacts").write_text("")
    with pytest.raises(StoreError, match=r"^cannot write .*\.safetensors: "):
        store.save(KEY, "test", {"w": torch.zeros(2)}, {})


# crash points of a write ---------------------------------------------------------------------
def _killed_write(root: Path, point: str, code: str) -> int:
    script = textwrap.dedent(f"""
        import torch
        from mmbench.store import Store
        store = Store({str(root)!r})
        {code}
    """)
    env = {**os.environ, "MMBENCH_KILL_AT": point, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode


def test_a_write_killed_at_its_fault_points_leaves_nothing_readable(tmp_path):
    rc = _killed_write(tmp_path, "store.save.tensors", f"store.save({KEY!r}, 'test', {{'w': torch.ones(3)}}, {{}})")
    assert rc == -signal.SIGKILL
    store = Store(tmp_path)
    assert (tmp_path / "artifacts" / "ab" / f"{KEY}.safetensors").exists()  # tensors in place, no sidecar
    assert not store.has(KEY) and store.load(KEY) is None and not store.corrupt  # missing, not corrupt
    assert _leftovers(tmp_path) == []

    rc = _killed_write(tmp_path, "store.save_result", "store.save_result('smoke', 'c', {'status': 'ok'})")
    assert rc == -signal.SIGKILL
    assert store.load_result("smoke", "c") is None and store.results() == []
    assert len(_leftovers(tmp_path)) == 1  # the fsynced temporary file, never read
    store.save_result("smoke", "c", {"status": "ok"})  # the rerun's write clears it
    store.save(KEY, "test", {"w": torch.ones(3)}, {})
    assert _leftovers(tmp_path) == [] and store.load_result("smoke", "c") == {"status": "ok"}
    assert store.load(KEY)[0]["w"].tolist() == [1.0] * 3
