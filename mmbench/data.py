"""Datasets → normalised tensors and splits.

A preset's task names a source (``mmbench.sources``: real data installed from
the package registries) and split sizes. The training images are shuffled
once with a fixed seed (independent of the cell seed, so every seed sees the
same data) and cut into disjoint ``train``, ``dev`` and ``pretrain`` parts;
``test`` comes from the source's test set. Images are kept as uint8 (N, C, H,
W) and normalised with the preset's mean/std when a split is first used;
triggers are pasted in that normalised space.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .presets import Preset, TaskSpec

SPLITS = ("train", "dev", "test", "pretrain")
from .keys import DATA_FORMAT, SPLIT_SEED  # noqa: E402,F401  (part of the data keys)


class DataError(Exception):
    """The data a preset needs is missing or malformed (one line for the user)."""


def load_raw_splits(spec: TaskSpec) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and uint8 NHWC images + int64 labels for every split of ``spec``."""
    from . import sources

    if spec.source not in sources.SOURCES:
        raise DataError(f"task {spec.name!r}: unknown source {spec.source!r}; "
                        f"known: hf, {', '.join(sorted(sources.SOURCES))}")
    try:
        raw = sources.SOURCES[spec.source](**spec.source_args)
    except sources.SourceError as exc:
        raise DataError(str(exc)) from None
    need = spec.n_train + spec.n_dev + spec.n_pretrain
    if len(raw.train_labels) < need or len(raw.test_labels) < spec.n_test:
        raise DataError(f"task {spec.name!r}: source has {len(raw.train_labels)} train / "
                        f"{len(raw.test_labels)} test images, preset asks {need} / {spec.n_test}")
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(raw.train_labels))
    cuts = np.cumsum([spec.n_train, spec.n_dev, spec.n_pretrain])
    parts = dict(zip(("train", "dev", "pretrain"), np.split(order[:cuts[-1]], cuts[:-1])))
    test_order = rng.permutation(len(raw.test_labels))[:spec.n_test]
    out = {name: (raw.train_images[idx], raw.train_labels[idx]) for name, idx in parts.items()}
    out["test"] = (raw.test_images[test_order], raw.test_labels[test_order])
    return tuple(raw.class_names), out


class InMemoryTaskData:
    """A task whose splits fit in memory (the embedded presets)."""

    def __init__(self, name: str, class_names: tuple[str, ...], images: dict[str, torch.Tensor],
                 labels: dict[str, torch.Tensor], mean, std) -> None:
        self.name = name
        self.class_names = tuple(class_names)
        self._images = images      # uint8 (N, C, H, W)
        self._labels = labels
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self._normalised: dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def size(self, split: str) -> int:
        return int(self._labels[split].shape[0])

    def valid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of normalised pixel values, shaped (C, 1, 1)."""
        return ((0 - self._mean) / self._std)[0], ((1 - self._mean) / self._std)[0]

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._images:
            raise KeyError(f"task {self.name!r} has no split {split!r} (has {sorted(self._images)})")
        if split not in self._normalised:
            x = self._images[split].float().div_(255)
            self._normalised[split] = (x - self._mean) / self._std
        return self._normalised[split], self._labels[split]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.tensors(split)
        n = x.shape[0] if limit is None else min(limit, x.shape[0])
        order = torch.randperm(x.shape[0], generator=generator)[:n] if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def to_tensors(class_names: tuple[str, ...], splits: dict[str, tuple[np.ndarray, np.ndarray]],
               prefix: str = "") -> dict[str, torch.Tensor]:
    """uint8 NCHW image tensors and int64 labels, keyed ``{prefix}{split}.images|labels``."""
    out = {}
    for split, (images, labels) in splits.items():
        out[f"{prefix}{split}.images"] = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        out[f"{prefix}{split}.labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return out


def from_tensors(name: str, class_names: tuple[str, ...], tensors: dict[str, torch.Tensor],
                 preset: Preset) -> InMemoryTaskData:
    images = {k.split(".")[0]: v for k, v in tensors.items() if k.endswith(".images")}
    labels = {k.split(".")[0]: v for k, v in tensors.items() if k.endswith(".labels")}
    return InMemoryTaskData(name, class_names, images, labels, preset.mean, preset.std)


def stage(spec: TaskSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """What the ``data[task]`` stage stores: uint8 images of a ``mmbench.sources`` task, or
    split row indices and provenance of an ``hf`` task (``mmbench.hf``, images stay in its cache)."""
    if spec.source == "hf":
        from . import hf
        return hf.data_stage(spec)
    names, splits = load_raw_splits(spec)
    return to_tensors(names, splits), {"class_names": list(names)}


def task_data(name: str, spec: TaskSpec, tensors: dict[str, torch.Tensor], info: dict, preset: Preset,
              device: torch.device | None = None):
    """The :class:`~mmbench.api.TaskData` of a loaded ``data[task]`` stage."""
    if spec.source == "hf":
        from . import hf
        return hf.HFTaskData.from_stage(name, spec, tensors, info, preset, device=device)
    return from_tensors(name, tuple(info["class_names"]), tensors, preset)
