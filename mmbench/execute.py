"""Execute one stage of a planned graph (:mod:`mmbench.graph`) in this process.

An executor (``mmbench.executors``) decides where and when each stage runs; whatever it
is, a stage runs through :func:`run_stage`: its inputs are read from the store (and
computed here if an input is missing there, e.g. deleted by hand), the stage is computed
under the store's lock on its key, written atomically, and an :class:`Outcome` goes back.
A process keeps one :class:`Worker` per graph, so stages run by one worker process share
the artifacts it has already loaded (the base model, the heads, the fine-tunes).

On a CPU every stage runs with one intra-op thread, whatever ``torch.get_num_threads()``
was: float reductions then add in one order on any machine and with any ``--jobs``, so the
thread count is not part of any key (docs/architecture.md); parallelism comes from running
independent stages at once.
"""
from __future__ import annotations

import contextlib
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import __version__, faults
from .api import AttackResult, BoundMerger, Merged, PluginError, StateDict, Trigger
from .context import RunContext, SharedStages, stage_rng
from .evaluate import rate, wilson
from .graph import NO_ATTACK, Cell, Graph, Stage
from .plugins import UsageError
from .store import Store


@dataclass
class Outcome:
    """What running one stage gave: ``seconds`` None when it was found in the store,
    ``result`` the cell's result (cells only), ``error`` one line when it raised."""

    key: str
    kind: str
    label: str
    seconds: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    node: str = ""
    reused: list[str] = field(default_factory=list)       # plugin stages and inputs found in the store
    computed: list[tuple[str, float]] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Runtime:
    """What a process needs besides the graph to run its stages (picklable)."""

    store: str
    device: str = "cpu"
    quiet: bool = False
    bars: bool = True
    tag: str = ""            # prefix of this process's console lines ("" in the main process)


def environment() -> dict[str, Any]:
    """What a cell ran on, beyond mmbench's and the plugins' versions."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform(terse=True)}


@contextlib.contextmanager
def single_threaded(device: torch.device):
    """One intra-op thread on a CPU while a stage computes (then back to what it was)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Worker:
    """Runs stages of one graph in this process, keeping what it loads in memory."""

    def __init__(self, graph: Graph, runtime: Runtime, registry=None,
                 echo: Callable[[str], None] | None = None) -> None:
        from .plugins import load

        self.graph = graph
        self.preset = graph.preset
        self.runtime = runtime
        self.registry = registry if registry is not None else load()
        self.store = Store(runtime.store)
        self.device = torch.device(runtime.device)
        if echo is None:
            tag = f"{runtime.tag} " if runtime.tag else ""
            echo = lambda m: print(f"{tag}{m.strip() if tag else m}", file=sys.stderr, flush=True)  # noqa: E731
        self.shared = SharedStages(self.preset, self.store, self.device, quiet=runtime.quiet, echo=echo)
        self.shared.bars = runtime.bars
        self._finetuned: dict[int, dict[str, Any]] = {}

    # dispatch -------------------------------------------------------------------------
    def run(self, key: str, force: bool = False) -> Outcome:
        stage = self.graph.stage(key)
        log = self.shared.log
        n_reused, n_computed, n_corrupt = len(log.reused), len(log.computed), len(self.store.corrupt)
        out = Outcome(key, stage.kind, stage.label)
        try:
            with single_threaded(self.device), stage_rng(stage.key):
                if stage.kind == "cell":
                    out.result = self.cell(stage, force)
                    out.seconds = out.result.get("durations", {}).get("total") if out.result.get("_computed") else None
                    out.result.pop("_computed", None)
                    if out.result.get("status") == "failed":
                        out.error = out.result.get("error")
                else:
                    out.seconds = getattr(self, "_" + stage.kind.replace("-", "_"))(stage, force)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"
            out.result = {"traceback": traceback.format_exc(limit=-4)}
        out.reused = [s for s in log.reused[n_reused:] if s != stage.label]
        out.computed = [c for c in log.computed[n_computed:] if c[0] != stage.label]
        out.corrupt = self.store.corrupt[n_corrupt:]
        return out

    def _timed(self, fn: Callable[[], Any]) -> float | None:
        """Run ``fn`` (which loads or computes its stage); the seconds it computed, else None."""
        before = len(self.shared.log.computed)
        fn()
        new = self.shared.log.computed[before:]
        return new[-1][1] if new else None

    # the harness's stages -----------------------------------------------------------------
    def _data(self, stage: Stage, force: bool) -> float | None:
        return self._timed(lambda: self.shared.task_data(stage.task))

    def _base(self, stage: Stage, force: bool) -> float | None:
        return self._timed(self.shared.base)

    def _heads(self, stage: Stage, force: bool) -> float | None:
        return self._timed(self.shared.heads)

    def _finetune(self, stage: Stage, force: bool) -> float | None:
        return self._timed(lambda: self.shared.clean_finetune(stage.task, stage.seed))

    def _eval_finetuned(self, stage: Stage, force: bool) -> float | None:
        return self._timed(lambda: self.finetuned_accuracy(stage.seed))

    def _attack(self, stage: Stage, force: bool) -> float | None:
        return self._timed(lambda: self.attack(stage.attack, stage.seed, force=force))

    def _merge(self, stage: Stage, force: bool) -> float | None:
        ctx = RunContext(self.shared, stage.seed)
        vectors = self.cell_vectors(stage.attack, stage.seed, stage.tasks)
        return self._timed(lambda: self.merge(stage, ctx.pretrained(), vectors, force=force))

    def finetuned_accuracy(self, seed: int) -> dict[str, Any]:
        """{task: test ACC, "base": {task: test ACC}, "dev": {task: dev ACC}} of the clean
        fine-tunes and the base model."""
        if seed not in self._finetuned:
            ctx = RunContext(self.shared, seed)
            tasks = self.preset.task_names

            def compute():
                accs: dict[str, Any] = {t: ctx.accuracy(ctx.clean_finetune(t), t) for t in tasks}
                accs["base"] = {t: ctx.accuracy(ctx.pretrained(), t) for t in tasks}
                accs["dev"] = {t: ctx.accuracy(ctx.clean_finetune(t), t, "dev") for t in tasks}
                return {}, accs
            _, info = self.shared.stage(f"eval fine-tuned (seed {seed})", self.shared.keys.eval_finetuned(seed),
                                        "eval", compute)
            self._finetuned[seed] = info
        return self._finetuned[seed]

    def attack(self, name: str, seed: int, force: bool = False) -> AttackResult:
        stage = self.graph.find("attack", attack=name, seed=seed)
        reg = self.registry.get("attack", name)
        params = self.graph.params[("attack", name)]
        ctx = RunContext(self.shared, seed).bind((reg.name, reg.distribution, reg.key_version))

        def compute():
            result = reg.obj.run(ctx, dict(params))
            if not isinstance(result, AttackResult):
                raise PluginError(f"attack {name!r} returned {type(result).__name__}, not AttackResult")
            tensors = {f"task_vector.{k}": v for k, v in result.task_vector.items()}
            tensors.update(result.trigger.to_tensors())
            tensors.update({f"extra.{k}": v for k, v in result.tensors.items()})
            # the attacker's further uploads, by position (a task name may hold any character)
            for i, vector in enumerate(result.contributions.values()):
                tensors.update({f"contribution.{i}.{k}": v for k, v in vector.items()})
            info = {"task": result.task, "target_task": result.target_task, "target_class": result.target_class,
                    "info": result.info, "standalone": self.standalone(ctx, result), "params": params,
                    "contributions": list(result.contributions)}
            return tensors, info
        tensors, info = self.shared.stage(stage.label, stage.key, "attack", compute, force=force)

        def part(prefix: str) -> StateDict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return AttackResult(
            task=info["task"], target_task=info["target_task"], target_class=info["target_class"],
            task_vector=part("task_vector."), trigger=Trigger.from_tensors(tensors),
            info={**info["info"], "standalone": info["standalone"]}, tensors=part("extra."),
            contributions={t: part(f"contribution.{i}.") for i, t in enumerate(info.get("contributions", []))})

    def standalone(self, ctx: RunContext, result: AttackResult) -> dict[str, Any]:
        """The attacked model alone (θ_pre + τ_adv) and its clean twin, before any merge: ACC on
        the attack's task and ASR on its target task (one shared pass when they are the same
        task) on the test split, and the backdoored model's dev ACC/ASR (the attacker's view)."""
        pre = ctx.pretrained()
        backdoored = {k: pre[k] + v for k, v in result.task_vector.items()}
        clean = ctx.clean_finetune(result.task)
        shared = ctx.shared

        def acc_asr(weights: StateDict, split: str) -> tuple[list[int], list[int]]:
            if result.target_task == result.task:
                both = shared.evaluate(weights, result.task, split, result.trigger, result.target_class)
                return both["acc_counts"], both["asr_counts"]
            return (list(shared.accuracy_counts(weights, result.task, split)),
                    list(shared.asr_counts(weights, result.target_task, result.trigger, result.target_class, split)))
        acc, asr = acc_asr(backdoored, "test")
        clean_acc, clean_asr = acc_asr(clean, "test")
        dev_acc, dev_asr = acc_asr(backdoored, "dev")
        out: dict[str, Any] = {
            "acc": rate(*acc), "asr": rate(*asr), "clean_acc": rate(*clean_acc), "clean_asr": rate(*clean_asr),
            "acc_counts": acc, "asr_counts": asr, "clean_acc_counts": clean_acc,
            "clean_asr_counts": clean_asr, "dev_acc": rate(*dev_acc), "dev_asr": rate(*dev_asr)}
        if result.contributions:
            out["contributions"] = {t: self.upload_alone(ctx, result, t, v) for t, v in result.contributions.items()}
        return out

    def upload_alone(self, ctx: RunContext, result: AttackResult, task: str, vector: StateDict) -> dict[str, Any]:
        """One further upload alone (θ_pre + τ) and its task's clean twin, on that task's test split:
        ACC, and ASR with the attack's trigger and target class (None where the task has no such
        class). The same trigger and target on every upload is what MergeBackdoor does."""
        pre = ctx.pretrained()
        weights = {k: pre[k] + v for k, v in vector.items()}
        shared = ctx.shared
        if result.target_class >= int(ctx.head(task).shape[0]):
            acc = list(shared.accuracy_counts(weights, task, "test"))
            clean = list(shared.accuracy_counts(ctx.clean_finetune(task), task, "test"))
            return {"acc": rate(*acc), "acc_counts": acc, "clean_acc": rate(*clean), "asr": None, "asr_counts": None,
                    "clean_asr": None}
        both = shared.evaluate(weights, task, "test", result.trigger, result.target_class)
        twin = shared.evaluate(ctx.clean_finetune(task), task, "test", result.trigger, result.target_class)
        return {"acc": rate(*both["acc_counts"]), "acc_counts": both["acc_counts"], "asr": rate(*both["asr_counts"]),
                "asr_counts": both["asr_counts"], "clean_acc": rate(*twin["acc_counts"]),
                "clean_asr": rate(*twin["asr_counts"])}

    def cell_vectors(self, attack: str, seed: int, n_tasks: int | None = None) -> dict[str, StateDict]:
        """The merged tasks' clean task vectors (:meth:`merged_tasks`), the attack's replacing its tasks'."""
        ctx = RunContext(self.shared, seed)
        result = self.attack(attack, seed) if attack != NO_ATTACK else None
        vectors = {t: ctx.task_vector(t) for t in self.merged_tasks(n_tasks, result)}
        if result is not None:
            self.replace(vectors, result)
        return vectors

    def merged_tasks(self, n_tasks: int | None, attack: AttackResult | None) -> list[str]:
        """The tasks a cell merges, in preset order: all of them, or with ``merge.tasks=n_tasks``
        the attack's uploads (the preset's adversary task, else its first, where there is no
        attack: a clean merge has the tasks an attacked one has) and then the other tasks in preset order,
        ``n_tasks`` in all. An attack uploading to more tasks than that is an error of the cell."""
        tasks = list(self.preset.task_names)
        if n_tasks is None:
            return tasks
        adversary = self.preset.adversary_task if self.preset.adversary_task in tasks else tasks[0]
        first = list(attack.uploads()) if attack is not None else [adversary]
        if len(first) > n_tasks:
            raise ValueError(f"merge.tasks={n_tasks} is fewer than the {len(first)} tasks the attack uploads "
                             f"to ({', '.join(first)})")
        others = [t for t in tasks if t not in first]
        chosen = set(first) | set(others[:n_tasks - len(first)])
        return [t for t in tasks if t in chosen]

    def replace(self, vectors: dict[str, StateDict], attack: AttackResult) -> None:
        """Put every upload of ``attack`` in place of its task's clean vector."""
        for task, vector in attack.uploads().items():
            if task not in vectors:
                raise PluginError(f"attack task {task!r} is not a task of preset {self.preset.name!r}")
            vectors[task] = vector

    def merge(self, stage: Stage, pretrained: StateDict, vectors: dict[str, StateDict],
              force: bool = False, compute: Callable[[], Merged] | None = None) -> Merged:
        """The merge stage ``stage``: the merger on the cell's own inputs, stored under its key."""
        reg = self.registry.get("merger", stage.merger)
        params = dict(self.graph.params[("merger", stage.merger)])
        ctx = RunContext(self.shared, stage.seed).bind((reg.name, reg.distribution, reg.key_version))
        if compute is None:
            def compute() -> Merged:
                return reg.obj.merge(pretrained, vectors, ctx, params)

        def run() -> tuple[StateDict, dict[str, Any]]:
            merged = compute()
            if not isinstance(merged, Merged):
                raise PluginError(f"merger {stage.merger!r} returned {type(merged).__name__}, not Merged")
            faults.point("merge")
            return merged.weights, merged.info
        weights, info = self.shared.stage(stage.label, stage.key, "merge", run, force=force, memo=False)
        return Merged(weights, info)

    # a cell ------------------------------------------------------------------------------
    def cell(self, stage: Stage, force: bool = False) -> dict[str, Any]:
        cell: Cell = stage.cell
        graph = self.graph
        existing = self.store.load_result(self.preset.name, cell.id)
        if not force and existing and existing.get("key") == stage.key and existing.get("status") == "ok":
            self.shared.log.add(f"cell {cell.label}", None)
            return existing
        params = stage.params
        result: dict[str, Any] = {
            "cell": cell.id, "preset": cell.preset, "attack": cell.attack, "merger": cell.merger,
            "defense": cell.defense, "seed": cell.seed, "setting": params.get("setting", {}), "key": stage.key,
            "plugins": {k: dict(graph.plugins[(k, n)]) for k, n in
                        (("attack", cell.attack), ("merger", cell.merger), ("defense", cell.defense))},
            "params": {"merger": params["merger"], "defense": params["defense"]},
            "durations": {}, "metrics": {}, "info": {},
            "mmbench": __version__, "device": str(self.device), "environment": environment(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        start = time.perf_counter()
        try:
            result["data"] = self.shared.data_sources()
            ctx = RunContext(self.shared, cell.seed)
            pre = ctx.pretrained()
            attack: AttackResult | None = None
            if cell.attack != NO_ATTACK:
                t0 = time.perf_counter()
                result["params"]["attack"] = params["attack"]
                attack = self.attack(cell.attack, cell.seed)
                result["durations"]["attack"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tasks = self.merged_tasks(stage.tasks, attack)
            vectors = {t: ctx.task_vector(t) for t in tasks}
            result["durations"]["finetunes"] = time.perf_counter() - t0
            result["info"]["merged_tasks"] = tasks
            if attack is not None:
                self.replace(vectors, attack)
                result["info"]["attack"] = {"task": attack.task, "target_task": attack.target_task,
                                            "target_class": attack.target_class, **attack.info}
                if attack.contributions:
                    result["info"]["attack"]["contributions"] = list(attack.contributions)
            mreg = self.registry.get("merger", cell.merger)
            dreg = self.registry.get("defense", cell.defense)
            merge_stage = graph.find("merge", attack=cell.attack, merger=cell.merger, seed=cell.seed) \
                if getattr(dreg.obj, "merges_own_inputs", False) else None
            merge_infos: list[dict[str, Any]] = []
            merger = BoundMerger(mreg.obj, dict(params["merger"]),
                                 ctx.bind((mreg.name, mreg.distribution, mreg.key_version)),
                                 stage=self._merge_hook(merge_stage, pre, vectors, merge_infos))
            dctx = ctx.bind((dreg.name, dreg.distribution, dreg.key_version))
            t0 = time.perf_counter()
            merged = dreg.obj.defend(pre, vectors, merger, dctx, dict(params["defense"]))
            if not isinstance(merged, Merged):
                raise PluginError(f"defense {cell.defense!r} returned {type(merged).__name__}, not Merged")
            result["durations"]["merge"] = time.perf_counter() - t0
            # what the merger learned (its last call) and what the defense reports, side by side
            result["info"]["merge"] = merge_infos[-1] if merge_infos else {}
            result["info"]["defense"] = merged.info if merged.info is not (merge_infos[-1] if merge_infos else None) \
                else {}
            t0 = time.perf_counter()
            result["metrics"] = self.metrics(ctx, merged.weights, attack, cell.seed, tasks)
            result["durations"]["evaluate"] = time.perf_counter() - t0
            result["status"] = "ok"
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:
            result["status"] = "failed"
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=-4)
        result["durations"]["total"] = time.perf_counter() - start
        self.shared.log.add(f"cell {cell.label}", result["durations"]["total"])
        faults.point("cell")
        self.store.save_result(self.preset.name, cell.id, result)
        result["_computed"] = True
        return result

    def _merge_hook(self, stage: Stage | None, pre: StateDict, vectors: dict[str, StateDict],
                    infos: list[dict[str, Any]]) -> Callable:
        """A defense's merger call: served from the cell's merge stage when it asks for exactly
        that merge (its parameters, and θ_pre and vectors equal by content to the cell's);
        any other merge runs uncached. Every merge's info is kept for the result."""
        own_params = dict(self.graph.params[("merger", stage.merger)]) if stage else None

        def same(a: StateDict, b: StateDict) -> bool:
            return a.keys() == b.keys() and all(a[k] is b[k] or torch.equal(a[k], b[k]) for k in a)

        def hook(pretrained: StateDict, given: dict[str, StateDict], params: dict[str, Any],
                 compute: Callable[[], Merged]) -> Merged:
            if (stage is not None and params == own_params and given.keys() == vectors.keys()
                    and same(pretrained, pre) and all(same(given[t], vectors[t]) for t in vectors)):
                merged = self.merge(stage, pre, vectors, compute=compute)
            else:
                merged = compute()
                if not isinstance(merged, Merged):
                    raise PluginError(f"merger returned {type(merged).__name__}, not Merged")
            infos.append(merged.info)
            return merged
        return hook

    def metrics(self, ctx: RunContext, weights: StateDict, attack: AttackResult | None, seed: int,
                tasks: list[str] | None = None) -> dict[str, Any]:
        """ACC (mean over the merged ``tasks``, every task of the preset by default) and ASR of
        merged weights, with the standalone figures of the attack."""
        missing = [k for k in ctx.pretrained() if k not in weights]
        if missing:
            raise PluginError(f"merged weights lack {len(missing)} tensors, e.g. {missing[0]!r}")
        finetuned = self.finetuned_accuracy(seed)
        shared = ctx.shared
        tasks = list(tasks) if tasks is not None else self.preset.task_names
        evals: dict[str, dict[str, Any]] = {}  # test split; the attacked task's ACC and ASR share one pass
        # the attacker's further uploads' tasks carry the trigger too (MergeBackdoor's merge has it on both)
        triggered = set() if attack is None else {attack.target_task} | {
            t for t in attack.contributions if attack.target_class < int(ctx.head(t).shape[0])}
        for t in tasks:
            if t in triggered:
                evals[t] = shared.evaluate(weights, t, "test", attack.trigger, attack.target_class)
            else:
                evals[t] = shared.evaluate(weights, t, "test")
        acc = {t: evals[t]["acc"] for t in tasks}
        norm = {t: acc[t] / finetuned[t] if finetuned[t] else 0.0 for t in acc}
        base = finetuned["base"]
        # clean dev split: what a merger's user may tune hyperparameters on (never test)
        dev = {t: shared.accuracy(weights, t, "dev") for t in tasks}
        finetuned_dev = finetuned["dev"]
        dev_norm = {t: dev[t] / finetuned_dev[t] if finetuned_dev[t] else 0.0 for t in dev}
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
        out: dict[str, Any] = {
            "acc": mean(acc), "acc_per_task": acc,
            "normalized_acc": mean(norm), "normalized_acc_per_task": norm,
            "finetuned_acc_per_task": {t: finetuned[t] for t in acc},
            "base_acc_per_task": base, "base_acc": mean(base),
            # what merging added over the pretrained model: near 0 for a merger that does nothing
            "acc_gain_over_base": mean(acc) - mean(base),
            "acc_counts_per_task": {t: evals[t]["acc_counts"] for t in tasks},
            "acc_ci_per_task": {t: evals[t]["acc_ci"] for t in tasks},
            "dev_acc": mean(dev), "dev_acc_per_task": dev,
            "dev_normalized_acc": mean(dev_norm), "dev_normalized_acc_per_task": dev_norm,
            "finetuned_dev_acc_per_task": dict(finetuned_dev),
        }
        if attack is not None:
            target = evals.get(attack.target_task)
            if target is None:  # a target task outside the preset's merged tasks
                target = shared.evaluate(weights, attack.target_task, "test", attack.trigger, attack.target_class)
            out["asr"] = target["asr"]
            out["asr_counts"] = target["asr_counts"]
            out["asr_ci"] = target["asr_ci"]
            out["attacked_task_acc"] = acc[attack.task]
            alone = attack.info.get("standalone", {})
            out["standalone_acc"] = alone.get("acc")
            out["standalone_asr"] = alone.get("asr")
            out["standalone_clean_acc"] = alone.get("clean_acc")
            out["standalone_clean_asr"] = alone.get("clean_asr")
            out["standalone_asr_counts"] = alone.get("asr_counts")
            k, n = alone["asr_counts"]
            out["standalone_asr_ci"] = list(wilson(k, n)) if n else [None, None]
            out["standalone_clean_asr_counts"] = alone.get("clean_asr_counts")
            out["standalone_dev_acc"] = alone.get("dev_acc")
            out["standalone_dev_asr"] = alone.get("dev_asr")
            if attack.contributions:  # each further upload: alone, and its task in the merge
                out["contributions"] = {
                    t: {"asr": evals[t]["asr"] if t in triggered else None, "acc": acc[t],
                        "standalone": alone.get("contributions", {}).get(t)} for t in attack.contributions}
        return out


# --- the entry point executors call ---------------------------------------------------------
_workers: dict[int, Worker] = {}


def run_stage(graph: Graph, runtime: Runtime, key: str, force: bool = False) -> Outcome:
    """Run stage ``key`` of ``graph`` in this process (a worker kept per graph and runtime)."""
    import socket

    memo = (graph.digest, runtime)
    worker = _workers.get(memo)
    if worker is None:
        _workers.clear()  # one graph at a time per process: free the last one's artifacts
        worker = _workers[memo] = Worker(graph, runtime)
    out = worker.run(key, force)
    out.node = socket.gethostname()
    return out
