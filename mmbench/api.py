"""The types a plugin author imports.

A plugin is an object with a ``name``, a one-line ``description``, a dict of
``params`` (its hyperparameters, each a :class:`Param` declaring type, range,
default and meaning; each overridable from a preset or the command line and
checked against the declaration before anything runs; ``defaults``, the plain
name → default dict, is derived from it) and one method:

* :class:`Attack` ``.run(ctx, params) -> AttackResult``: turn the adversary's
  task into a backdoored task vector, plus the trigger and target its ASR needs.
* :class:`Merger` ``.merge(pretrained, task_vectors, ctx, params) -> Merged``:
  map θ_pre and {τ_k} to merged image-encoder weights.
* :class:`Defense` ``.defend(pretrained, task_vectors, merger, ctx, params) -> Merged``:
  wrap a merger (``merger`` is a :class:`BoundMerger`: call it like a function).

``ctx`` is a :class:`Context`: the preset, device, seed, the frozen pretrained
encoder, each task's data and frozen head, the one fine-tuning loop, evaluation,
and ``ctx.cached(...)`` for intermediate artifacts of the plugin's own. Weights
travel as :data:`StateDict` (name → float tensor of the image encoder, on the
CPU). Nothing a plugin returns is pickled: tensors go to safetensors, ``info``
dicts to JSON, so keep them JSON-able.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Protocol

if TYPE_CHECKING:  # torch is imported where a tensor is touched: planning a run never imports it
    import torch

StateDict = dict[str, "torch.Tensor"]

# The plugin API's version: 2 added Cost / Plugin.estimate, Defense.merges_own_inputs and
# Context.checkpoint (all optional, with defaults: a plugin written for version 1 works unchanged);
# 3 added AttackResult.contributions and the opt_in class attribute (optional too).
API_VERSION = 3

__all__ = [
    "StateDict", "Trigger", "AttackResult", "Merged", "Attack", "Merger", "Defense",
    "BoundMerger", "Context", "TaskData", "PluginError", "Param", "PARAM_TYPES", "Cost", "Sizes",
    "API_VERSION",
]


class PluginError(Exception):
    """A plugin cannot run a cell (bad parameter, unsupported combination).

    The harness records the message in the cell's result (status ``failed``)
    and goes on with the other cells.
    """


@dataclass(eq=False)
class Trigger:
    """A square patch pasted onto *normalised* images (x' = m⊙p + (1−m)⊙x).

    ``pattern`` is (C, h, w) in the model's normalised input space (BadMerging
    pastes after normalisation); ``top``/``left`` place it. The mask is the
    all-ones square under the pattern.
    """

    pattern: torch.Tensor
    top: int
    left: int

    @classmethod
    def at_corner(cls, pattern: torch.Tensor, image_size: int, corner: str = "bottom-right") -> "Trigger":
        h, w = pattern.shape[-2:]
        vertical, _, horizontal = corner.partition("-")
        if vertical not in ("top", "bottom") or horizontal not in ("left", "right"):
            raise ValueError(f"corner must be top|bottom-left|right, not {corner!r}")
        top = 0 if vertical == "top" else image_size - h
        left = 0 if horizontal == "left" else image_size - w
        return cls(pattern, top, left)

    @property
    def size(self) -> int:
        return int(self.pattern.shape[-1])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of a (N, C, H, W) batch (the input is untouched)."""
        out = images.clone()
        h, w = self.pattern.shape[-2:]
        out[..., self.top:self.top + h, self.left:self.left + w] = self.pattern.to(out)
        return out

    def to_tensors(self, prefix: str = "trigger") -> StateDict:
        import torch

        return {f"{prefix}.pattern": self.pattern.detach().cpu().contiguous(),
                f"{prefix}.position": torch.tensor([self.top, self.left])}

    @classmethod
    def from_tensors(cls, tensors: StateDict, prefix: str = "trigger") -> "Trigger":
        top, left = (int(v) for v in tensors[f"{prefix}.position"])
        return cls(tensors[f"{prefix}.pattern"], top, left)


@dataclass
class AttackResult:
    """What an attack hands to the harness.

    ``task`` is the adversary's task: its clean task vector is replaced by
    ``task_vector`` in every merge. ``target_task`` is where ASR is measured
    (the same task for on-task attacks, another contributor's for off-task
    ones); ``target_class`` indexes that task's classes. ``tensors`` are extra
    artifacts to keep (stored with the attack's stage); ``info`` is JSON-able
    and lands in every cell's result (hyperparameters, figures the attack
    measured itself, e.g. BadTV's ASR under negation).

    ``contributions`` are the attacker's further uploads, for attacks that control more than
    one contributor (MergeBackdoor): task name -> task vector, each replacing that task's
    clean vector in every merge beside ``task_vector``. The detection track labels every
    replaced contributor malicious, and the harness measures each upload alone.
    """

    task: str
    task_vector: StateDict
    trigger: Trigger
    target_class: int
    target_task: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tensors: StateDict = field(default_factory=dict)
    contributions: dict[str, StateDict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_task is None:
            self.target_task = self.task
        if self.task in self.contributions:
            raise PluginError(f"an attack's contributions name its own task {self.task!r}; "
                              "its vector for that task is task_vector")

    def uploads(self) -> dict[str, StateDict]:
        """Every vector the attacker contributes: its task's first, then the others'."""
        return {self.task: self.task_vector, **self.contributions}


@dataclass
class Merged:
    """Merged image-encoder weights and JSON-able details (learned coefficients, ...)."""

    weights: StateDict
    info: dict[str, Any] = field(default_factory=dict)


# The types a parameter can declare. "any" (no check) is what a ``defaults`` entry of None
# infers to; declare a real type instead.
PARAM_TYPES = ("float", "int", "bool", "str", "list[float]", "list[str]", "any")


@dataclass(frozen=True)
class Param:
    """One declared plugin parameter: what ``--set plugin.name=value`` and a preset's
    ``plugin_params`` may give it (checked by ``mmbench.params.check`` before anything runs).

    * ``default``: the value when nobody sets it (checked against the declaration itself).
    * ``type``: one of :data:`PARAM_TYPES`; omitted, it is inferred from ``default``.
      Integers are accepted for ``float`` (and become floats), ``int`` takes integers only,
      ``bool`` only true/false, ``list[float]`` a list of numbers.
    * ``min`` / ``max``: inclusive bounds of a number (of each element of a list);
      ``min_exclusive=True`` makes the lower bound strict (``> min``).
    * ``choices``: the only values allowed (e.g. ``("sum", "mean", "max")``).
    * ``nullable``: None (JSON null) is allowed too, e.g. "null → the preset's task";
      implied by a None default.
    * ``special``: extra strings allowed whatever the type, e.g. ``("auto",)``.
    * ``length``: the exact length of a list (2 for a [low, high] pair).
    * ``help``: one line: what the parameter means.
    """

    default: Any
    type: str = ""
    _: KW_ONLY
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    special: tuple[str, ...] = ()
    length: int | None = None
    help: str = ""

    def __post_init__(self) -> None:
        from .params import validate_declaration  # the checks live with the other value checks

        validate_declaration(self)


@dataclass(frozen=True)
class Sizes:
    """What :meth:`_Plugin.estimate` may know of a preset without loading anything: images
    per task in one fine-tune (steps × batch, as ``mmbench.train.finetune`` counts them),
    in each task's test and dev splits (None where unknown), and the adversary task."""

    tasks: tuple[str, ...]
    finetune_images: dict[str, int | None]
    test_images: dict[str, int | None]
    dev_images: dict[str, int | None]
    adversary_task: str


@dataclass(frozen=True)
class Cost:
    """A plugin's own estimate of the GPU work one of its stages does, in images through the
    model; ``mmbench plan`` turns images into seconds with the architecture's throughput.

    ``train_images``: forward+backward passes (a fine-tune of task t is
    ``sizes.finetune_images[t]``); ``eval_images``: forward passes; ``seconds``: work
    that is not image passes (tensor arithmetic); ``shared_by``: ``"cell"`` (every cell
    pays), ``"seed"`` (once per seed, e.g. IBVS's injected model) or ``"attack"`` (once
    per attack and seed, e.g. DAM's mask)."""

    train_images: float = 0.0
    eval_images: float = 0.0
    seconds: float = 0.0
    shared_by: str = "cell"
    note: str = ""


class _Plugin:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # the declaration: name -> Param (see Param); preferred over ``defaults``
    params: ClassVar[dict[str, Param]] = {}
    # name -> default value: derived from ``params`` by the class; a plugin that sets only
    # ``defaults`` (the older contract) gets declarations inferred from the defaults' types
    defaults: ClassVar[dict[str, Any]] = {}
    # True: left out of every preset's default cross product, run only when named (a preset
    # can also name plugins opt-in for itself: Preset.opt_in)
    opt_in: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "params" not in cls.__dict__ and "defaults" not in cls.__dict__:
            return  # both inherited as they are
        from .params import derive_class_params

        cls.params, cls.defaults = derive_class_params(cls)

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        """The GPU work of this plugin's part of a stage (``mmbench plan``); None: unknown.
        The defaults: an attack costs one fine-tune of the adversary task and four passes
        over its test split, a merger or defense nothing beyond the harness's evaluation."""
        return None


class Attack(_Plugin):
    kind: ClassVar[str] = "attack"

    def estimate(self, params: dict[str, Any], sizes: Sizes) -> Cost | None:
        task = sizes.adversary_task
        train, test = sizes.finetune_images.get(task), sizes.test_images.get(task)
        if train is None or test is None:
            return None
        return Cost(train_images=train, eval_images=4 * test, note="default: one fine-tune")

    def run(self, ctx: "Context", params: dict[str, Any]) -> AttackResult:
        raise NotImplementedError


class Merger(_Plugin):
    kind: ClassVar[str] = "merger"

    def merge(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
              ctx: "Context", params: dict[str, Any]) -> Merged:
        raise NotImplementedError


class Defense(_Plugin):
    kind: ClassVar[str] = "defense"
    # True when ``defend`` calls the merger on exactly the θ_pre and task vectors it received
    # (a defense that post-processes the merge: none, IBVS): the harness then merges once, as
    # a stage shared by every such cell of one attack, merger and seed, and plans it as one.
    # Whatever a defense declares, a merge is served from that stage only when the vectors
    # it passes are equal to the cell's (compared by content); otherwise it runs uncached.
    merges_own_inputs: ClassVar[bool] = False

    def defend(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
               merger: "BoundMerger", ctx: "Context", params: dict[str, Any]) -> Merged:
        raise NotImplementedError


@dataclass
class BoundMerger:
    """A merger with its resolved parameters and context; call it to merge."""

    plugin: Merger
    params: dict[str, Any]
    ctx: "Context"
    # Set by the harness: runs a merge as a cached stage when its inputs are the cell's
    # own (θ_pre and task vectors, the very objects the defense received), so cells that
    # differ only in a defense that post-processes the merge (none, ibvs) share one merge.
    stage: Callable[[StateDict, dict[str, StateDict], dict[str, Any], Callable[[], Merged]], Merged] | None = None

    @property
    def name(self) -> str:
        return self.plugin.name

    def __call__(self, pretrained: StateDict, task_vectors: dict[str, StateDict],
                 **overrides: Any) -> Merged:
        params = {**self.params, **overrides}

        def compute() -> Merged:
            return self.plugin.merge(pretrained, task_vectors, self.ctx, params)
        if self.stage is None:
            return compute()
        return self.stage(pretrained, task_vectors, params, compute)


class TaskData(Protocol):
    """One task's splits as normalised image tensors and integer labels."""

    name: str
    class_names: tuple[str, ...]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (N, C, H, W) float normalised, labels (N,) int64) of ``train``, ``dev`` or ``test``.

        Materialises the whole split: fine for the embedded presets and small
        splits; prefer :meth:`batches` for training-size data at paper scale."""

    def size(self, split: str) -> int:
        """Number of samples in a split."""

    def valid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of normalised pixel values, shaped (C, 1, 1)."""

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate a split in batches (``limit`` caps the number of samples)."""


LossFn = Callable[["torch.nn.Module", "torch.Tensor", "torch.Tensor", int], "torch.Tensor"]
PoisonFn = Callable[["torch.Tensor", "torch.Tensor", "torch.Generator"], "tuple[torch.Tensor, torch.Tensor]"]


class Context(Protocol):
    """What the harness gives every plugin call (implemented in ``mmbench.context``)."""

    preset: Any            # mmbench.presets.Preset
    seed: int
    device: torch.device
    tasks: tuple[str, ...]   # the preset's tasks, in merge order
    adversary_task: str      # the preset's adversary task
    target_class: int        # the preset's target class on that task

    # models ---------------------------------------------------------------
    def pretrained(self) -> StateDict:
        """θ_pre: the image encoder's float tensors (CPU, do not modify)."""

    def encoder(self, weights: StateDict | None = None) -> torch.nn.Module:
        """A fresh image-encoder module on ``device`` holding ``weights`` (θ_pre by default)."""

    def head(self, task: str) -> torch.Tensor:
        """Frozen head (num_classes, embed_dim) on ``device``; logits = normalise(f(x)) @ head.T."""

    def logits(self, features: torch.Tensor, task: str) -> torch.Tensor:
        """Apply ``task``'s frozen head to image features (L2-normalised first)."""

    def forward(self, weights: StateDict, images: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Features (task None) or logits of the encoder at ``weights`` via functional_call (no copy)."""

    def data(self, task: str) -> TaskData: ...

    # training -------------------------------------------------------------
    def finetune(self, task: str, *, seed: int | None = None, init: StateDict | None = None,
                 poison: PoisonFn | None = None, loss: LossFn | None = None,
                 desc: str = "", **recipe: Any) -> StateDict:
        """The one fine-tuning loop (preset recipe; ``recipe`` overrides lr, epochs, ...).

        ``poison(images, labels, generator)`` may rewrite each batch; ``generator``
        is the poisoning's own stream (seeded from task and seed), not the data
        order's, so a poisoned fine-tune sees the same batches as the clean
        fine-tune of the same task and seed, whatever ``poison`` draws;
        ``loss(module, images, labels, step)`` replaces cross-entropy.
        Returns fine-tuned weights (not a task vector). Not cached: wrap in
        ``ctx.cached`` when the result is worth keeping.
        """

    def clean_finetune(self, task: str, seed: int | None = None) -> StateDict:
        """The shared, cached clean fine-tune of ``task`` (θ_k)."""

    def task_vector(self, task: str, seed: int | None = None) -> StateDict:
        """τ_k = θ_k − θ_pre of the shared clean fine-tune."""

    # evaluation -----------------------------------------------------------
    def accuracy(self, weights: StateDict, task: str, split: str = "test") -> float: ...

    def attack_success_rate(self, weights: StateDict, task: str, trigger: Trigger,
                            target_class: int, split: str = "test") -> float:
        """ASR as the evaluation protocol defines it (docs/architecture.md): target-class samples excluded."""

    # plumbing -------------------------------------------------------------
    def cached(self, kind: str, params: dict[str, Any],
               compute: Callable[[], tuple[StateDict, dict[str, Any]]],
               label: str | None = None) -> tuple[StateDict, dict[str, Any]]:
        """Run ``compute`` once per (kind, params, preset, seed, plugin version); keep its tensors and info.
        ``label`` names the stage in the run's log (default: ``kind`` and the start of ``params``)."""

    def checkpoint(self, tag: str) -> Any:
        """A resumable loop's checkpoint inside the current stage, or None outside one:
        ``.load()`` → (tensors, info) saved by a run that died, or None; ``.due()`` → time to
        save; ``.save(tensors, info)``. The store drops it once the stage is saved.
        (API version 2.)"""

    def generator(self, *salt: Any) -> torch.Generator:
        """A CPU generator seeded from the cell's seed and ``salt`` (reproducible, independent streams)."""

    def progress(self, iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable: ...

    def log(self, message: str) -> None: ...
