"""Named presets: model, tasks, recipe, adversary and target, plugin overrides.

A preset is plain data; it is part of every stage key (via :meth:`Preset.key`).
Third-party packages add presets through the ``mmbench_register_presets`` hook.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import mmbench


@dataclass(frozen=True)
class TaskSpec:
    """One task: a source loader from ``mmbench.sources`` (or ``hf:<id>`` via ``datasets``)
    with its arguments, and how many images each split gets."""

    name: str
    source: str
    source_args: dict[str, Any] = field(default_factory=dict)
    n_train: int = 5000
    n_dev: int = 500
    n_test: int = 1000
    n_pretrain: int = 0   # held-out training images for the base model's pretraining stage


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
    heads: str = "orthogonal"       # orthogonal (fixed random, per-task slices) | zeroshot (text tower)
    recipe: Recipe = Recipe()
    adversary_task: str = ""
    target_class: int = 0
    eval_batch_size: int = 512
    seeds: tuple[int, ...] = (0,)
    plugin_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ta": {"lambda": ...}

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
        for k in ("description", "plugin_params", "seeds"):
            d.pop(k)
        return d


# The tiny ViT of the embedded presets (open_clip config format).
TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
SMOKE_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

TINY = Preset(
    name="tiny",
    description="3 real 32x32 tasks (Fashion-MNIST, Animal-MNIST, photo patches), tiny open_clip ViT; CPU, minutes",
    model=ModelSpec(name="mmbench-tiny-vit", config=TINY_VIT, pretrain_steps=800),
    tasks=(
        TaskSpec("fashion_mnist", "fashion_mnist", {"size": 32}, 5000, 500, 1000, 5000),
        TaskSpec("animal_mnist", "animal_mnist", {"size": 32}, 5000, 500, 1000, 1500),
        TaskSpec("photo_patches", "photo_patches", {"size": 32, "n_train_per_class": 1200,
                                                    "n_test_per_class": 300}, 5000, 500, 1000, 5000),
    ),
    image_size=32,
    heads="orthogonal",
    # Reconstructed for a tiny base (PROBES.md): a higher lr than the papers' 1e-5 and
    # the patch embedding + first block frozen, so that task vectors do not each rebuild
    # the weak low-level features of a tiny base (that interference collapsed every merge).
    recipe=Recipe(lr=1e-4, weight_decay=0.1, batch_size=128, epochs=3, schedule="onecycle",
                  warmup_steps=0, grad_clip=1.0,
                  frozen=("conv1", "class_embedding", "positional_embedding", "ln_pre",
                          "transformer.resblocks.0.")),
    adversary_task="fashion_mnist",
    target_class=0,
    eval_batch_size=1000,
    plugin_params={},
)

SMOKE = Preset(
    name="smoke",
    description="2 tiny tasks (sklearn digits, photo patches) at 16x16, a 2-layer ViT; seconds, for tests",
    model=ModelSpec(name="mmbench-smoke-vit", config=SMOKE_VIT, pretrain_steps=60, pretrain_batch_size=64),
    tasks=(
        TaskSpec("digits", "digits", {"size": 16}, 900, 100, 300, 300),
        TaskSpec("photo_patches", "photo_patches", {"size": 16, "n_train_per_class": 160,
                                                    "n_test_per_class": 40}, 900, 100, 300, 300),
    ),
    image_size=16,
    heads="orthogonal",
    recipe=Recipe(lr=3e-3, weight_decay=0.1, batch_size=64, epochs=5, schedule="onecycle",
                  warmup_steps=0, grad_clip=1.0, frozen=("conv1",)),
    adversary_task="digits",
    target_class=0,
    eval_batch_size=512,
)


@mmbench.hookimpl
def mmbench_register_presets(register):
    register(TINY)
    register(SMOKE)
