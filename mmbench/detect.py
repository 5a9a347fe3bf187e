"""The detection track: flag the malicious contributor *before* merging.

A :class:`Detector` plugin receives the contributed task vectors and what its threat model
grants it, and returns a suspicion score per contributor (higher: more suspicious). For
every attack and seed the harness runs two kinds of stage:

* ``detect[attack, detector, seed]``: the scores of the preset's contributors, one of them
  the attack's backdoored vector (none for ``--attack none``). Stored as
  ``results/<preset>/detection/detect__<detector>__<attack>__seed<N>.json``.
* ``screen[attack, detector, merger, seed]``: the merger (no defense) over every
  contributor but the most suspicious one, evaluated as a cell is (ACC over *all* the
  preset's tasks, the left-out one included, so leaving out an honest contributor costs
  what it costs; ASR on the attack's target task). Stored as
  ``detection/screen__<detector>__<attack>__<merger>__seed<N>.json``.

The leaderboard reports per attack and detector the AUROC of the scores (the malicious
contributor against the clean ones; per seed, then mean and t-interval over seeds, and
pooled over seeds) and the screened merge against the unscreened one (the cell
``attack/merger/none``).

**The threat model.** A detector is the merger's user before merging: it holds θ_pre, the
contributed task vectors (not which one is malicious, not the trigger, not the target), the
preset's heads and each task's clean *dev* split. Its ``ctx`` is a :class:`DetectorContext`,
which has no clean fine-tunes, no test split and no attack; asking for them is a
``PluginError``.

Why this lives outside :mod:`mmbench.api` and :mod:`mmbench.execute`: those modules' code is
part of every cell's key (``mmbench.keys.CORE_MODULES``), and the detection track changes
nothing a cell computes, so adding it must not recompute every published cell. Its stages
are keyed by this module's code instead (``CORE_MODULES["detect"]``), and
:mod:`mmbench.worker` adds their two stage runners to the executors' worker.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator

from .api import Cost, Merged, PluginError, Sizes, StateDict, _Plugin
from .plugins import UsageError

if TYPE_CHECKING:
    import torch

    from .graph import Stage

__all__ = ["Detector", "Scores", "DetectorContext", "auroc", "RESULTS_FOLDER", "detect_id", "screen_id"]

RESULTS_FOLDER = "detection"  # under results/<preset>/: the leaderboard's cell globs do not see it


@dataclass
class Scores:
    """A detector's output: ``scores`` maps every contributor's task to its suspicion (higher:
    more suspicious; any real number); ``info`` is JSON-able detail (per-class statistics, ...)."""

    scores: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


class Detector(_Plugin):
    """A pre-merge detector (plugin kind ``detector``, hook ``mmbench_register_detectors``).

    ``score(pretrained, task_vectors, ctx, params) -> Scores``: one score per key of
    ``task_vectors``. ``ctx`` is a :class:`DetectorContext`. Deterministic given
    ``ctx.generator(...)``; expensive per-contributor work can be cached with ``ctx.cached``
    keyed by a digest of the contributor's vector (:func:`vector_digest`), so that the clean
    contributors, which are the same for every attack of a seed, are scored once.
    """

    kind: ClassVar[str] = "detector"

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        return None

    def score(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: "DetectorContext", params: dict[str, Any]) -> Scores:
        raise NotImplementedError


class _DevOnly:
    """A task's data with only its clean dev split (what a merger's user holds)."""

    def __init__(self, data: Any) -> None:
        self._data = data
        self.name = data.name
        self.class_names = data.class_names

    def _split(self, split: str) -> str:
        if split != "dev":
            raise PluginError(f"a detector sees the clean dev split only, not {split!r}")
        return split

    def tensors(self, split: str = "dev") -> tuple["torch.Tensor", "torch.Tensor"]:
        return self._data.tensors(self._split(split))

    def size(self, split: str = "dev") -> int:
        return self._data.size(self._split(split))

    def valid_range(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        return self._data.valid_range()

    def batches(self, split: str, batch_size: int, **kwargs: Any) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        return self._data.batches(self._split(split), batch_size, **kwargs)


class DetectorContext:
    """What a detector may use: θ_pre, the encoder and heads, the clean dev splits, its own
    cached stages, generators, progress and logging. Everything else of
    :class:`mmbench.api.Context` (clean fine-tunes, task vectors of the harness, the test
    split, ASR) is outside its threat model and raises :class:`PluginError`."""

    _FORBIDDEN = ("finetune", "clean_finetune", "task_vector", "attack_success_rate", "adversary_task",
                  "target_class")

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self.preset = ctx.preset
        self.seed = ctx.seed
        self.device = ctx.device
        self.tasks = ctx.tasks

    def __getattr__(self, name: str) -> Any:
        if name in self._FORBIDDEN:
            raise PluginError(f"a detector may not use ctx.{name}: it is outside the detection threat model "
                              "(θ_pre, the contributed vectors, heads and clean dev data)")
        raise AttributeError(name)

    def pretrained(self) -> StateDict:
        return self._ctx.pretrained()

    def encoder(self, weights: StateDict | None = None) -> "torch.nn.Module":
        return self._ctx.encoder(weights)

    def head(self, task: str) -> "torch.Tensor":
        return self._ctx.head(task)

    def logits(self, features: "torch.Tensor", task: str) -> "torch.Tensor":
        return self._ctx.logits(features, task)

    def forward(self, weights: StateDict, images: "torch.Tensor", task: str | None = None) -> "torch.Tensor":
        return self._ctx.forward(weights, images, task)

    def data(self, task: str) -> _DevOnly:
        return _DevOnly(self._ctx.data(task))

    def accuracy(self, weights: StateDict, task: str, split: str = "dev") -> float:
        if split != "dev":
            raise PluginError(f"a detector sees the clean dev split only, not {split!r}")
        return self._ctx.accuracy(weights, task, "dev")

    def cached(self, kind: str, params: dict[str, Any], compute, label: str | None = None):
        return self._ctx.cached(kind, params, compute, label)

    def checkpoint(self, tag: str) -> Any:
        return self._ctx.checkpoint(tag)

    def generator(self, *salt: Any) -> "torch.Generator":
        return self._ctx.generator(*salt)

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        return self._ctx.progress(iterable, total=total, desc=desc)

    def log(self, message: str) -> None:
        self._ctx.log(message)


def vector_digest(vector: StateDict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (:func:`mmbench.vectors.digest`):
    a cache key for work on one contributor's vector (the same clean vector recurs in every
    attack of a seed)."""
    from .vectors import digest

    return digest(vector)


# --- AUROC ----------------------------------------------------------------------------------
def auroc(positive: Iterable[float], negative: Iterable[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counting one half (the Mann–Whitney
    form of the area under the ROC curve); None without a positive or a negative."""
    pos, neg = list(positive), list(negative)
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def most_suspicious(scores: dict[str, float], order: Iterable[str]) -> str:
    """The contributor with the highest score; a tie goes to the first in merge order."""
    order = list(order)
    best = max(scores[t] for t in order)
    return next(t for t in order if scores[t] == best)


# --- identities -----------------------------------------------------------------------------
def detect_id(detector: str, attack: str, seed: int, setting: str = "") -> str:
    middle = f"__{setting}" if setting else ""
    return f"{RESULTS_FOLDER}/detect__{detector}__{attack}{middle}__seed{seed}"


def screen_id(detector: str, attack: str, merger: str, seed: int, setting: str = "") -> str:
    middle = f"__{setting}" if setting else ""
    return f"{RESULTS_FOLDER}/screen__{detector}__{attack}__{merger}{middle}__seed{seed}"


def stage_result_id(stage: "Stage") -> str:
    """Where a detect or screen stage's result lies (``setting_tag``: what --set changed)."""
    p = stage.params
    if stage.kind == "detect":
        return detect_id(p["detector"], stage.attack, stage.seed, p.get("setting_tag", ""))
    return screen_id(p["detector"], stage.attack, stage.merger, stage.seed, p.get("setting_tag", ""))


# --- the two stages (run by mmbench.worker.Worker) ---------------------------------------------
def _start(worker: Any, stage: "Stage") -> dict[str, Any]:
    from . import __version__
    from .execute import environment

    p = stage.params
    out = {"id": stage_result_id(stage), "kind": stage.kind, "preset": worker.preset.name,
           "attack": stage.attack, "detector": p["detector"], "seed": stage.seed, "key": stage.key,
           "params": {"detector": p["detector_params"]},
           "plugins": {"detector": dict(worker.graph.plugins[("detector", p["detector"])]),
                       "attack": dict(worker.graph.plugins[("attack", stage.attack)])},
           "mmbench": __version__, "device": str(worker.device), "environment": environment(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if stage.kind == "screen":
        out["merger"] = stage.merger
        out["params"]["merger"] = p["merger_params"]
        out["plugins"]["merger"] = dict(worker.graph.plugins[("merger", stage.merger)])
    return out


def _current(worker: Any, stage: "Stage", force: bool) -> dict[str, Any] | None:
    existing = worker.store.load_result(worker.preset.name, stage_result_id(stage))
    if not force and existing and existing.get("key") == stage.key and existing.get("status") == "ok":
        return existing
    return None


def _finish(worker: Any, stage: "Stage", result: dict[str, Any], start: float) -> dict[str, Any]:
    result["seconds"] = time.perf_counter() - start
    worker.shared.log.add(stage.label, result["seconds"])
    worker.store.save_result(worker.preset.name, result["id"], result)
    return result


def malicious_of(result: dict[str, Any]) -> list[str]:
    """The malicious contributors of a detect result: ``malicious_all``, or its one ``malicious``."""
    if result.get("malicious_all"):
        return list(result["malicious_all"])
    return [result["malicious"]] if result.get("malicious") else []


def malicious_figures(scores: dict[str, float], malicious: list[str]) -> dict[str, Any]:
    """AUROC of the malicious contributors' scores against the clean ones', the rank of the most
    suspicious malicious one (1 = flagged first) and how many clean ones tie with it; None
    without an attack."""
    if not malicious:
        return {"auroc": None, "rank_of_malicious": None, "tied_with_malicious": None}
    top = max(scores[t] for t in malicious)
    clean = [s for t, s in scores.items() if t not in malicious]
    return {"auroc": auroc([scores[t] for t in malicious], clean),
            "rank_of_malicious": 1 + sum(s > top for s in clean),
            "tied_with_malicious": sum(s == top for s in clean)}


def run_detect(worker: Any, stage: "Stage", force: bool = False) -> dict[str, Any]:
    """The detect stage: the detector's scores over the attack's contributors."""
    from .context import RunContext
    from .execute import NO_ATTACK

    existing = _current(worker, stage, force)
    if existing:
        worker.shared.log.add(stage.label, None)
        return existing
    p = stage.params
    result = _start(worker, stage)
    start = time.perf_counter()
    try:
        reg = worker.registry.get("detector", p["detector"])
        ctx = DetectorContext(RunContext(worker.shared, stage.seed).bind((reg.name, reg.distribution,
                                                                          reg.key_version)))
        vectors = worker.cell_vectors(stage.attack, stage.seed)
        # every contributor the attacker replaced (one, or more for MergeBackdoor); its own task first
        uploads = [] if stage.attack == NO_ATTACK else list(worker.attack(stage.attack, stage.seed).uploads())
        malicious = uploads[0] if uploads else None
        out = reg.obj.score(worker.shared.pretrained(), vectors, ctx, dict(p["detector_params"]))
        if not isinstance(out, Scores):
            raise PluginError(f"detector {reg.name!r} returned {type(out).__name__}, not Scores")
        tasks = list(worker.preset.task_names)
        if set(out.scores) != set(tasks):
            raise PluginError(f"detector {reg.name!r} scored {sorted(out.scores)}, not the contributors {tasks}")
        scores = {t: float(out.scores[t]) for t in tasks}
        bad = [t for t, s in scores.items() if not math.isfinite(s)]
        if bad:
            raise PluginError(f"detector {reg.name!r} gave a non-finite score to {bad[0]!r}")
        flagged = most_suspicious(scores, tasks)
        result.update(status="ok", scores=scores, malicious=malicious, malicious_all=uploads, flagged=flagged,
                      info=out.info, **malicious_figures(scores, uploads))
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # stored with its traceback, then raised: the run reports the stage failed
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-4))
        _finish(worker, stage, result, start)
        raise
    return _finish(worker, stage, result, start)


def run_screen(worker: Any, stage: "Stage", force: bool = False) -> dict[str, Any]:
    """The screen stage: merge every contributor but the most suspicious, evaluate as a cell."""
    from .context import RunContext
    from .execute import NO_ATTACK
    from .keys import core_code, stage_key

    existing = _current(worker, stage, force)
    if existing:
        worker.shared.log.add(stage.label, None)
        return existing
    p = stage.params
    result = _start(worker, stage)
    start = time.perf_counter()
    try:
        detect_stage = next(worker.graph.stage(k) for k in stage.inputs if worker.graph.stage(k).kind == "detect")
        detected = worker.store.load_result(worker.preset.name, stage_result_id(detect_stage))
        if not detected or detected.get("status") != "ok":
            raise PluginError(f"the detect stage of {p['detector']}/{stage.attack} seed {stage.seed} has no "
                              "ok result")
        left_out = detected["flagged"]
        mreg = worker.registry.get("merger", stage.merger)
        # the merge without ``left_out`` and its evaluation, shared by every detector that flags
        # the same contributor (a stage of its own, keyed by what it is made of)
        vector_keys = [k for k in stage.inputs if worker.graph.stage(k).kind in ("finetune", "attack")]
        evalft = next(k for k in stage.inputs if worker.graph.stage(k).kind == "eval-finetuned")
        key = stage_key("screen-merge", {"merger": [stage.merger, p["merger_params"]], "seed": stage.seed,
                                         "left_out": left_out}, [*vector_keys, evalft],
                        plugin=(core_code("detect"), mreg.key_version))

        def compute() -> tuple[StateDict, dict[str, Any]]:
            vectors = worker.cell_vectors(stage.attack, stage.seed)
            kept = {t: v for t, v in vectors.items() if t != left_out}
            attack = None if stage.attack == NO_ATTACK else worker.attack(stage.attack, stage.seed)
            ctx = RunContext(worker.shared, stage.seed)
            merged = mreg.obj.merge(ctx.pretrained(), kept, ctx.bind((mreg.name, mreg.distribution,
                                                                      mreg.key_version)), dict(p["merger_params"]))
            if not isinstance(merged, Merged):
                raise PluginError(f"merger {stage.merger!r} returned {type(merged).__name__}, not Merged")
            return {}, {"metrics": worker.metrics(ctx, merged.weights, attack, stage.seed), "merge": merged.info}
        _, made = worker.shared.stage(f"merge {stage.attack}/{stage.merger} without {left_out} (seed {stage.seed})",
                                      key, "screen-merge", compute, memo=False)
        result.update(status="ok", left_out=left_out, malicious=detected.get("malicious"),
                      left_out_malicious=left_out in malicious_of(detected),
                      metrics=made["metrics"], info={"merge": made["merge"]})
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # stored with its traceback, then raised: the run reports the stage failed
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-4))
        _finish(worker, stage, result, start)
        raise
    return _finish(worker, stage, result, start)
