"""Plan a run: (preset, selection, seeds, parameters) → an immutable graph of stages.

Planning computes every key up front and imports no torch; executing the graph is a
separate step (:mod:`mmbench.execute`, run by an executor plugin). ``mmbench plan``,
``mmbench leaderboard``'s staleness check and the executors all read this one graph.

Stages, with the stages each one needs (its scheduling inputs)::

    data[task]                      –
    base                            data[*] (tiny presets pretrain on the data)
    heads                           base (+ data[*] for zero-shot heads and a base file's)
    finetune[task, seed]            base, heads, data[task]
    eval-finetuned[seed]            finetune[*, seed]
    attack[name, seed]              finetune[*, seed]
    merge[attack, merger, seed]     finetune[*, seed], attack[name, seed]
    cell[attack, merger, defense, seed]
                                    eval-finetuned[seed], finetune[*, seed], attack, merge
    detect[attack, detector, seed]  finetune[*, seed], attack          (the detection track,
    screen[attack, detector, merger, seed]                              mmbench.detect)
                                    detect, eval-finetuned[seed], finetune[*, seed], attack

A ``merge`` stage exists only where a selected cell's defense declares
``merges_own_inputs`` (none, IBVS): every such cell of one attack, merger and seed shares
it. Stages a plugin caches for itself (``Context.cached``: SBV's single backdoor vectors,
IBVS's injected model, DAM's nothing) are computed inside the stage that first asks for
them, under the store's lock, and are found by key by every later one.

Keys (:func:`mmbench.keys.stage_key`) cover a stage's parameters, its inputs' keys and the
code that runs it (:func:`mmbench.keys.core` for harness stages, the plugin's distribution,
version and source fingerprint for plugin stages). A local checkpoint or dataset enters a
key by its content (:func:`mmbench.keys.file_digest`), not its path. The number of CPU
threads is not in any key: every stage runs single-threaded on a CPU (docs/architecture.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

from .keys import DATA_FORMAT, SPLIT_SEED, canonical_json, core, core_code, file_digest, stage_key
from .plugins import Registered, UsageError, unknown_name
from .presets import Preset, Recipe

NO_ATTACK = "none"
# The harness's own settings, addressed like a plugin's (``--set merge.tasks=3``, ``--sweep
# merge.tasks=2,3,4``): ``tasks`` is how many task vectors a cell merges (see merge_tasks).
HARNESS = "merge"
HARNESS_PARAMS = ("tasks",)
KINDS = ("data", "base", "heads", "finetune", "eval-finetuned", "attack", "merge", "cell", "detect", "screen")
PLUGIN_KINDS = ("attack", "merger", "defense", "detector")  # the kinds --set and plugin_params address


# --- cells -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    preset: str
    attack: str
    merger: str
    defense: str
    seed: int
    setting: str = ""   # "" for the preset's own parameters, else a tag of what --set changed

    @property
    def id(self) -> str:
        middle = f"__{self.setting}" if self.setting else ""
        return f"{self.attack}__{self.merger}__{self.defense}{middle}__seed{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.attack}/{self.merger}/{self.defense} seed {self.seed}" + (
            f" [{self.setting}]" if self.setting else "")


def setting_tag(changed: Mapping[str, Mapping[str, Any]]) -> str:
    """A readable, file-name-safe tag of the parameters a cell runs with beyond its preset's,
    plus 8 hex digits of their canonical JSON: ``set-ta.lambda=0.5-1f2e3d4c``."""
    if not changed:
        return ""
    readable = ",".join(f"{p}.{k}={json.dumps(v, separators=(',', ':'))}"
                        for p in sorted(changed) for k, v in sorted(changed[p].items()))
    readable = re.sub(r"[^A-Za-z0-9._=,+-]", "", readable)[:48]
    digest = hashlib.sha256(canonical_json(changed).encode()).hexdigest()[:8]
    return f"set-{readable}-{digest}"


def parse_overrides(items: list[str], registry) -> dict[str, dict[str, Any]]:
    """``--set ties.k=0.1`` items → {"ties": {"k": 0.1}} (values parsed as JSON, else strings)."""
    out: dict[str, dict[str, Any]] = {}
    known = {name for kind in PLUGIN_KINDS for name in registry.names(kind)} | {HARNESS}
    for item in items:
        target, eq, value = item.partition("=")
        name, dot, param = target.partition(".")
        if not eq or not dot or not param:
            raise UsageError(f"--set wants PLUGIN.PARAM=VALUE, got {item!r}")
        if name not in known:
            raise unknown_name("plugin in --set", name, sorted(known))
        if name == HARNESS and param not in HARNESS_PARAMS:
            raise UsageError(f"--set {item!r}: the harness's own settings are "
                             f"{', '.join(f'{HARNESS}.{p}' for p in HARNESS_PARAMS)}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(name, {})[param] = parsed
    return out


def resolve_params(reg: Registered, preset: Preset, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The plugin's declared defaults, updated by the preset's ``plugin_params`` and then
    ``--set``; each given value is checked against the plugin's declaration (an unknown key
    or a bad value is a UsageError). A preset's entries for plugins that are not installed
    are never looked at: a preset may configure optional plugins."""
    from .params import check, declared

    params = declared(reg.obj)
    from_preset = check(reg.kind, reg.name, params, preset.plugin_params.get(reg.name, {}), f"preset {preset.name}")
    from_set = check(reg.kind, reg.name, params, overrides.get(reg.name, {}), "--set")
    return {**{k: p.default for k, p in params.items()}, **from_preset, **from_set}


def merge_tasks(preset: Preset, overrides: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The number of merged tasks ``--set merge.tasks=K`` asks for, or None for the preset's
    default: every task (K equal to the preset's number of tasks is that default, so its cells
    are the preset's own). A cell with K merges the attack's uploads (the preset's adversary
    task where there is no attack) and then the other tasks in preset order, K task vectors
    in all (:meth:`mmbench.execute.Worker.merged_tasks`); the fine-tunes, attacks and the base
    model are the preset's own, shared with every other cell."""
    value = (overrides.get(HARNESS) or {}).get("tasks")
    if value is None:
        return None
    n = len(preset.task_names)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
        raise UsageError(f"{HARNESS}.tasks must be a whole number from 1 to {n} (preset {preset.name}'s "
                         f"tasks), got {value!r}")
    return None if value == n else value


# --- keys of the harness's stages ----------------------------------------------------------
_digests: dict[tuple, str] = {}


def _local_digest(path: str) -> str | None:
    """The content digest of a local file or folder (memoised on path, size and mtime), or None
    when ``path`` is not on this filesystem (a hub id, an open_clip tag)."""
    if not isinstance(path, str) or not os.path.exists(path):
        return None
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _digests:
        try:
            _digests[memo] = file_digest(path)
        except OSError as exc:
            raise UsageError(f"cannot read {path} to key it by its content: {exc.strerror or exc}") from None
    return _digests[memo]


class StageKeys:
    """The keys of the harness's own stages for one preset (pure: no store, no torch)."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self.preset_hash = hashlib.sha256(canonical_json(self._preset_key()).encode()).hexdigest()

    def _preset_key(self) -> dict[str, Any]:
        key = self.preset.key()
        key["model"] = self._model_spec()
        key["tasks"] = [self._task_spec(t["name"], t) for t in key["tasks"]]
        return key

    def _model_spec(self) -> dict[str, Any]:
        spec = self.preset.model.key()
        digest = _local_digest(spec.get("pretrained"))
        if digest:  # a local checkpoint: its content, not where it lies
            spec["pretrained"] = {"sha256": digest}
        return spec

    def _task_spec(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = dict(spec if spec is not None else asdict(self.preset.task(name)))
        args = dict(spec.get("source_args") or {})
        for field_name in ("path", "data_dir", "data_files"):
            digest = _local_digest(args.get(field_name))
            if digest:
                args[field_name] = {"sha256": digest}
        spec["source_args"] = args
        return spec

    def recipe(self, task: str) -> Recipe:
        """The preset's recipe with the task's own epochs (``TaskSpec.epochs``) when set."""
        epochs = self.preset.task(task).epochs
        return self.preset.recipe if epochs is None else replace(self.preset.recipe, epochs=epochs)

    def data(self, task: str) -> str:
        spec = self._task_spec(task)
        spec.pop("epochs", None)  # a training setting, not a property of the data
        return stage_key("data", {"task": spec, "split_seed": SPLIT_SEED, "format": DATA_FORMAT},
                         plugin=core("data"))

    def base(self) -> str:
        p = self.preset
        inputs = [self.data(t) for t in p.task_names] if p.model.pretrain_steps else []
        return stage_key("base", {"model": self._model_spec(), "image_size": p.image_size,
                                  "mean": p.mean, "std": p.std}, inputs, plugin=core("base"))

    def heads(self) -> str:
        p = self.preset
        params: dict[str, Any] = {"kind": p.heads, "tasks": p.task_names}
        inputs = [self.base()]
        if p.heads == "zeroshot":  # the prompts and the data's class names make the head
            from .zeroshot import templates_for
            params["templates"] = {t.name: list(templates_for(t)) for t in p.tasks}
            inputs += [self.data(t) for t in p.task_names]
        elif p.heads == "base":  # read from the base file, checked against the data's class names
            inputs += [self.data(t) for t in p.task_names]
        return stage_key("heads", params, inputs, plugin=core("heads"))

    def finetune(self, task: str, seed: int) -> str:
        return stage_key("finetune", {"task": task, "seed": seed, "recipe": asdict(self.recipe(task))},
                         [self.base(), self.heads(), self.data(task)], plugin=core("finetune"))

    def eval_finetuned(self, seed: int) -> str:
        return stage_key("eval-finetuned", {"seed": seed, "splits": ["test", "dev"]},
                         [self.finetune(t, seed) for t in self.preset.task_names], plugin=core("eval-finetuned"))

    def plugin_stage(self, kind: str, params: Any, seed: int, plugin: tuple[str, str] | None) -> str:
        """The key of a stage a plugin caches through ``Context.cached``."""
        code = (*plugin, core_code("plugin")) if plugin else core("plugin")
        return stage_key(f"plugin:{kind}", {"params": params, "seed": seed},
                         [self.preset_hash, self.base()], plugin=code)


# --- the graph ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    key: str
    kind: str
    label: str
    inputs: tuple[str, ...] = ()      # the stages that must be done first
    seed: int | None = None
    task: str | None = None
    attack: str | None = None
    merger: str | None = None
    defense: str | None = None
    cell: Cell | None = None
    params_json: str = "{}"          # the stage's resolved plugin parameters
    tasks: int | None = None         # merge and cell stages: how many tasks they merge (None: all)
    gpu: bool = False                # does heavy tensor work (a GPU is requested where there is one)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)


@dataclass(frozen=True)
class Graph:
    """Every stage a selection of cells needs, keyed, in an order where inputs come first.
    Frozen, and its mappings are never changed after :func:`plan` (plain dicts, so that a
    graph pickles to worker processes and Ray tasks)."""

    preset: Preset
    stages: Mapping[str, Stage]
    cells: tuple[Cell, ...]
    cell_keys: Mapping[Cell, str]
    params: Mapping[tuple[str, str], Mapping[str, Any]]   # (kind, name) → resolved parameters
    plugins: Mapping[tuple[str, str], Mapping[str, str]]  # (kind, name) → name, distribution, version, code
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    digest: str = ""   # sha256 of every stage key: the graph's identity across processes
    detection: tuple[str, ...] = ()   # keys of the detection track's stages (detect, screen), in order

    def __len__(self) -> int:
        return len(self.stages)

    def stage(self, key: str) -> Stage:
        return self.stages[key]

    def cell_stage(self, cell: Cell) -> Stage:
        return self.stages[self.cell_keys[cell]]

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.kind == kind]

    def needed(self, keys: Iterable[str]) -> list[Stage]:
        """The stages ``keys`` need (themselves included), inputs first."""
        want: set[str] = set()
        stack = list(keys)
        while stack:
            k = stack.pop()
            if k not in want:
                want.add(k)
                stack.extend(self.stages[k].inputs)
        return [s for k, s in self.stages.items() if k in want]

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {k: [] for k in self.stages}
        for s in self.stages.values():
            for i in s.inputs:
                out[i].append(s.key)
        return out

    def find(self, kind: str, **where: Any) -> Stage | None:
        for s in self.stages.values():
            if s.kind == kind and all(getattr(s, k) == v for k, v in where.items()):
                return s
        return None


def opt_in(reg: Registered, preset: Preset | None = None) -> bool:
    """Whether a plugin is opt-in: installed and runnable by name (``--defense awm``), but not
    part of the default cross product. A preset names its own (``Preset.opt_in``: methods whose
    cells its published leaderboard does not hold yet, or too costly for it); a plugin may
    declare itself opt-in everywhere (``opt_in = True`` on its class)."""
    return bool(getattr(reg.obj, "opt_in", False)) or (preset is not None and reg.name in preset.opt_in)


def default_names(registry, kind: str, preset: Preset | None = None) -> list[str]:
    """The installed plugins of ``kind`` that the default cross product (of ``preset``) runs."""
    return [n for n in registry.names(kind) if not opt_in(registry.get(kind, n), preset)]


def _selected(registry, kind: str, chosen: list[str] | None, extra: tuple[str, ...] = (),
              preset: Preset | None = None) -> list[str]:
    names = list(extra) + registry.names(kind)
    for name in chosen or []:
        if name not in names:
            raise unknown_name(kind, name, names)
    return list(dict.fromkeys(chosen)) if chosen else list(extra) + default_names(registry, kind, preset)


def plan_all(registry, preset: Preset, seeds: list[int] | None = None,
             overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Graph:
    """The cells of every installed attack, merger and defense, opt-in ones included (no
    detection track): the current key of any cell a store may hold."""
    return plan(registry, preset, [NO_ATTACK] + registry.names("attack"), registry.names("merger"),
                registry.names("defense"), seeds, overrides, detectors=[])


def plan(registry, preset: Preset, attacks: list[str] | None = None, mergers: list[str] | None = None,
         defenses: list[str] | None = None, seeds: list[int] | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None,
         detectors: list[str] | None = None) -> Graph:
    """The graph of the cross product of the selection (every installed plugin that is not
    opt-in where a list is None, the preset's seeds), with ``overrides`` (``--set``) applied. Every installed
    plugin's parameters are checked first, selected or not: a bad ``--set`` or preset value
    is a UsageError before anything runs. ``detectors``: the detection track's detectors
    (every installed one when None; ``[]`` for none), each run on every selected attack and
    screened under every selected merger."""
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    n_tasks = merge_tasks(preset, overrides)
    a_names = _selected(registry, "attack", attacks, (NO_ATTACK,), preset)
    m_names = _selected(registry, "merger", mergers, preset=preset)
    d_names = _selected(registry, "defense", defenses, preset=preset)
    k_names = _selected(registry, "detector", detectors, preset=preset) if detectors != [] else []
    if not m_names or not d_names:
        raise UsageError("no merger or no defense plugin is installed (is MMBENCH_PLUGINS too narrow?)")
    seed_list = list(dict.fromkeys(seeds)) if seeds else list(preset.seeds)

    params: dict[tuple[str, str], dict[str, Any]] = {}
    own: dict[tuple[str, str], dict[str, Any]] = {}    # the preset's own parameters (no --set)
    plugins: dict[tuple[str, str], dict[str, str]] = {}
    regs: dict[tuple[str, str], Registered] = {}
    for kind in PLUGIN_KINDS:
        for name in registry.names(kind):
            reg = registry.get(kind, name)
            regs[(kind, name)] = reg
            params[(kind, name)] = resolve_params(reg, preset, overrides)
            own[(kind, name)] = resolve_params(reg, preset, {})
            plugins[(kind, name)] = {"name": reg.name, "distribution": reg.distribution,
                                     "version": reg.version, "code": reg.code}
    from . import __version__
    plugins[("attack", NO_ATTACK)] = {"name": NO_ATTACK, "distribution": "mmbench", "version": __version__,
                                      "code": core_code("cell")}
    params[("attack", NO_ATTACK)] = {}
    own[("attack", NO_ATTACK)] = {}

    keys = StageKeys(preset)
    tasks = preset.task_names
    stages: dict[str, Stage] = {}

    def add(stage: Stage) -> str:
        stages.setdefault(stage.key, stage)
        return stage.key

    def pj(value: Any) -> str:
        return canonical_json(value)

    data = {t: add(Stage(keys.data(t), "data", f"data[{t}]", task=t)) for t in tasks}
    base = add(Stage(keys.base(), "base", "base", tuple(data.values()) if preset.model.pretrain_steps else (),
                     gpu=bool(preset.model.pretrain_steps)))
    heads_inputs = (base, *data.values()) if preset.heads in ("zeroshot", "base") else (base,)
    heads = add(Stage(keys.heads(), "heads", "heads", heads_inputs, gpu=True))
    cells: list[Cell] = []
    cell_keys: dict[Cell, str] = {}
    detection: list[str] = []
    for seed in seed_list:
        fts = tuple(add(Stage(keys.finetune(t, seed), "finetune", f"finetune[{t}, seed {seed}]",
                              (base, heads, data[t]), seed=seed, task=t, gpu=True)) for t in tasks)
        evalft = add(Stage(keys.eval_finetuned(seed), "eval-finetuned", f"eval fine-tuned (seed {seed})",
                           fts, seed=seed, gpu=True))
        for attack in a_names:
            attack_key = None
            if attack != NO_ATTACK:
                reg = regs[("attack", attack)]
                attack_key = add(Stage(
                    stage_key("attack", {"name": attack, "params": params[("attack", attack)], "seed": seed},
                              [keys.preset_hash, keys.base()],
                              plugin=(reg.distribution, reg.key_version, core_code("attack"))),
                    "attack", f"attack {attack} (seed {seed})", fts, seed=seed, attack=attack,
                    params_json=pj(params[("attack", attack)]), gpu=True))
            vector_keys = list(fts) + ([attack_key] if attack_key else [])
            for merger in m_names:
                mreg = regs[("merger", merger)]
                # a subset of the tasks enters the merge and cell keys; all tasks keeps today's keys
                subset = {} if n_tasks is None else {"tasks": n_tasks}
                merge_key = stage_key("merge", {"merger": merger, "params": params[("merger", merger)],
                                                "seed": seed, **subset}, vector_keys,
                                      plugin=(mreg.distribution, mreg.key_version, core_code("merge")))
                merge_label = f"merge {attack}/{merger} (seed {seed})" + (
                    f" [{n_tasks} tasks]" if n_tasks else "")
                for defense in d_names:
                    dreg = regs[("defense", defense)]
                    changed = {n: {k: v for k, v in params[(kind, n)].items() if own[(kind, n)].get(k, object()) != v}
                               for kind, n in (("attack", attack), ("merger", merger), ("defense", defense))}
                    changed = {n: c for n, c in changed.items() if c}
                    if n_tasks is not None:
                        changed[HARNESS] = {"tasks": n_tasks}
                    cell = Cell(preset.name, attack, merger, defense, seed, setting_tag(changed))
                    inputs = [evalft, *fts] + ([attack_key] if attack_key else [])
                    if getattr(dreg.obj, "merges_own_inputs", False):
                        inputs.append(add(Stage(merge_key, "merge", merge_label,
                                                tuple(vector_keys), seed=seed, attack=attack, merger=merger,
                                                params_json=pj(params[("merger", merger)]), tasks=n_tasks,
                                                gpu=True)))
                    key = stage_key("cell", {"merger": [merger, params[("merger", merger)]],
                                             "defense": [defense, params[("defense", defense)]], "seed": seed,
                                             **subset},
                                    vector_keys + [evalft],
                                    plugin=(core_code("cell"), mreg.key_version, dreg.key_version))
                    add(Stage(key, "cell", f"cell {cell.label}", tuple(inputs), seed=seed, attack=attack,
                              merger=merger, defense=defense, cell=cell, tasks=n_tasks,
                              params_json=pj({"merger": params[("merger", merger)],
                                              "defense": params[("defense", defense)],
                                              **({"attack": params[("attack", attack)]} if attack_key else {}),
                                              "setting": changed}), gpu=True))
                    cells.append(cell)
                    cell_keys[cell] = key
        detection += _detection_stages(add, keys, regs, params, own, seed, a_names, m_names, k_names, fts, evalft,
                                       {a: s.key for s in stages.values() if s.kind == "attack" and s.seed == seed
                                        for a in [s.attack]})
    digest = hashlib.sha256("\n".join(stages).encode()).hexdigest()
    return Graph(preset, stages, tuple(cells), cell_keys, params, plugins, overrides, digest, tuple(detection))


def _detection_stages(add, keys: StageKeys, regs, params, own, seed: int, attacks: list[str], mergers: list[str],
                      detectors: list[str], fts: tuple[str, ...], evalft: str,
                      attack_keys: dict[str, str]) -> list[str]:
    """The detection track's stages of one seed (mmbench.detect): a detect stage per attack and
    detector, a screen stage per attack, detector and merger."""
    out: list[str] = []
    for detector in detectors:
        kreg = regs[("detector", detector)]
        kparams = params[("detector", detector)]
        for attack in attacks:
            attack_key = attack_keys.get(attack)
            vector_keys = list(fts) + ([attack_key] if attack_key else [])

            def changed(*pairs: tuple[str, str]) -> dict[str, dict[str, Any]]:
                diff = {n: {k: v for k, v in params[(kind, n)].items() if own[(kind, n)].get(k, object()) != v}
                        for kind, n in pairs}
                return {n: c for n, c in diff.items() if c}
            setting = changed(("attack", attack), ("detector", detector))
            detect_key = add(Stage(
                stage_key("detect", {"detector": detector, "params": kparams, "seed": seed}, vector_keys,
                          plugin=(kreg.distribution, kreg.key_version, core_code("detect"))),
                "detect", f"detect {detector} on {attack} (seed {seed})", tuple(vector_keys), seed=seed,
                attack=attack, params_json=canonical_json({"detector": detector, "detector_params": kparams,
                                                           "setting_tag": setting_tag(setting)}), gpu=True))
            out.append(detect_key)
            for merger in mergers:
                mreg = regs[("merger", merger)]
                mparams = params[("merger", merger)]
                tag = setting_tag(changed(("attack", attack), ("detector", detector), ("merger", merger)))
                out.append(add(Stage(
                    stage_key("screen", {"merger": [merger, mparams], "seed": seed},
                              [detect_key, *vector_keys, evalft],
                              plugin=(core_code("detect"), mreg.key_version)),
                    "screen", f"screen {detector}/{attack}/{merger} (seed {seed})",
                    (detect_key, evalft, *vector_keys), seed=seed, attack=attack, merger=merger,
                    params_json=canonical_json({"detector": detector, "detector_params": kparams,
                                                "merger_params": mparams, "setting_tag": tag}), gpu=True)))
    return out
