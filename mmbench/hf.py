"""Image-classification tasks from the Hugging Face ``datasets`` library (paper presets).

A :class:`~mmbench.presets.TaskSpec` with ``source="hf"`` names a dataset in
``source_args``::

    {"path": "tanganke/cifar100", "revision": "<commit sha>",   # hub id, pinned
     "name": None,                                              # dataset config, if any
     "train_split": "train", "test_split": "test",
     "image_column": "image", "label_column": "label"}

``path`` is anything :func:`datasets.load_dataset` takes: a hub id, a local
folder, or a packaged builder with local files, which is how a dataset works
offline::

    {"path": "parquet", "data_files": {"train": "train.parquet", "test": "test.parquet"}}
    {"path": "imagefolder", "data_dir": "/data/my_task"}        # <class>/<image> folders

Optional keys: ``class_names`` (a list replacing the ClassLabel names),
``rename`` ({raw name: prompt name}, e.g. CIFAR-100's ``cra`` → ``crab``),
``template_family`` (see :mod:`mmbench.zeroshot`). ``$MMBENCH_HF_CACHE``
sets the ``datasets`` cache folder (default: the library's own); with
``HF_DATASETS_OFFLINE=1`` a hub dataset loads from that cache without the network.

The ``data[task]`` stage stores only which rows form each split (int64 row
indices into the source's train and test splits) plus, in its info, the class
names, the dataset id, the requested revision, the commit it resolved to (when
the hub was reachable) and the ``datasets`` fingerprints. Images stay in the
``datasets`` cache and are decoded and transformed on the fly by
:class:`HFTaskData` with open_clip's train / val transforms.

Splits (``SPLIT_SEED``, independent of the cell seed): the source's train split
is permuted once; ``dev`` takes the first ``n_dev`` rows (``None``: 10 % of the
train split, at most 5000, the BadMerging dev split), ``pretrain`` the next
``n_pretrain``, ``train`` the next ``n_train`` (``None``: all the rest);
``test`` is the whole test split (``n_test=None``) or a seeded subset.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from .data import SPLIT_SEED, DataError
from .presets import Preset, TaskSpec

DEV_FRACTION = 0.1
DEV_MAX = 5000
KNOWN_ARGS = {"path", "name", "revision", "data_files", "data_dir", "train_split", "test_split",
              "image_column", "label_column", "class_names", "rename", "template_family"}
BUILDERS = {"parquet", "imagefolder", "arrow", "csv", "json", "webdataset"}

# Rough (train, test) split sizes of the paper presets' datasets, for `mmbench plan`'s
# estimates only (taken from dataset cards / the original datasets; not checked here).
SIZE_HINTS: dict[str, tuple[int, int]] = {
    "tanganke/cifar100": (50000, 10000),
    "tanganke/gtsrb": (26640, 12630),
    "tanganke/eurosat": (21600, 2700),
    "tanganke/stanford_cars": (8144, 8041),
    "tanganke/sun397": (19850, 19850),
    "timm/oxford-iiit-pet": (3680, 3669),
    "tanganke/resisc45": (18900, 6300),
    "ufldl-stanford/svhn": (73257, 26032),
    "ylecun/mnist": (60000, 10000),
    "tanganke/dtd": (3760, 1880),
    "clane9/imagenet-100": (126689, 5000),
}


@dataclass(frozen=True)
class Columns:
    train_split: str
    test_split: str
    image: str
    label: str


def _args(spec: TaskSpec) -> dict[str, Any]:
    args = dict(spec.source_args or {})
    unknown = sorted(set(args) - KNOWN_ARGS)
    if unknown:
        raise DataError(f"task {spec.name!r}: unknown hf source_args {unknown}; known: {', '.join(sorted(KNOWN_ARGS))}")
    if not args.get("path"):
        raise DataError(f"task {spec.name!r}: hf source needs source_args['path'] (a hub id, folder or builder)")
    return args


def columns(spec: TaskSpec) -> Columns:
    a = spec.source_args or {}
    return Columns(a.get("train_split", "train"), a.get("test_split", "test"),
                   a.get("image_column", "image"), a.get("label_column", "label"))


def is_hub_id(path: str) -> bool:
    return path not in BUILDERS and not os.path.exists(path) and not path.startswith((".", "/", "~"))


def _local_files(args: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, path) of every local file or folder the source args name (globs and URLs left out)."""
    out: list[tuple[str, str]] = []
    path = str(args["path"])
    local = path not in BUILDERS and not is_hub_id(path)
    if local:
        out.append(("dataset path", path))
    base = os.path.expanduser(path) if local and os.path.isdir(os.path.expanduser(path)) else ""
    if args.get("data_dir") and (local or path in BUILDERS):
        out.append(("data_dir", os.path.join(base, str(args["data_dir"]))))
    files = args.get("data_files")
    entries = (list(files.values()) if isinstance(files, dict) else [files]) if files else []
    for entry in entries:
        for f in (entry if isinstance(entry, (list, tuple)) else [entry]):
            if isinstance(f, str) and not re.search(r"[*?\[]|://", f):
                out.append(("data file", os.path.join(base, f)))
    return out


def check_local_paths(spec: TaskSpec) -> None:
    """A :class:`~mmbench.data.DataError` of one line when a local dataset path, data_dir or
    data file of the task is missing or cannot be read (before ``datasets`` turns it into a
    long error or a hub look-up)."""
    for what, path in _local_files(_args(spec)):
        full = os.path.expanduser(path)
        try:
            os.stat(full)
        except FileNotFoundError:
            raise DataError(f"task {spec.name!r}: {what} {path} does not exist") from None
        except OSError:
            pass  # a folder on the way that cannot be searched: said below
        try:
            if os.path.isdir(full):
                os.listdir(full)
            else:
                with open(full, "rb") as f:
                    f.read(1)
        except OSError as exc:
            raise DataError(f"task {spec.name!r}: {what} {path} cannot be read: {exc.strerror or exc}") from None


def load_splits(spec: TaskSpec) -> dict[str, Any]:
    """The source's train and test splits as :class:`datasets.Dataset` (memory-mapped arrow)."""
    import datasets

    args = _args(spec)
    check_local_paths(spec)
    cols = columns(spec)
    kwargs: dict[str, Any] = {"cache_dir": os.environ.get("MMBENCH_HF_CACHE") or None}
    for key in ("name", "data_files", "data_dir", "revision"):
        if args.get(key) is not None:
            kwargs[key] = args[key]
    where = f"{args['path']}" + (f"@{args['revision']}" if args.get("revision") else "")
    try:
        loaded = datasets.load_dataset(args["path"], **kwargs)
    except Exception as exc:  # network, missing files, bad revision: one line for the user
        hint = (" (no network? set HF_DATASETS_OFFLINE=1 with a filled cache, or point the task at local "
                "parquet/imagefolder files; docs/presets.md)") if is_hub_id(args["path"]) else ""
        raise DataError(f"task {spec.name!r}: cannot load {where}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
    out = {}
    for split in (cols.train_split, cols.test_split):
        if split not in loaded:
            raise DataError(f"task {spec.name!r}: {where} has no split {split!r} (has {sorted(loaded)})")
        ds = loaded[split]
        missing = {cols.image, cols.label} - set(ds.column_names)
        if missing:
            raise DataError(f"task {spec.name!r}: {where} split {split!r} lacks columns {sorted(missing)} "
                            f"(has {ds.column_names}); set image_column / label_column")
        out[split] = ds.select_columns([cols.image, cols.label])
    return out


def resolve_revision(spec: TaskSpec) -> str | None:
    """The commit a hub dataset's revision points at (None offline or for local data)."""
    args = spec.source_args or {}
    if not is_hub_id(args.get("path", "")) or os.environ.get("HF_HUB_OFFLINE") == "1" \
            or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(args["path"], revision=args.get("revision")).sha
    except Exception:
        return None


def prompt_name(raw: str) -> str:
    """A class name as it goes into prompts: ``maple_tree`` → ``maple tree``, ``SeaLake`` → ``sea lake``."""
    name = raw.replace("_", " ").strip()
    if " " not in name and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
    return name


def class_names(spec: TaskSpec, train_split) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prompt names, raw names) from ``source_args['class_names']`` or the label column's ClassLabel."""
    import datasets

    args = spec.source_args or {}
    label = columns(spec).label
    if args.get("class_names"):
        raw = tuple(str(c) for c in args["class_names"])
    else:
        feature = train_split.features[label]
        if not isinstance(feature, datasets.ClassLabel):
            raise DataError(f"task {spec.name!r}: label column {label!r} is {type(feature).__name__}, not a "
                            f"ClassLabel; cast it or give source_args['class_names']")
        raw = tuple(feature.names)
    rename = args.get("rename") or {}
    return tuple(prompt_name(rename.get(c, c)) for c in raw), raw


def _labels(ds, column: str) -> np.ndarray:
    return np.asarray(ds.data.column(column).to_numpy(zero_copy_only=False), dtype=np.int64)


def split_indices(spec: TaskSpec, n_source_train: int, n_source_test: int) -> dict[str, np.ndarray]:
    """Sorted row indices of every split (see the module docstring for the policy)."""
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(n_source_train)
    n_dev = spec.n_dev if spec.n_dev is not None else min(DEV_MAX, int(round(DEV_FRACTION * n_source_train)))
    n_pre = spec.n_pretrain or 0
    n_train = spec.n_train if spec.n_train is not None else n_source_train - n_dev - n_pre
    if min(n_dev, n_pre, n_train) < 0 or n_dev + n_pre + n_train > n_source_train:
        raise DataError(f"task {spec.name!r}: source train split has {n_source_train} rows, preset asks "
                        f"dev {n_dev} + pretrain {n_pre} + train {n_train}")
    n_test = spec.n_test if spec.n_test is not None else n_source_test
    if n_test > n_source_test:
        raise DataError(f"task {spec.name!r}: source test split has {n_source_test} rows, preset asks {n_test}")
    cuts = np.cumsum([n_dev, n_pre, n_train])
    parts = dict(zip(("dev", "pretrain", "train"), np.split(order[:cuts[-1]], cuts[:-1])))
    parts["test"] = (np.arange(n_source_test) if spec.n_test is None
                     else rng.permutation(n_source_test)[:n_test])
    return {k: np.sort(v).astype(np.int64) for k, v in parts.items() if len(v) or k != "pretrain"}


def data_stage(spec: TaskSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What the ``data[task]`` stage stores for an hf task: split row indices and provenance."""
    cols = columns(spec)
    splits = load_splits(spec)
    train, test = splits[cols.train_split], splits[cols.test_split]
    names, raw = class_names(spec, train)
    for split, ds in ((cols.train_split, train), (cols.test_split, test)):
        labels = _labels(ds, cols.label)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"task {spec.name!r}: split {split!r} has labels outside 0..{len(names) - 1}")
    indices = split_indices(spec, len(train), len(test))
    args = spec.source_args
    info = {
        "class_names": list(names),
        "raw_class_names": list(raw),
        "source": {
            "kind": "hf", "path": args["path"], "name": args.get("name"), "revision": args.get("revision"),
            "resolved_revision": resolve_revision(spec),
            "data_files": args.get("data_files"), "data_dir": args.get("data_dir"),
            "fingerprints": {cols.train_split: train._fingerprint, cols.test_split: test._fingerprint},
            "rows": {cols.train_split: len(train), cols.test_split: len(test)},
        },
        "sizes": {k: int(len(v)) for k, v in indices.items()},
    }
    return {f"{k}.indices": torch.from_numpy(v) for k, v in indices.items()}, info


class _Rows(torch.utils.data.Dataset):
    """Rows of a ``datasets`` split, decoded and transformed (runs inside DataLoader workers)."""

    def __init__(self, ds, rows: list[int], transform, image: str, label: str) -> None:
        self.ds, self.rows, self.transform, self.image, self.label = ds, rows, transform, image, label

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.ds[self.rows[i]]
        return self.transform(row[self.image].convert("RGB")), int(row[self.label])


def default_workers(device: torch.device | str | None) -> int:
    """DataLoader workers: ``$MMBENCH_NUM_WORKERS``, else min(8, CPUs) on CUDA and 0 (in-process) on the CPU."""
    env = os.environ.get("MMBENCH_NUM_WORKERS")
    if env:
        return max(0, int(env))
    if device is not None and torch.device(device).type == "cuda":
        return min(8, os.cpu_count() or 1)
    return 0


class HFTaskData:
    """A task whose images are decoded and transformed lazily from a ``datasets`` split.

    ``batches()`` streams through a torch DataLoader (``num_workers`` processes,
    ``pin_memory`` on CUDA); batches of the ``train`` split use open_clip's
    training transform (RandomResizedCrop 0.9–1, as the papers' fine-tuning),
    every other split and :meth:`tensors` the evaluation transform (resize,
    centre crop). Both normalise with the preset's mean/std, so triggers are
    pasted in the same normalised space as for the in-memory tasks.

    :meth:`tensors` materialises a whole split as one float tensor: meant for
    small splits and tests (a 45 000-image train split at 224 px is 27 GB).
    """

    def __init__(self, name: str, spec: TaskSpec, class_names: tuple[str, ...], indices: dict[str, torch.Tensor],
                 mean, std, image_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                 augment_train: bool = True) -> None:
        self.name = name
        self.spec = spec
        self.class_names = tuple(class_names)
        self._indices = {k: v.long() for k, v in indices.items()}
        self._mean = torch.tensor(mean).view(-1, 1, 1)
        self._std = torch.tensor(std).view(-1, 1, 1)
        self._mean_tuple, self._std_tuple = tuple(mean), tuple(std)
        self.image_size = image_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.augment_train = augment_train
        self._splits: dict[str, Any] | None = None
        self._transforms: dict[bool, Any] = {}
        self._materialised: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_stage(cls, name: str, spec: TaskSpec, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   preset: Preset, device: torch.device | str | None = None) -> "HFTaskData":
        indices = {k[:-len(".indices")]: v for k, v in tensors.items() if k.endswith(".indices")}
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(name, spec, tuple(info["class_names"]), indices, preset.mean, preset.std, preset.image_size,
                   num_workers=default_workers(dev), pin_memory=dev.type == "cuda")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def size(self, split: str) -> int:
        return int(self._index(split).shape[0])

    def valid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of normalised pixel values, shaped (C, 1, 1)."""
        return (0 - self._mean) / self._std, (1 - self._mean) / self._std

    def _index(self, split: str) -> torch.Tensor:
        if split not in self._indices:
            raise KeyError(f"task {self.name!r} has no split {split!r} (has {sorted(self._indices)})")
        return self._indices[split]

    def _source(self, split: str):
        if self._splits is None:
            self._splits = load_splits(self.spec)
        cols = columns(self.spec)
        return self._splits[cols.test_split if split == "test" else cols.train_split]

    def transform(self, train: bool):
        if train not in self._transforms:
            import open_clip

            self._transforms[train] = open_clip.image_transform(self.image_size, is_train=train,
                                                                mean=self._mean_tuple, std=self._std_tuple)
        return self._transforms[train]

    def _loader(self, split: str, rows: torch.Tensor, batch_size: int, train_transform: bool):
        cols = columns(self.spec)
        view = _Rows(self._source(split), rows.tolist(), self.transform(train_transform), cols.image, cols.label)
        return torch.utils.data.DataLoader(view, batch_size=batch_size, shuffle=False,
                                           num_workers=self.num_workers, pin_memory=self.pin_memory)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._index(split)
        n = index.shape[0] if limit is None else min(limit, index.shape[0])
        order = torch.randperm(index.shape[0], generator=generator)[:n] if shuffle else torch.arange(n)
        train_transform = self.augment_train and split == "train"
        yield from self._loader(split, index[order], batch_size, train_transform)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, evaluation-transformed (small splits only: it stays in memory)."""
        if split not in self._materialised:
            xs, ys = [], []
            for x, y in self._loader(split, self._index(split), 256, train_transform=False):
                xs.append(x)
                ys.append(y)
            c = len(self._mean_tuple)
            self._materialised[split] = (torch.cat(xs) if xs else torch.empty(0, c, self.image_size, self.image_size),
                                         torch.cat(ys) if ys else torch.empty(0, dtype=torch.long))
        return self._materialised[split]
