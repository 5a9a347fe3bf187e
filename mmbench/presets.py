"""Named presets: model, tasks, recipe, adversary and target, plugin overrides.

A preset is plain data; it is part of every stage key (via :meth:`Preset.key`).
This module holds the classes; the built-in presets are in :mod:`mmbench.catalogue`, which
registers them through the ``mmbench_register_presets`` hook exactly as a third-party
package registers its own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any



@dataclass(frozen=True)
class TaskSpec:
    """One task: a source loader from ``mmbench.sources`` (or ``source="hf"``: a ``datasets``
    dataset, see ``mmbench.hf``) with its arguments, and how many images each split gets.

    For ``hf`` tasks a count may be None: ``n_train`` all the training rows the dev
    split leaves, ``n_dev`` 10 % of the source's train split (≤ 5000), ``n_test`` the
    whole test split. ``epochs`` overrides the preset recipe's epochs for this task.
    """

    name: str
    source: str
    source_args: dict[str, Any] = field(default_factory=dict)
    n_train: int | None = 5000
    n_dev: int | None = 500
    n_test: int | None = 1000
    n_pretrain: int = 0   # held-out training images for the base model's pretraining stage
    epochs: float | None = None   # per-task fine-tuning epochs (paper presets); None: recipe.epochs


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip model. ``config`` registers a custom architecture under ``name``;
    ``pretrained`` is None (random init, then the preset's pretraining stage),
    an open_clip tag such as 'openai', or a local checkpoint path."""

    name: str
    config: dict[str, Any] | None = None
    pretrained: str | None = None
    pretrain_steps: int = 0         # CLIP-style contrastive pretraining of the base (tiny presets)
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 128
    # which classes the pretraining captions name: "all", or "even" (classes 0, 2, 4, ... of each
    # task; the others' images are captioned with their task's concept only, "a photo of a
    # handwritten digit."), so that the base knows every task's images but only some of their
    # class names, as CLIP's zero-shot accuracy is far from its fine-tuned accuracy
    pretrain_named: str = "all"

    def key(self) -> dict[str, Any]:
        """The spec as keyed: a field left at its default of before it existed is left out."""
        d = asdict(self)
        if d.get("pretrain_named") == "all":
            d.pop("pretrain_named")
        return d


@dataclass(frozen=True)
class Recipe:
    """The one fine-tuning recipe (clean and backdoored fine-tunes share it)."""

    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 128
    epochs: float = 1.0
    schedule: str = "cosine"        # cosine (with warm-up) | onecycle
    warmup_steps: int = 500
    grad_clip: float = 1.0
    frozen: tuple[str, ...] = ()    # parameter-name prefixes kept at θ_pre


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelSpec
    tasks: tuple[TaskSpec, ...]
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # orthogonal (fixed random, per-task slices) | zeroshot (text tower) | base (the class
    # embeddings shipped in the model's base file, see `mmbench pretrain`)
    heads: str = "orthogonal"
    recipe: Recipe = Recipe()
    adversary_task: str = ""
    target_class: int = 0
    eval_batch_size: int = 512
    # the seeds a plain `mmbench run` computes and the leaderboard expects (not part of any key:
    # each stage that depends on a seed has the seed in its own key)
    seeds: tuple[int, ...] = (0,)
    plugin_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ta": {"lambda": ...}
    # plugins this preset's default cross product leaves out: they run when named (``--defense
    # awm``) and the leaderboard shows, but does not require, their cells (not part of any key,
    # so moving a plugin in or out of the default run keeps every stored cell current)
    opt_in: tuple[str, ...] = ()

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def key(self) -> dict[str, Any]:
        """Everything that changes what the base model, data and fine-tunes are."""
        d = asdict(self)
        d["model"] = self.model.key()
        for k in ("description", "plugin_params", "seeds", "opt_in"):
            d.pop(k)
        for task in d["tasks"]:  # an unset per-task epochs leaves keys as before the field existed
            if task.get("epochs") is None:
                task.pop("epochs", None)
        return d


def __getattr__(name: str):
    """The built-in presets (TINY, SMOKE, the paper presets) live in :mod:`mmbench.catalogue`,
    registered through the same hook as a third-party package's; reachable here as before."""
    from . import catalogue

    try:
        return getattr(catalogue, name)
    except AttributeError:
        raise AttributeError(f"module 'mmbench.presets' has no attribute {name!r}") from None
