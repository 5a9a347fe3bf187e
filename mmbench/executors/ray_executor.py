"""The ``ray`` executor: the stages of a graph as tasks on a Ray cluster.

``pip install 'mmbench[ray]'``; ``mmbench run --executor ray --address HOST:PORT`` (no
``--address``: a Ray started for this run on this machine with ``--jobs`` CPUs, or the
cluster ``RAY_ADDRESS`` names; a caller that has already called ``ray.init`` keeps its
own). docs/executors.md says how to run it on a cluster.

Design: the driver (this process) schedules from the graph and Ray places and runs the
tasks. A stage is submitted as a Ray task only once every stage of ``todo`` it needs has
*succeeded*; it gets those stages' task ObjectRefs as arguments, so Ray itself also orders
it after them (inputs outside ``todo`` are already in the store). This is the simplest
design that keeps the local executor's failure rule exactly: a stage whose input failed
is never started, and it and everything that needs it, transitively, are reported at
once through :func:`~mmbench.executors.skipped` outcomes, in the same order as
:mod:`mmbench.executors.local` reports them. (Submitting the whole graph at once and
letting tasks return early when an input failed would save one driver round trip per
level of a graph that is four levels deep, at the price of a second copy of that rule
inside the tasks.) Ready stages go out long ones first (:data:`~mmbench.executors.RANK`),
with at most twice the cluster's CPUs in flight, so that the ranking still means something
to Ray's own queue.

Each task runs :func:`mmbench.worker.run_stage` in a Ray worker process: it reads its
inputs from the store, computes under the store's lock on its key, and writes
atomically, so the store must be one shared directory at the same path on every node.
Resources: one CPU per task; on ``--device cuda`` also one GPU for the stages that do
heavy tensor work (``Stage.gpu``: fine-tunes, attacks, merges, cells, ...), none for the
others (data, an un-pretrained base), which then run on the CPU (what they store does
not depend on the device). On a CPU a stage runs with one intra-op thread, as with
``local``.

``Outcome.node`` of a stage run here is ``HOST ray:NODEID`` (the first 8 hex digits of
the Ray node id): two Ray nodes on one host share a host name.

Before the first task, one probe task per live node (pinned to it) checks that the node
sees the driver's store (a marker file the driver writes there) and plans the same graph
(the same mmbench and plugin code: keys contain code fingerprints, so a node with other
versions would store different results under the driver's keys); a node that fails
either check stops the run with one line naming it (:class:`~mmbench.plugins.UsageError`).

Failures: a stage that raises is an error outcome (its own cell fails, the rest goes on);
a task whose Ray worker or node dies is retried ``retries`` times (default 1) by Ray and
then reported as an error outcome "the Ray worker running it died"; a UsageError inside a
task stops the run as it does locally. If for ``stall_s`` seconds (default 300) nothing
finishes and no live node could run a waiting task (no CPU left, no GPU on a CUDA run),
the run stops with :class:`ClusterError` rather than wait forever. Whatever was finished
is in the store; a rerun computes only the rest.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
from ray import exceptions as rex

from ..execute import Outcome, Runtime
from ..graph import Graph, Stage
from ..plugins import UsageError
from . import Schedule
from .local import WorkerDied

PROBE_FILE = ".ray-probe"


class ClusterError(WorkerDied):
    """The Ray cluster cannot go on (no node can run what is left, the cluster went away)."""


def node_name() -> str:
    """``HOST ray:NODEID`` of the node this (Ray worker) process runs on."""
    return f"{socket.gethostname()} ray:{ray.get_runtime_context().get_node_id()[:8]}"


def _stage_task(graph: Graph, runtime: Runtime, key: str, force: bool, *inputs: Any) -> Outcome:
    """One stage, in a Ray worker process. ``inputs``: the Outcomes of the stages of this
    run it needs (all succeeded; passed so that Ray orders this task after theirs)."""
    from ..worker import run_stage

    out = run_stage(graph, runtime, key, force)
    out.node = node_name()
    return out


def _probe_task(graph: Graph, store: str, marker: str, token: str) -> dict[str, Any]:
    """What this node sees: the store (the driver's marker file), mmbench's version, the
    plugins' code fingerprints and the digest of the graph it plans for the same selection."""
    import mmbench

    report: dict[str, Any] = {"node": node_name(), "mmbench": mmbench.__version__, "store": None,
                              "plugins": {}, "digest": None}
    try:
        text = (Path(store) / marker).read_text()
        if text != token:
            report["store"] = f"{store} is a different folder there (the probe file holds something else)"
        elif not os.access(store, os.W_OK):
            report["store"] = f"{store} is not writable there"
    except OSError as exc:
        report["store"] = f"cannot read {store}/{marker} there ({exc.strerror or exc}): is the store mounted at " \
                          "the same path on every node?"
    try:
        from ..graph import NO_ATTACK, plan
        from ..plugins import load

        registry = load()
        for kind, name in graph.plugins:
            if name == NO_ATTACK:
                continue
            try:
                report["plugins"][f"{kind} {name}"] = registry.get(kind, name).code
            except Exception:  # not installed there
                report["plugins"][f"{kind} {name}"] = None
        cells = graph.cells
        again = plan(registry, graph.preset, list(dict.fromkeys(c.attack for c in cells)),
                     list(dict.fromkeys(c.merger for c in cells)), list(dict.fromkeys(c.defense for c in cells)),
                     list(dict.fromkeys(c.seed for c in cells)), graph.overrides)
        report["digest"] = again.digest
    except Exception as exc:
        report["digest"] = f"{type(exc).__name__}: {exc}"
    return report


class RayExecutor:
    name = "ray"

    def __init__(self, jobs: int = 1, address: str | None = None, *, retries: int = 1, gpus_per_stage: float = 1,
                 stall_s: float = 300, check_nodes: bool = True, init_options: dict[str, Any] | None = None,
                 **unused: Any) -> None:
        self.jobs = max(1, int(jobs))
        self.address = address
        self.retries = int(retries)
        self.gpus_per_stage = gpus_per_stage
        self.stall_s = stall_s
        self.check_nodes = check_nodes
        self.init_options = dict(init_options or {})

    # --- connecting ----------------------------------------------------------------------
    def _connect(self) -> bool:
        """``ray.init`` unless the caller did; True when this executor started the session."""
        if ray.is_initialized():
            return False
        import logging

        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if not self.address:  # a Ray for this run, on this machine, with --jobs CPUs
            options.update(num_cpus=self.jobs, include_dashboard=False)
            if os.environ.get("RAY_ADDRESS"):  # ... unless the environment names a cluster
                options = {k: v for k, v in options.items() if k not in ("num_cpus", "include_dashboard")}
        options.update(self.init_options)
        self._reachable()
        try:
            ray.init(address=self.address or None, **options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            where = f"at {self.address}" if self.address else "on this machine"
            raise UsageError(f"cannot connect to a Ray cluster {where}: {str(exc).splitlines()[0] if str(exc) else exc}"
                             ) from None
        return True

    def _reachable(self, timeout: float = 10) -> None:
        """A HOST:PORT address that nothing listens on is one line at once (``ray.init``
        would retry for minutes)."""
        host, sep, port = (self.address or "").rpartition(":")
        if not sep or not port.isdigit() or "://" in self.address:
            return  # "auto", "ray://...", no address: ray.init decides
        try:
            socket.create_connection((host, int(port)), timeout).close()
        except OSError as exc:
            raise UsageError(f"cannot reach the Ray cluster at {self.address} ({exc.strerror or exc}): is "
                             "`ray start --head` running there?") from None

    # --- the run -------------------------------------------------------------------------
    def execute(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Runtime,
                on_outcome: Callable[[Outcome], None], **unused: Any) -> None:
        started = self._connect()
        try:
            self._execute(graph, todo, forced, runtime, on_outcome)
        finally:
            if started:
                ray.shutdown()

    def _resources(self, stage: Stage, cuda: bool) -> dict[str, Any]:
        return {"num_cpus": 1, "num_gpus": self.gpus_per_stage if cuda and stage.gpu else 0}

    def _execute(self, graph: Graph, todo: list[Stage], forced: set[str], runtime: Runtime,
                 on_outcome: Callable[[Outcome], None]) -> None:
        store = os.path.abspath(runtime.store)  # the same path on every node
        cuda = runtime.device.startswith("cuda")
        # a GPU task sees only its GPU (Ray sets CUDA_VISIBLE_DEVICES): "cuda", not "cuda:N"
        gpu_runtime = replace(runtime, store=store, bars=False, tag="", device="cuda" if cuda else runtime.device)
        cpu_runtime = replace(gpu_runtime, device="cpu") if cuda else gpu_runtime
        if cuda and not ray.cluster_resources().get("GPU"):
            raise UsageError("--device cuda, but no node of the Ray cluster has a GPU (ray start --num-gpus N)")
        graph_ref = ray.put(graph)  # once; every task gets it from the object store
        if self.check_nodes:
            self._probe(graph, graph_ref, store)
        stage_remote = ray.remote(_stage_task)
        schedule = Schedule(todo)
        stages, order = schedule.stages, schedule.order
        refs: dict[str, Any] = {}          # key → ObjectRef of its task (kept: dependents get them)
        running: dict[Any, str] = {}       # ObjectRef → key
        last_progress = time.monotonic()
        try:
            while schedule or running:
                limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 0)))
                while schedule and len(running) < limit:
                    key = schedule.pop()
                    stage = stages[key]
                    rt = gpu_runtime if stage.gpu else cpu_runtime
                    ref = stage_remote.options(name="mmbench-stage", max_retries=self.retries,
                                         **self._resources(stage, cuda)).remote(
                        graph_ref, rt, key, key in forced, *[refs[i] for i in stage.inputs if i in refs])
                    running[ref] = key
                    refs[key] = ref
                done, _ = ray.wait(list(running), num_returns=1, timeout=10.0)
                if not done:
                    if time.monotonic() - last_progress > self.stall_s:
                        self._check_feasible([stages[k] for k in running.values()], cuda)
                    continue
                last_progress = time.monotonic()
                done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                done.sort(key=lambda r: order[running[r]])  # inputs before their users
                for ref in done:
                    key = running.pop(ref)
                    for item in schedule.finish(self._outcome(ref, stages[key])):
                        on_outcome(item)
        except BaseException:
            # no new stage starts; the driver's tasks end with it (every store write is
            # atomic, so whatever they leave is complete) and a rerun picks up the rest
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            raise

    def _outcome(self, ref: Any, stage: Stage) -> Outcome:
        try:
            return ray.get(ref)
        except rex.RayTaskError as exc:  # raised in the task, outside run_stage's own handler
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (UsageError, KeyboardInterrupt)):
                raise cause from None
            error = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).splitlines()[0]
            return Outcome(stage.key, stage.kind, stage.label, error=error, result={"traceback": str(exc)})
        except (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OutOfMemoryError,
                rex.TaskCancelledError, rex.RayError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return Outcome(stage.key, stage.kind, stage.label,
                           error=f"the Ray worker running it died ({type(exc).__name__}"
                                 f"{': ' + first if first else ''}); rerun to compute it again")

    def _check_feasible(self, waiting_stages: list[Stage], cuda: bool) -> None:
        """Raise ClusterError when no live node could run a waiting stage (after stall_s
        seconds without progress)."""
        alive = [n for n in ray.nodes() if n.get("Alive")]
        cpus = max((n.get("Resources", {}).get("CPU", 0) for n in alive), default=0)
        gpus = max((n.get("Resources", {}).get("GPU", 0) for n in alive), default=0)
        need_gpu = any(self._resources(s, cuda)["num_gpus"] for s in waiting_stages)
        if not alive or cpus < 1 or (need_gpu and gpus < self.gpus_per_stage):
            what = "no live node" if not alive else ("no node with a free CPU" if cpus < 1 else "no node with a GPU")
            raise ClusterError(f"the Ray cluster has {what} for the {len(waiting_stages)} stages still waiting "
                               f"(nothing finished for {self.stall_s:.0f} s); what finished is stored: rerun "
                               "when the cluster is back")

    def _probe(self, graph: Graph, graph_ref: Any, store: str, timeout: float = 180) -> None:
        """One task per live node: does it see the store, does it plan the same graph?"""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        token = uuid.uuid4().hex
        marker = f"{PROBE_FILE}.{socket.gethostname()}.{os.getpid()}.{token[:8]}"
        path = Path(store) / marker
        path.write_text(token)
        try:
            probe = ray.remote(_probe_task)
            refs = [probe.options(name="mmbench-probe", num_cpus=0, max_retries=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
                graph_ref, store, marker, token) for n in nodes]
            done, late = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            problems: list[str] = []
            import mmbench

            for ref in done:
                try:
                    r = ray.get(ref)
                except rex.RayError as exc:
                    problems.append(f"a node's probe failed: {str(exc).splitlines()[0]}")
                    continue
                node = r["node"]
                if r["store"]:
                    problems.append(f"node {node}: {r['store']}")
                if r["mmbench"] != mmbench.__version__:
                    problems.append(f"node {node}: mmbench {r['mmbench']}, here {mmbench.__version__}")
                for name, code in r["plugins"].items():
                    kind, plugin = name.split(" ", 1)
                    ours = graph.plugins[(kind, plugin)]["code"]
                    if code is None:
                        problems.append(f"node {node}: {name} is not installed")
                    elif code != ours:
                        problems.append(f"node {node}: {name} has other code (fingerprint {code[:12]}, here "
                                        f"{ours[:12]})")
                if r["digest"] != graph.digest and not any(p.startswith(f"node {node}:") for p in problems):
                    why = r["digest"] if r["digest"] and len(r["digest"]) != 64 else (
                        "other stage keys: other mmbench code, or a local checkpoint or dataset that differs there")
                    problems.append(f"node {node} plans a different graph ({why})")
            if late:
                print(f"mmbench: warning: {len(late)} Ray node(s) did not answer the store and code check "
                      f"within {timeout:.0f} s; going on", file=sys.stderr, flush=True)
                for ref in late:
                    ray.cancel(ref, force=True)
            if problems:
                raise UsageError("the Ray cluster cannot run this graph: " + "; ".join(problems)
                                 + " (every node needs the store at the same path and the same mmbench and plugin "
                                 "versions: docs/executors.md)")
        finally:
            try:
                path.unlink()
            except OSError:
                pass
