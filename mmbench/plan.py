"""The stage graph of a run: cells, their keys, and running them with the rerun policy.

A cell is (preset, attack, merger, defense, seed). Attack ``none`` is the
no-attack baseline (every task vector clean). Shared stages (data, base, heads,
clean fine-tunes, attack artifacts, plugin stages) are computed once and
reused by every cell that needs them.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .api import AttackResult, BoundMerger, Merged, PluginError, StateDict, Trigger
from .context import CORE, RunContext, SharedStages
from .evaluate import rate, wilson
from .plugins import Registered, Registry, UsageError
from .presets import Preset
from .store import Store, canonical_json, stage_key

NO_ATTACK = "none"
RERUN = ("missing", "always", "never")


class WorkerDied(RuntimeError):
    """A worker process of a parallel run ended without reporting (killed, out of memory)."""


@dataclass(frozen=True)
class Cell:
    preset: str
    attack: str
    merger: str
    defense: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.attack}__{self.merger}__{self.defense}__seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.attack}/{self.merger}/{self.defense} seed {self.seed}"


def parse_overrides(items: list[str], registry: Registry) -> dict[str, dict[str, Any]]:
    """``--set ties.k=0.1`` items → {"ties": {"k": 0.1}} (values parsed as JSON, else strings)."""
    import json

    out: dict[str, dict[str, Any]] = {}
    known = {name for kind in ("attack", "merger", "defense") for name in registry.names(kind)}
    for item in items:
        target, eq, value = item.partition("=")
        name, dot, param = target.partition(".")
        if not eq or not dot or not param:
            raise UsageError(f"--set wants PLUGIN.PARAM=VALUE, got {item!r}")
        if name not in known:
            from .plugins import unknown_name
            raise unknown_name("plugin in --set", name, sorted(known))
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(name, {})[param] = parsed
    return out


def resolve_params(reg: Registered, preset: Preset, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The plugin's declared defaults, updated by the preset's ``plugin_params`` and then
    ``--set``; each given value is checked against the plugin's declaration (an unknown key
    or a bad value is a UsageError). A preset's entries for plugins that are not installed
    are never looked at: a preset may configure optional plugins."""
    from .params import check, declared

    params = declared(reg.obj)
    from_preset = check(reg.kind, reg.name, params, preset.plugin_params.get(reg.name, {}),
                        f"preset {preset.name}")
    from_set = check(reg.kind, reg.name, params, overrides.get(reg.name, {}), "--set")
    return {**{k: p.default for k, p in params.items()}, **from_preset, **from_set}


@dataclass
class Runner:
    registry: Registry
    preset: Preset
    store: Store
    device: torch.device
    rerun: str = "missing"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quiet: bool = False
    echo: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.rerun not in RERUN:
            raise UsageError(f"--rerun must be one of {', '.join(RERUN)}, not {self.rerun!r}")
        self.shared = SharedStages(self.preset, self.store, self.device, quiet=self.quiet, echo=self.echo)
        self._attacks: dict[tuple[str, int], tuple[str, AttackResult | Exception]] = {}
        self._finetuned_acc: dict[int, dict[str, float]] = {}
        self._cell_keys: dict[Cell, str] = {}
        self._fresh_merges: set[str] = set()  # merge stages computed by this run

    # the cross product -----------------------------------------------------------
    def cells(self, attacks: list[str] | None = None, mergers: list[str] | None = None,
              defenses: list[str] | None = None, seeds: list[int] | None = None) -> list[Cell]:
        def pick(kind: str, chosen: list[str] | None, extra: tuple[str, ...] = ()) -> list[str]:
            names = list(extra) + self.registry.names(kind)
            for name in chosen or []:
                if name not in names:
                    from .plugins import unknown_name
                    raise unknown_name(kind, name, names)
            return list(dict.fromkeys(chosen)) if chosen else names
        a = pick("attack", attacks, (NO_ATTACK,))
        m = pick("merger", mergers)
        d = pick("defense", defenses)
        s = seeds or list(self.preset.seeds)
        for kind in ("attack", "merger", "defense"):  # every installed one, selected or not:
            for name in self.registry.names(kind):   # a bad --set or preset value is a user
                self.params(kind, name)              # error before anything runs
        if not m or not d:
            raise UsageError("no merger or no defense plugin is installed (is MMBENCH_PLUGINS too narrow?)")
        return [Cell(self.preset.name, *combo) for combo in
                ((x, y, z, w) for w in s for x in a for y in m for z in d)]

    def params(self, kind: str, name: str) -> dict[str, Any]:
        return resolve_params(self.registry.get(kind, name), self.preset, self.overrides)

    def plugin_version(self, kind: str, name: str) -> dict[str, str]:
        if kind == "attack" and name == NO_ATTACK:
            return {"name": NO_ATTACK, "distribution": CORE[0], "version": CORE[1]}
        reg = self.registry.get(kind, name)
        return {"name": reg.name, "distribution": reg.distribution, "version": reg.version, "code": reg.code}

    # keys ------------------------------------------------------------------------
    def attack_key(self, name: str, seed: int) -> str:
        reg = self.registry.get("attack", name)
        return stage_key("attack", {"name": name, "params": self.params("attack", name), "seed": seed},
                         [self.shared.preset_hash, self.shared.base_key()], plugin=(reg.distribution, reg.key_version))

    def cell_key(self, cell: Cell) -> str:
        if cell not in self._cell_keys:  # asked twice per cell by run(); parameters are fixed per run
            self._cell_keys[cell] = self._compute_cell_key(cell)
        return self._cell_keys[cell]

    def vector_keys(self, cell: Cell) -> list[str]:
        """The keys of what a cell merges: every clean fine-tune, and the attack artifact."""
        inputs = [self.shared.finetune_key(t, cell.seed) for t in self.preset.task_names]
        if cell.attack != NO_ATTACK:
            inputs.append(self.attack_key(cell.attack, cell.seed))
        return inputs

    def _compute_cell_key(self, cell: Cell) -> str:
        inputs = self.vector_keys(cell)
        params = {"merger": [cell.merger, self.params("merger", cell.merger)],
                  "defense": [cell.defense, self.params("defense", cell.defense)], "seed": cell.seed}
        versions = [self.registry.get(k, n).key_version for k, n in
                    (("merger", cell.merger), ("defense", cell.defense))]
        return stage_key("cell", params, inputs, plugin=(CORE[1], *versions))

    # stages ----------------------------------------------------------------------
    def attack(self, name: str, seed: int, force: bool = False) -> tuple[str, AttackResult]:
        memo = (name, seed)
        if memo in self._attacks and not force:
            key, result = self._attacks[memo]
            if isinstance(result, Exception):
                raise result
            return key, result
        reg = self.registry.get("attack", name)
        key = self.attack_key(name, seed)
        params = self.params("attack", name)
        ctx = RunContext(self.shared, seed).bind((reg.name, reg.distribution, reg.key_version))

        def compute():
            result = reg.obj.run(ctx, params)
            if not isinstance(result, AttackResult):
                raise PluginError(f"attack {name!r} returned {type(result).__name__}, not AttackResult")
            tensors = {f"task_vector.{k}": v for k, v in result.task_vector.items()}
            tensors.update(result.trigger.to_tensors())
            tensors.update({f"extra.{k}": v for k, v in result.tensors.items()})
            standalone = self.standalone(ctx, result)
            info = {"task": result.task, "target_task": result.target_task,
                    "target_class": result.target_class, "info": result.info,
                    "standalone": standalone, "params": params}
            return tensors, info
        try:
            tensors, info = self.shared.stage(f"attack {name} (seed {seed})", key, "attack", compute, force=force)
            result = AttackResult(
                task=info["task"], target_task=info["target_task"], target_class=info["target_class"],
                task_vector={k[len("task_vector."):]: v for k, v in tensors.items() if k.startswith("task_vector.")},
                trigger=Trigger.from_tensors(tensors),
                info={**info["info"], "standalone": info["standalone"]},
                tensors={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
        except Exception as exc:  # every cell of this attack fails with the same message
            self._attacks[memo] = (key, exc)
            raise
        self._attacks[memo] = (key, result)
        return key, result

    def standalone(self, ctx: RunContext, result: AttackResult) -> dict[str, Any]:
        """The attacked model alone (θ_pre + τ_adv) and its clean twin, before any merge: ACC on
        the attack's task and ASR on its target task (one shared pass when they are the same task),
        on the test split, and the backdoored model's dev ACC/ASR (the attacker's own view)."""
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
        return {
            "acc": rate(*acc), "asr": rate(*asr), "clean_acc": rate(*clean_acc), "clean_asr": rate(*clean_asr),
            "acc_counts": acc, "asr_counts": asr, "clean_acc_counts": clean_acc, "clean_asr_counts": clean_asr,
            "dev_acc": rate(*dev_acc), "dev_asr": rate(*dev_asr),
        }

    def finetuned_accuracy(self, seed: int) -> dict[str, float]:
        if seed not in self._finetuned_acc:
            ctx = RunContext(self.shared, seed)
            key = stage_key("eval-finetuned", {"seed": seed, "splits": ["test", "dev"]},
                            [self.shared.finetune_key(t, seed) for t in self.preset.task_names], plugin=CORE)

            def compute():  # {task: test ACC, "base": {task: test ACC}, "dev": {task: dev ACC}}
                accs = {t: ctx.accuracy(ctx.clean_finetune(t), t) for t in self.preset.task_names}
                accs["base"] = {t: ctx.accuracy(ctx.pretrained(), t) for t in self.preset.task_names}
                accs["dev"] = {t: ctx.accuracy(ctx.clean_finetune(t), t, "dev") for t in self.preset.task_names}
                return {}, accs
            _, info = self.shared.stage(f"eval fine-tuned (seed {seed})", key, "eval", compute)
            self._finetuned_acc[seed] = info
        return self._finetuned_acc[seed]

    # a cell ------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        key = self.cell_key(cell)
        existing = self.store.load_result(self.preset.name, cell.id)
        if self.rerun != "always" and existing and existing.get("key") == key and existing.get("status") == "ok":
            self.shared.log.add(f"cell {cell.label}", None)
            return existing
        if self.rerun == "never":
            return {"cell": cell.id, "preset": cell.preset, "attack": cell.attack, "merger": cell.merger,
                    "defense": cell.defense, "seed": cell.seed, "status": "not run", "key": key}
        result: dict[str, Any] = {
            "cell": cell.id, "preset": cell.preset, "attack": cell.attack, "merger": cell.merger,
            "defense": cell.defense, "seed": cell.seed, "key": key,
            "plugins": {k: self.plugin_version(k, n) for k, n in
                        (("attack", cell.attack), ("merger", cell.merger), ("defense", cell.defense))},
            "params": {}, "durations": {}, "metrics": {}, "info": {},
            "mmbench": CORE[1], "device": str(self.device), "environment": environment(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        start = time.perf_counter()
        try:
            result["data"] = self.shared.data_sources()  # dataset ids + revisions of every task
            result["params"] = {"merger": self.params("merger", cell.merger),
                                "defense": self.params("defense", cell.defense)}
            base = RunContext(self.shared, cell.seed)
            pre = base.pretrained()
            t0 = time.perf_counter()
            task_vectors = {t: base.task_vector(t) for t in self.preset.task_names}
            result["durations"]["finetunes"] = time.perf_counter() - t0
            attack: AttackResult | None = None
            if cell.attack != NO_ATTACK:
                t0 = time.perf_counter()
                result["params"]["attack"] = self.params("attack", cell.attack)
                _, attack = self.attack(cell.attack, cell.seed, force=self.rerun == "always")
                result["durations"]["attack"] = time.perf_counter() - t0
                if attack.task not in task_vectors:
                    raise PluginError(f"attack task {attack.task!r} is not a task of preset {self.preset.name!r}")
                task_vectors[attack.task] = attack.task_vector
                result["info"]["attack"] = {"task": attack.task, "target_task": attack.target_task,
                                            "target_class": attack.target_class, **attack.info}
            merger_reg = self.registry.get("merger", cell.merger)
            defense_reg = self.registry.get("defense", cell.defense)
            merger = BoundMerger(merger_reg.obj, result["params"]["merger"],
                                 base.bind((merger_reg.name, merger_reg.distribution, merger_reg.key_version)),
                                 stage=self.merge_stage(cell, pre, task_vectors))
            dctx = base.bind((defense_reg.name, defense_reg.distribution, defense_reg.key_version))
            t0 = time.perf_counter()
            merged = defense_reg.obj.defend(pre, task_vectors, merger, dctx, result["params"]["defense"])
            if not isinstance(merged, Merged):
                raise PluginError(f"defense {cell.defense!r} returned {type(merged).__name__}, not Merged")
            result["durations"]["merge"] = time.perf_counter() - t0
            result["info"]["merge"] = merged.info
            t0 = time.perf_counter()
            result["metrics"] = self.metrics(base, merged.weights, attack, cell.seed)
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
        self.store.save_result(self.preset.name, cell.id, result)
        return result

    def merge_stage(self, cell: Cell, pre: StateDict, task_vectors: dict[str, StateDict]) -> Callable:
        """The cell's merge as a cached stage, shared by every cell with the same attack,
        merger and seed whose defense hands the merger the cell's own inputs unchanged
        (``none``, ``ibvs``). A defense that passes other vectors (``dam``'s masked ones)
        or other weights gets a plain, uncached merge."""
        reg = self.registry.get("merger", cell.merger)
        inputs = self.vector_keys(cell)

        def stage(pretrained: StateDict, vectors: dict[str, StateDict], params: dict[str, Any],
                  compute: Callable[[], Merged]) -> Merged:
            own = pretrained is pre and vectors.keys() == task_vectors.keys() and all(
                vectors[t] is task_vectors[t] for t in task_vectors)
            if not own:
                return compute()

            def run() -> tuple[StateDict, dict[str, Any]]:
                merged = compute()
                if not isinstance(merged, Merged):
                    raise PluginError(f"merger {cell.merger!r} returned {type(merged).__name__}, not Merged")
                return merged.weights, merged.info
            key = stage_key("merge", {"merger": cell.merger, "params": params, "seed": cell.seed}, inputs,
                            plugin=(reg.distribution, reg.key_version))
            force = self.rerun == "always" and key not in self._fresh_merges  # once per run
            weights, info = self.shared.stage(f"merge {cell.attack}/{cell.merger} (seed {cell.seed})", key,
                                              "merge", run, force=force, memo=False)
            self._fresh_merges.add(key)
            return Merged(weights, info)
        return stage

    def metrics(self, ctx: RunContext, weights: StateDict, attack: AttackResult | None, seed: int) -> dict[str, Any]:
        missing = [k for k in ctx.pretrained() if k not in weights]
        if missing:
            raise PluginError(f"merged weights lack {len(missing)} tensors, e.g. {missing[0]!r}")
        finetuned = self.finetuned_accuracy(seed)
        shared = ctx.shared
        tasks = self.preset.task_names
        evals: dict[str, dict[str, Any]] = {}  # test split; the attacked task's ACC and ASR share one pass
        for t in tasks:
            if attack is not None and t == attack.target_task:
                evals[t] = shared.evaluate(weights, t, "test", attack.trigger, attack.target_class)
            else:
                evals[t] = shared.evaluate(weights, t, "test")
        acc = {t: evals[t]["acc"] for t in tasks}
        norm = {t: acc[t] / finetuned[t] if finetuned[t] else 0.0 for t in acc}
        # clean dev split: what a merger's user may tune hyperparameters on (never test)
        dev = {t: shared.accuracy(weights, t, "dev") for t in tasks}
        finetuned_dev = finetuned["dev"]
        dev_norm = {t: dev[t] / finetuned_dev[t] if finetuned_dev[t] else 0.0 for t in dev}
        out: dict[str, Any] = {
            "acc": sum(acc.values()) / len(acc), "acc_per_task": acc,
            "normalized_acc": sum(norm.values()) / len(norm), "normalized_acc_per_task": norm,
            "finetuned_acc_per_task": {t: finetuned[t] for t in acc},
            "base_acc_per_task": finetuned["base"],
            "acc_counts_per_task": {t: evals[t]["acc_counts"] for t in tasks},
            "acc_ci_per_task": {t: evals[t]["acc_ci"] for t in tasks},
            "dev_acc": sum(dev.values()) / len(dev), "dev_acc_per_task": dev,
            "dev_normalized_acc": sum(dev_norm.values()) / len(dev_norm), "dev_normalized_acc_per_task": dev_norm,
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
            standalone = attack.info.get("standalone", {})
            if "dev_asr" not in standalone:  # an attack artifact stored before these figures existed
                standalone = {**standalone, **self.standalone(ctx, attack)}
            out["standalone_acc"] = standalone.get("acc")
            out["standalone_asr"] = standalone.get("asr")
            out["standalone_clean_acc"] = standalone.get("clean_acc")
            out["standalone_clean_asr"] = standalone.get("clean_asr")
            out["standalone_asr_counts"] = standalone.get("asr_counts")
            k, n = standalone["asr_counts"]
            out["standalone_asr_ci"] = list(wilson(k, n)) if n else [None, None]
            out["standalone_clean_asr_counts"] = standalone.get("clean_asr_counts")
            out["standalone_dev_acc"] = standalone.get("dev_acc")
            out["standalone_dev_asr"] = standalone.get("dev_asr")
        return out

    def run(self, cells: list[Cell], on_result: Callable[[dict[str, Any]], None] = lambda r: None,
            jobs: int = 1) -> list[dict[str, Any]]:
        """Run ``cells`` (results in the order they finish when ``jobs`` > 1).

        The shared stages (base, clean fine-tunes, their evaluation) are computed here
        first. With ``jobs`` > 1 the cells still to compute are then grouped by
        (attack, seed) and the groups run in ``jobs`` worker processes: a group's
        cells share its attack, its DAM mask and its merges, so grouping keeps
        shared work in one process, and the store's per-stage lock makes a stage
        that several groups need (IBVS's injection vector, SBV's backdoor vectors)
        computed once while the others wait for it.
        """
        results = []
        pending = [c for c in cells if self.rerun == "always" or not self._cached_ok(c)]
        if pending and self.rerun != "never":  # warm the shared stages in a readable order
            for seed in sorted({c.seed for c in pending}):
                ctx = RunContext(self.shared, seed)
                for task in self.preset.task_names:
                    ctx.clean_finetune(task)
                self.finetuned_accuracy(seed)
        groups: dict[tuple[str, int], list[Cell]] = {}
        for cell in pending:
            groups.setdefault((cell.attack, cell.seed), []).append(cell)
        parallel = jobs > 1 and len(groups) > 1 and self.rerun != "never"
        for cell in cells:
            if parallel and cell in pending:
                continue
            result = self.run_cell(cell)
            on_result(result)
            results.append(result)
        if parallel:
            results += self._run_parallel(list(groups.values()), on_result, jobs)
        return results

    def _run_parallel(self, groups: list[list[Cell]], on_result: Callable[[dict[str, Any]], None],
                      jobs: int) -> list[dict[str, Any]]:
        import multiprocessing
        import queue as queue_mod
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        workers = min(jobs, len(groups))
        spec = {"preset": self.preset, "store": str(self.store.root), "device": str(self.device),
                "rerun": self.rerun, "overrides": self.overrides, "quiet": self.quiet,
                "threads": max(1, torch.get_num_threads() // workers)}
        # spawn, not fork: forking a process whose OpenMP pool has run can hang the child
        context = multiprocessing.get_context("spawn")
        finished = context.Queue()  # each cell's result as soon as a worker has it
        results: list[dict[str, Any]] = []
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(finished,)) as pool:
            futures = [pool.submit(_run_group, spec, group) for group in groups]

            def take(result: dict[str, Any]) -> None:
                on_result(result)
                results.append(result)
            try:
                while not all(f.done() for f in futures):
                    try:
                        take(finished.get(timeout=0.5))
                    except queue_mod.Empty:
                        pass
                    for future in futures:
                        if future.done() and future.exception() is not None:
                            raise future.exception()
                for future in futures:
                    reused, computed, corrupt = future.result()
                    for label in reused:
                        self.shared.log.add(label, None)
                    for label, seconds in computed:
                        self.shared.log.add(label, seconds)
                    self.store.corrupt.extend(corrupt)
                expected = sum(len(g) for g in groups)
                while len(results) < expected:  # results still in the queue's pipe
                    take(finished.get(timeout=30))
            except BaseException as exc:
                # no new groups start; running ones finish their cell group (every store write
                # is atomic, so what they leave is complete) and a rerun picks up the rest
                pool.shutdown(wait=False, cancel_futures=True)
                if isinstance(exc, BrokenProcessPool):
                    raise WorkerDied("a worker process died (out of memory?); the cells it "
                                     "finished are stored: rerun, perhaps with --jobs 1") from None
                raise
        return results

    def _cached_ok(self, cell: Cell) -> bool:
        existing = self.store.load_result(self.preset.name, cell.id)
        return bool(existing and existing.get("status") == "ok" and existing.get("key") == self.cell_key(cell))


def environment() -> dict[str, Any]:
    """What a cell ran on, beyond mmbench's and the plugins' versions: figures can move
    with the torch build and the number of CPU threads (float reduction order)."""
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform(terse=True)}


_finished = None  # a worker's queue for finished cell results (set by _init_worker)


def _init_worker(finished) -> None:
    global _finished
    _finished = finished


def _run_group(spec: dict[str, Any], cells: list[Cell]) -> tuple[list[str], list, list[str]]:
    """A worker process of :meth:`Runner.run`: run one group of cells against the shared
    store, sending each result to the parent as soon as it is stored."""
    import sys

    from .plugins import load

    torch.set_num_threads(spec["threads"])
    tag = f"[{cells[0].attack}]"
    runner = Runner(load(), spec["preset"], Store(spec["store"]), torch.device(spec["device"]),
                    rerun=spec["rerun"], overrides=spec["overrides"], quiet=spec["quiet"],
                    echo=lambda m: print(f"{tag} {m.strip()}", file=sys.stderr, flush=True))
    runner.shared.bars = False  # several processes share one terminal
    for cell in cells:
        _finished.put(runner.run_cell(cell))
    return runner.shared.log.reused, runner.shared.log.computed, runner.store.corrupt
