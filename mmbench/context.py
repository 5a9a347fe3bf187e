"""The Context every plugin call receives, and the shared, cached stages behind it.

Stages (each a content-addressed artifact in the store, see ``store.stage_key``):
``data[task]`` → ``base`` (model + contrastive pretraining for tiny presets) →
``heads`` → ``finetune[task, seed]``; plugins add their own through
:meth:`RunContext.cached`. A stage whose key is in the store is loaded, never
recomputed; :attr:`RunContext.log` records which were reused and which computed.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call

import mmbench

from . import data as data_mod
from . import faults
from . import evaluate as evaluate_mod
from . import models, train
from .api import StateDict, Trigger
from .presets import Preset, Recipe
from .graph import StageKeys
from .keys import canonical_json, stage_key
from .store import Store

CORE = ("mmbench", mmbench.__version__)


def _progress(iterable: Iterable, total: int | None = None, desc: str = "", quiet: bool = False) -> Iterable:
    if quiet or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class StageLog:
    """Which stages a run reused from the store and which it computed (with seconds)."""

    def __init__(self) -> None:
        self.reused: list[str] = []
        self.computed: list[tuple[str, float]] = []

    def add(self, label: str, seconds: float | None) -> None:
        if seconds is None:
            if label not in self.reused:
                self.reused.append(label)
        else:
            self.computed.append((label, seconds))


class SharedStages:
    """Per-(preset, seed) state shared by every cell of a run: loaded artifacts, modules."""

    def __init__(self, preset: Preset, store: Store, device: torch.device, *, quiet: bool = False,
                 echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.preset = preset
        self.store = store
        self.device = device
        self.quiet = quiet
        self.echo = echo
        self.log = StageLog()
        self.bars = True  # progress bars (on a TTY); parallel workers turn them off
        self.keys = StageKeys(preset)  # one definition of every harness key: mmbench.graph
        self.preset_hash = self.keys.preset_hash
        self._memo: dict[str, Any] = {}
        self._encoder_module: torch.nn.Module | None = None
        self._computing: list[tuple[str, str, dict[str, int], list[str]]] = []  # (key, label, ordinals, checkpoints)

    # stage plumbing -----------------------------------------------------------
    def stage(self, label: str, key: str, kind: str, compute: Callable[[], tuple[StateDict, dict]],
              *, force: bool = False, memo: bool = True) -> tuple[StateDict, dict]:
        """Load ``key`` from memory or the store, else compute, save and return it.

        ``memo=False`` keeps the artifact out of this run's memory (merges: each serves
        a few cells, and at paper scale they are as large as a model)."""
        if not force and key in self._memo:
            return self._memo[key]
        loaded = None if force else self.store.load(key)
        seconds = None
        if loaded is None:
            with self.store.lock(key):  # parallel workers: one computes, the others wait and load
                if not force:  # another worker may have made it while this one waited
                    loaded = self.store.load(key)
                if loaded is None:
                    if not self.quiet:
                        self.echo(f"  computing {label} ...")
                    start = time.perf_counter()
                    self._computing.append((key, label, {}, []))
                    try:
                        with stage_rng(key):
                            loaded = compute()
                    finally:
                        _, _, _, checkpoints = self._computing.pop()
                    seconds = time.perf_counter() - start
                    self.store.save(key, kind, *loaded, seconds=seconds)
                    for ck in checkpoints:  # the stage is whole: its checkpoints are not needed
                        self.store.discard(ck)
                    # go on with exactly what another process would load (contiguous CPU copies):
                    # a computed tensor's memory layout can change later float results
                    loaded = self.store.load(key) or loaded
        self.log.add(label, seconds)
        if memo:
            self._memo[key] = loaded
        return loaded

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return _progress(iterable, total=total, desc=desc, quiet=self.quiet or not self.bars)

    def checkpoint(self, tag: str) -> "Checkpoint | None":
        """A checkpoint for a long loop inside the stage being computed (None outside any
        stage): keyed by that stage's key, ``tag`` and how many loops of that tag the stage
        ran before (a plugin's stage may run several fine-tunes), kept in the store until the
        stage is saved."""
        if not self._computing:
            return None
        key, label, ordinals, checkpoints = self._computing[-1]
        n = ordinals.get(tag, 0)
        ordinals[tag] = n + 1
        ck_key = stage_key("checkpoint", {"tag": tag, "n": n}, [key])
        checkpoints.append(ck_key)
        return Checkpoint(self.store, ck_key, f"{label}: {tag}", self.echo if not self.quiet else (lambda m: None))

    # data ---------------------------------------------------------------------
    def data_key(self, task: str) -> str:
        return self.keys.data(task)

    def task_data(self, task: str):
        memo = f"taskdata:{task}"
        if memo not in self._memo:
            spec = self.preset.task(task)
            tensors, info = self.stage(f"data[{task}]", self.data_key(task), "data",
                                       lambda: data_mod.stage(spec))
            self._memo[f"datainfo:{task}"] = info
            self._memo[memo] = data_mod.task_data(task, spec, tensors, info, self.preset, device=self.device)
        return self._memo[memo]

    def data_sources(self) -> dict[str, dict[str, Any]]:
        """Per task: its source and, for hf tasks, dataset id, config, revision and (once the
        data stage is loaded or stored) the commit it resolved to. Computes nothing."""
        out: dict[str, dict[str, Any]] = {}
        for spec in self.preset.tasks:
            entry: dict[str, Any] = {"source": spec.source}
            if spec.source == "hf":
                entry.update({k: spec.source_args.get(k) for k in ("path", "name", "revision")})
                info = self._memo.get(f"datainfo:{spec.name}")
                if info is None and self.store.has(self.data_key(spec.name)):
                    loaded = self.store.load(self.data_key(spec.name))
                    info = loaded[1] if loaded else None
                if info:
                    entry["resolved_revision"] = info.get("source", {}).get("resolved_revision")
            out[spec.name] = entry
        return out

    # base model and heads -----------------------------------------------------
    def base_key(self) -> str:
        return self.keys.base()

    def base(self) -> tuple[StateDict, dict]:
        spec = self.preset.model

        def compute():
            torch.manual_seed(0)
            shipped = models.checkpoint_path(spec)
            if shipped is not None and models.base_file_metadata(shipped) is not None:
                # a shipped base (``mmbench pretrain``): its image tower; the text tower stays
                # at its seeded initialisation and is never used (the file carries the heads)
                model = models.create_clip(spec, load_pretrained=False)
                visual, logit_scale, _, _, recipe = models.read_base_file(shipped)
                model.visual.load_state_dict(visual, strict=True)
                with torch.no_grad():
                    model.logit_scale.fill_(float(torch.tensor(logit_scale).log()))
                return dict(model.state_dict()), {"logit_scale": logit_scale, "shipped_recipe": recipe}
            model = models.create_clip(spec)
            info: dict[str, Any] = {}
            if spec.pretrain_steps:
                from .zeroshot import concept, templates_for

                images, captions = [], []
                caption_rng = torch.Generator().manual_seed(1)
                for task in self.preset.task_names:
                    td = self.task_data(task)
                    x, y = td.tensors("pretrain")
                    images.append(x)
                    # each image's caption: one of the prompt templates its task's heads average over
                    templates = templates_for(self.preset.task(task))
                    pick = torch.randint(0, len(templates), (len(y),), generator=caption_rng).tolist()
                    if spec.pretrain_named not in ("all", "even"):
                        raise ValueError(f"pretrain_named {spec.pretrain_named!r}: all | even")
                    named = [spec.pretrain_named == "all" or c % 2 == 0 for c in range(td.num_classes)]
                    captions += [templates[i].format(td.class_names[int(c)] if named[int(c)]
                                                     else concept(self.preset.task(task)))
                                 for i, c in zip(pick, y)]
                gen = torch.Generator().manual_seed(0)
                info = models.contrastive_pretrain(model, spec, torch.cat(images), captions, gen,
                                                   progress=lambda it: _faulty(self.progress(it, desc="pretrain base"),
                                                                               "base.step"))
            info["logit_scale"] = float(model.logit_scale.detach().exp())
            return dict(model.state_dict()), info
        return self.stage("base", self.base_key(), "base", compute)

    def pretrained(self) -> StateDict:
        memo = "pretrained"
        if memo not in self._memo:
            state, _ = self.base()
            self._memo[memo] = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")
                                and torch.is_floating_point(v)}
        return self._memo[memo]

    def heads_key(self) -> str:
        return self.keys.heads()

    def heads(self) -> dict[str, torch.Tensor]:
        memo = "heads"
        if memo in self._memo:
            return self._memo[memo]

        def compute():
            state, info = self.base()
            counts = {t: self.task_data(t).num_classes for t in self.preset.task_names}
            if self.preset.heads == "orthogonal":
                embed_dim = self.preset.model.config["embed_dim"] if self.preset.model.config else None
                if embed_dim is None:
                    raise ValueError("orthogonal heads need the model config's embed_dim")
                heads = models.orthogonal_heads(counts, embed_dim, info["logit_scale"],
                                                torch.Generator().manual_seed(0))
            elif self.preset.heads == "base":
                shipped = models.checkpoint_path(self.preset.model)
                if shipped is None or models.base_file_metadata(shipped) is None:
                    raise ValueError("heads 'base' need the model's pretrained file to be an mmbench base "
                                     "file (mmbench pretrain)")
                _, _, heads, names, _ = models.read_base_file(shipped)
                for t in self.preset.task_names:
                    have = self.task_data(t).class_names
                    if t not in heads or list(names.get(t, ())) != list(have):
                        raise ValueError(f"the base file {shipped} has no head for task {t!r} with its "
                                         f"classes {list(have)[:4]}...; rebuild it with `mmbench pretrain`")
                heads = {t: heads[t] for t in self.preset.task_names}
            elif self.preset.heads == "zeroshot":
                from .zeroshot import build_head

                model = models.create_clip(self.preset.model, load_pretrained=False)
                model.load_state_dict(state)
                tok = models.tokenizer(self.preset.model)
                heads = {t: build_head(model, tok, self.task_data(t).class_names, self.preset.task(t),
                                       device=self.device)
                         for t in self.preset.task_names}
            else:
                raise ValueError(f"unknown head kind {self.preset.heads!r} (orthogonal | zeroshot | base)")
            return heads, {"kind": self.preset.heads}
        tensors, _ = self.stage("heads", self.heads_key(), "heads", compute)
        self._memo[memo] = {t: v.to(self.device) for t, v in tensors.items()}
        return self._memo[memo]

    def encoder_module(self) -> torch.nn.Module:
        """The one shared encoder module used for functional forwards (never trained)."""
        if self._encoder_module is None:
            module = models.build_encoder(self.preset)
            module.load_state_dict(self.pretrained(), strict=False)
            self._encoder_module = module.to(self.device).eval()
            for p in self._encoder_module.parameters():
                p.requires_grad_(False)
        return self._encoder_module

    # clean fine-tunes -----------------------------------------------------------
    def recipe(self, task: str) -> Recipe:
        """The preset's recipe with the task's own epochs (``TaskSpec.epochs``) when set."""
        return self.keys.recipe(task)

    def finetune_key(self, task: str, seed: int) -> str:
        return self.keys.finetune(task, seed)

    def clean_finetune(self, task: str, seed: int, force: bool = False) -> StateDict:
        def compute():
            weights, info = self.run_finetune(task, seed=seed, desc=f"fine-tune {task}")
            return weights, info
        tensors, _ = self.stage(f"finetune[{task}, seed {seed}]", self.finetune_key(task, seed),
                                "finetune", compute, force=force)
        return tensors

    def run_finetune(self, task: str, *, seed: int, init: StateDict | None = None, poison=None, loss=None,
                     desc: str = "", **overrides: Any) -> tuple[StateDict, dict]:
        """One run of :func:`mmbench.train.finetune` of ``task`` at ``seed``.

        Its random streams depend on (task, seed) only: the data order on
        ``hash_seed("finetune", task, seed)``, poisoning on ``hash_seed("poison", task,
        seed)`` (its own generator: the order is the clean fine-tune's however much a
        ``poison`` draws, so a backdoor vector θ_poisoned − θ_clean at one seed holds no
        data-order noise), torch's global RNG on ``hash_seed("torch", task, seed)``."""
        recipe = Recipe(**{**asdict(self.recipe(task)), **overrides})
        td = self.task_data(task)
        head = self.heads()[task]
        module = models.build_encoder(self.preset)
        order = torch.Generator().manual_seed(hash_seed("finetune", task, seed))
        poisoning = torch.Generator().manual_seed(hash_seed("poison", task, seed))
        torch.manual_seed(hash_seed("torch", task, seed))
        return train.finetune(module, init if init is not None else self.pretrained(), td,
                              lambda f: logits(f, head), recipe, order, poison=poison,
                              poison_generator=poisoning, loss=loss, device=self.device,
                              checkpoint=self.checkpoint(f"finetune {task} seed {seed}"),
                              progress=lambda it: _faulty(self.progress(it, desc=desc or f"fine-tune {task}"),
                                                          "finetune.step"))

    # evaluation (the metrics themselves: mmbench.evaluate) -------------------------------
    def forward_fn(self, weights: StateDict, task: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``images -> logits`` of ``weights`` on the shared encoder with ``task``'s head."""
        module = self.encoder_module()
        head = self.heads()[task]
        weights = {k: v.to(self.device) for k, v in weights.items()}

        def forward(x: torch.Tensor) -> torch.Tensor:
            with train.autocast(self.device):
                return logits(functional_call(module, weights, (x.to(self.device),)), head)
        return forward

    def run_predictions(self, weights: StateDict, task: str, split: str, trigger: Trigger | None = None,
                        *, clean: bool = True) -> evaluate_mod.Predictions:
        """One pass over ``split``: clean and/or triggered predictions of the same decoded batches."""
        return evaluate_mod.predict(self.forward_fn(weights, task),
                                    self.task_data(task).batches(split, self.preset.eval_batch_size),
                                    trigger, clean=clean)

    @torch.no_grad()
    def predictions(self, weights: StateDict, task: str, split: str, trigger: Trigger | None = None,
                    exclude_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted, true) labels over ``split``, optionally triggered and without one class."""
        out = self.run_predictions(weights, task, split, trigger, clean=trigger is None)
        preds = out.clean if trigger is None else out.triggered
        if exclude_class is None:
            return preds, out.labels
        keep = out.labels != exclude_class
        return preds[keep], out.labels[keep]

    def evaluate(self, weights: StateDict, task: str, split: str = "test", trigger: Trigger | None = None,
                 target: int | None = None) -> dict[str, Any]:
        """Clean ACC and, with ``trigger`` and ``target``, ASR of one pass over ``split``:
        ``acc``, ``acc_counts`` [k, n], ``acc_ci`` (Wilson 95 %) and ``asr``, ``asr_counts``, ``asr_ci``."""
        if (trigger is None) != (target is None):
            raise ValueError("evaluate: give both trigger and target, or neither")
        return evaluate_mod.summarize(self.run_predictions(weights, task, split, trigger), target)

    def accuracy_counts(self, weights: StateDict, task: str, split: str = "test") -> tuple[int, int]:
        out = self.run_predictions(weights, task, split)
        return evaluate_mod.accuracy_counts(out.clean, out.labels)

    def asr_counts(self, weights: StateDict, task: str, trigger: Trigger, target_class: int,
                   split: str = "test") -> tuple[int, int]:
        # target-class samples leave numerator and denominator (docs/methods.md)
        out = self.run_predictions(weights, task, split, trigger, clean=False)
        return evaluate_mod.asr_counts(out.triggered, out.labels, target_class)

    def accuracy(self, weights: StateDict, task: str, split: str = "test") -> float:
        return evaluate_mod.rate(*self.accuracy_counts(weights, task, split))

    def attack_success_rate(self, weights: StateDict, task: str, trigger: Trigger, target_class: int,
                            split: str = "test") -> float:
        return evaluate_mod.rate(*self.asr_counts(weights, task, trigger, target_class, split))


@contextlib.contextmanager
def stage_rng(key: str):
    """While a stage computes: torch's, NumPy's and Python's global RNGs seeded from its key, and
    restored afterwards. A stage that draws from a global RNG (a torchvision augmentation) then
    draws the same numbers whatever ran before it in the process, and a stage computed inside
    another one (``ctx.cached``) leaves the outer stage's stream as if it had been loaded."""
    import random

    import numpy as np

    seed = int(key[:15], 16)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class Checkpoint:
    """Where a long loop (a fine-tune, AdaMerging's steps) keeps its state so that a run that
    dies part-way resumes from it: an artifact in the store under its own key, written
    atomically like any other, at most every ``MMBENCH_CHECKPOINT_SECONDS`` (default 300) s."""

    def __init__(self, store: Store, key: str, label: str, echo: Callable[[str], None]) -> None:
        import os

        self.store, self.key, self.label, self.echo = store, key, label, echo
        self.interval = float(os.environ.get("MMBENCH_CHECKPOINT_SECONDS", "300"))
        self._last = time.monotonic()

    def load(self) -> tuple[StateDict, dict[str, Any]] | None:
        loaded = self.store.load(self.key)
        if loaded is not None:
            self.echo(f"  resuming {self.label} from step {loaded[1].get('step')}")
        self._last = time.monotonic()
        return loaded

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def save(self, tensors: StateDict, info: dict[str, Any]) -> None:
        self.store.save(self.key, "checkpoint", tensors, info)
        self._last = time.monotonic()


def _faulty(iterable: Iterable, point: str) -> Iterator:
    """``iterable``, passing the crash point ``point`` (mmbench.faults) at every step."""
    for item in iterable:
        faults.point(point)
        yield item


def logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1) @ head.T


def hash_seed(*parts: Any) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class RunContext:
    """The :class:`mmbench.api.Context` of one plugin call (bound to its plugin for cache keys)."""

    def __init__(self, shared: SharedStages, seed: int, plugin: tuple[str, str, str] | None = None) -> None:
        self.shared = shared
        self.preset = shared.preset
        self.seed = seed
        self.device = shared.device
        self.tasks = shared.preset.task_names
        self.adversary_task = shared.preset.adversary_task
        self.target_class = shared.preset.target_class
        self._plugin = plugin  # (name, distribution, version)

    def bind(self, plugin: tuple[str, str, str]) -> "RunContext":
        return RunContext(self.shared, self.seed, plugin)

    # models
    def pretrained(self) -> StateDict:
        return self.shared.pretrained()

    def encoder(self, weights: StateDict | None = None) -> torch.nn.Module:
        module = models.build_encoder(self.preset)
        module.load_state_dict(weights if weights is not None else self.pretrained(), strict=False)
        return module.to(self.device)

    def head(self, task: str) -> torch.Tensor:
        return self.shared.heads()[task]

    def logits(self, features: torch.Tensor, task: str) -> torch.Tensor:
        return logits(features, self.head(task))

    def forward(self, weights: StateDict, images: torch.Tensor, task: str | None = None) -> torch.Tensor:
        # .to() is a no-op for tensors already there and keeps autograd for differentiable weights
        weights = {k: v.to(self.device) for k, v in weights.items()}
        features = functional_call(self.shared.encoder_module(), weights, (images.to(self.device),))
        return features if task is None else self.logits(features, task)

    def data(self, task: str):
        return self.shared.task_data(task)

    # training
    def finetune(self, task: str, *, seed: int | None = None, init: StateDict | None = None, poison=None,
                 loss=None, desc: str = "", **recipe: Any) -> StateDict:
        weights, _ = self.shared.run_finetune(task, seed=self.seed if seed is None else seed, init=init,
                                              poison=poison, loss=loss, desc=desc, **recipe)
        return weights

    def clean_finetune(self, task: str, seed: int | None = None) -> StateDict:
        return self.shared.clean_finetune(task, self.seed if seed is None else seed)

    def task_vector(self, task: str, seed: int | None = None) -> StateDict:
        pre = self.pretrained()
        return {k: v - pre[k] for k, v in self.clean_finetune(task, seed).items()}

    # evaluation
    def accuracy(self, weights: StateDict, task: str, split: str = "test") -> float:
        return self.shared.accuracy(weights, task, split)

    def attack_success_rate(self, weights: StateDict, task: str, trigger: Trigger, target_class: int,
                            split: str = "test") -> float:
        return self.shared.attack_success_rate(weights, task, trigger, target_class, split)

    # plumbing
    def cached(self, kind: str, params: dict[str, Any],
               compute: Callable[[], tuple[StateDict, dict[str, Any]]],
               label: str | None = None) -> tuple[StateDict, dict[str, Any]]:
        plugin = (self._plugin[1], self._plugin[2]) if self._plugin else None
        key = self.shared.keys.plugin_stage(kind, params, self.seed, plugin)
        label = f"{kind}[{label or canonical_json(params)[:60]}, seed {self.seed}]"
        return self.shared.stage(label, key, f"plugin:{kind}", compute)

    def generator(self, *salt: Any) -> torch.Generator:
        return torch.Generator().manual_seed(hash_seed(self.seed, *salt))

    def checkpoint(self, tag: str) -> Checkpoint | None:
        return self.shared.checkpoint(tag)

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return _faulty(self.shared.progress(iterable, total=total, desc=desc), f"step.{desc}")

    def log(self, message: str) -> None:
        if not self.shared.quiet:
            self.shared.echo(f"  {message}")

