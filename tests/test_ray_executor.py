"""The ``ray`` executor on a real two-node Ray cluster on this machine.

A head and a second node are started on 127.0.0.1 with ``ray start --block`` (one CPU
each, each with its own temporary directory, each in its own process group), the whole
``smoke`` cross product (every installed plugin; 84 cells with the built-ins) is run through ``mmbench run --executor ray
--address 127.0.0.1:PORT``, and the test checks that stages ran on both nodes and that
every result (status, key, metrics) and every artifact key equals those of ``--executor
local --jobs 1`` on a store of its own. Every step is bounded by a timeout; the nodes
are killed (their process groups, then any process left that names their temporary
directory) even when the test fails. Needs ``ray`` (``pip install 'mmbench[ray]'``;
``./install.sh --dev`` installs it); about 1.5 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'mmbench[ray]' "
                                        "(./install.sh --dev installs it)")

RAY = str(Path(sys.executable).with_name("ray"))
SELECTION = ["--preset", "smoke"]      # the whole cross product (84 cells with the built-ins)
START_S = 120                          # for the cluster to come up
RUN_S = 600                            # for one mmbench run


# the test cluster's own token (Ray >= 2.5x authenticates with ~/.ray/auth_token when it
# exists; an explicit token keeps the test independent of what that file holds)
TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMBENCH_KILL_AT", "RAY_ADDRESS")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:] if p.exists() else '(none)'}" for p in logs)
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not within {timeout:.0f} s"
            raise RuntimeError(f"{what}: {why}\n{tails}")
        time.sleep(0.5)


def _kill_cluster(procs: list[subprocess.Popen], root: Path) -> None:
    """SIGKILL each node's process group (ray start --block and everything it started:
    GCS, raylet, workers), then any process still naming ``root`` (a Ray process that
    left the group), by pid. Only processes of this test's nodes are touched."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
    me = os.getpid()
    for _ in range(3):
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(root).encode() in cmdline:
                left.append(int(entry.name))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left:
            break
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """(address, seconds to start) of a two-node Ray cluster on 127.0.0.1."""
    if shutil.which(RAY) is None:
        pytest.skip(f"no `ray` command next to {sys.executable}")
    # short: Ray's unix sockets live under it and their paths must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="mmray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--block",
              "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    procs: list[subprocess.Popen] = []
    logs = [root / "head.log", root / "node2.log"]
    start = time.perf_counter()
    try:
        # one process group per node (start_new_session): teardown kills exactly that group.
        # Each node gets its own --temp-dir and its own dashboard-agent port (fixed by
        # default, so two nodes on one host would collide); other ports are picked free.
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", f"--temp-dir={root / 'head'}", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={_free_port()}", *common],
            stdout=logs[0].open("w"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True))
        _wait_for("the head", lambda: "Ray runtime started" in logs[0].read_text(), START_S, procs[0], logs)
        procs.append(subprocess.Popen(
            [RAY, "start", f"--address={address}", f"--temp-dir={root / 'node2'}",
             f"--dashboard-agent-listen-port={_free_port()}", *common],
            stdout=logs[1].open("w"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True))
        _wait_for("the second node", lambda: "Ray runtime started" in logs[1].read_text(), START_S, procs[1], logs)
        # both registered with the head (what the executor's driver will see)
        check = ("import ray, time\nray.init(address=%r, logging_level='ERROR')\nt = time.time()\n"
                 "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.time() - t < 60: time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))" % address)
        alive = subprocess.run([sys.executable, "-c", check], env=_env(), capture_output=True, text=True,
                               timeout=START_S)
        assert alive.stdout.strip().endswith("2"), alive.stdout + alive.stderr
        yield address, time.perf_counter() - start
    finally:
        _kill_cluster(procs, root)
        shutil.rmtree(root, ignore_errors=True)


def _mmbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmbench.cli", "run", *SELECTION, *args], env=_env(),
                          capture_output=True, text=True, timeout=RUN_S)


def _results(store: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted((store / "results").glob("*/*.json")):
        r = json.loads(path.read_text())
        out[f"{path.parent.name}/{path.stem}"] = (r["status"], r.get("key"), r.get("metrics"))
    return out


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The smoke cross product run with ``--executor local --jobs 1`` and with ``--executor
    ray`` on the two-node cluster, each into a store of its own."""
    address, started_s = cluster
    root = tmp_path_factory.mktemp("ray-vs-local")
    t0 = time.perf_counter()
    local = _mmbench("--executor", "local", "--jobs", "1", "--store", str(root / "local"), "--quiet")
    local_s = time.perf_counter() - t0
    assert local.returncode == 0, local.stderr[-3000:]
    t0 = time.perf_counter()
    done = _mmbench("--executor", "ray", "--address", address, "--store", str(root / "ray"))
    ray_s = time.perf_counter() - t0
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-5000:])
    print(f"\ncluster up in {started_s:.1f} s; local --jobs 1: {local_s:.1f} s; ray on 2 nodes: {ray_s:.1f} s")
    if os.environ.get("MMBENCH_RAY_TEST_KEEP"):  # keep both stores for a look
        shutil.copytree(root, os.environ["MMBENCH_RAY_TEST_KEEP"], dirs_exist_ok=True)
    return {"local": root / "local", "ray": root / "ray", "stderr": done.stderr}


def test_stages_ran_on_both_nodes(runs):
    # "ran on HOST ray:NODE: N stages; HOST ray:NODE: M stages" (printed when >1 node ran stages)
    line = re.search(r"^ran on (.+)$", runs["stderr"], flags=re.M)
    assert line, f"no 'ran on' line: every stage ran on one node?\n{runs['stderr'][-3000:]}"
    nodes = dict((name.strip(), int(n)) for name, n in re.findall(r"([^;]+?): (\d+) stages", line.group(1)))
    print("\nstages computed per node: " + ", ".join(f"{k}: {v}" for k, v in nodes.items()))
    assert len(nodes) == 2 and all(n > 0 for n in nodes.values()), line.group(0)
    assert all(" ray:" in name for name in nodes), nodes


CORE = ("data", "base", "heads", "finetune", "eval")   # the harness's stages before any plugin


def _artifacts(store: Path) -> dict[str, tuple[str, str]]:
    """key → (kind, sha256) of every stored artifact"""
    out = {}
    for p in (store / "artifacts").glob("*/*.json"):
        meta = json.loads(p.read_text())
        out[p.stem] = (meta.get("kind"), meta.get("sha256"))
    return out


def test_results_equal_local(runs):
    ours, theirs = _results(runs["ray"]), _results(runs["local"])
    from mmbench.graph import plan
    from mmbench.plugins import load

    cells = len(plan(load(), load().get("preset", "smoke").obj).cells)  # the installed cross product
    assert len(theirs) == cells and all(status == "ok" for status, _, _ in theirs.values())
    assert sorted(ours) == sorted(theirs)
    for cell in theirs:
        assert ours[cell] == theirs[cell], cell        # status, key and every metric
    # every stage of the graph is stored under the same key; the harness's own stages are
    # bit-identical (plugin stages too: test_bytes_equal_local)
    a, b = _artifacts(runs["ray"]), _artifacts(runs["local"])
    graph_a = {k: v for k, v in a.items() if not v[0].startswith("plugin:")}
    graph_b = {k: v for k, v in b.items() if not v[0].startswith("plugin:")}
    assert set(graph_a) == set(graph_b)
    assert {k: v for k, v in graph_a.items() if v[0] in CORE} == {k: v for k, v in graph_b.items() if v[0] in CORE}
    # the executor's probe file is gone, and no lock or temporary file is left
    left = [p.name for p in runs["ray"].rglob("*") if p.name.startswith(".ray-probe")
            or p.name.endswith(".lock") or (p.name.startswith(".") and p.name.endswith(".tmp"))]
    assert not left, left


def test_bytes_equal_local(runs):
    """Every artifact, plugin stages included, is byte-identical to the local run's: a stage's
    global RNGs are seeded from its key and a computed artifact continues as its stored copy
    (mmbench.context.stage_rng), so what ran before it on a node changes nothing."""
    ours, theirs = _results(runs["ray"]), _results(runs["local"])
    assert sorted(c for c in theirs if ours[c] != theirs[c]) == []
    a, b = _artifacts(runs["ray"]), _artifacts(runs["local"])
    assert sorted(v[0] for k, v in a.items() if b.get(k) != v) == []
