"""Small *real* image datasets, installed from package registries, as raw uint8 arrays.

Every loader here reads data that an ordinary package manager has already put
on disk; nothing is downloaded at run time.  Each returns a :class:`RawTask`
whose images are ``uint8`` arrays of shape ``(N, size, size, 3)`` (grey images
are replicated to three channels) and whose labels are ``int64`` in
``0 .. len(class_names) - 1``.  All loaders are deterministic given their
arguments.

Sources and licences
--------------------
``fashion_mnist``
    Fashion-MNIST (Xiao, Rasul & Vollgraf, Zalando Research, 2017), MIT
    licence.  Read from the gzipped IDX files installed by the Debian package
    ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
``animal_mnist``
    Animal-MNIST / "Animal-Shape" silhouettes (Sina Mohammadi, 2025), MIT
    licence, shipped inside the PyPI package ``animal-mnist``
    (``pip install animal-mnist``).
``photo_patches``
    Crops of colour photographs bundled in the scikit-image wheel
    (``skimage.data``) and in scikit-learn (``sklearn.datasets.load_sample_images``).
    As documented by those packages: astronaut, hubble_deep_field (NASA) and
    rocket (SpaceX) are public domain; chelsea, coffee and retina are CC0;
    immunohistochemistry has "no known copyright restrictions"; china and flower
    are CC BY 2.0 (Flickr users danielbuechele and vultilion).  The motorcycle
    photo is the left view of the Middlebury 2014 stereo benchmark (Scharstein
    et al.), redistributed by scikit-image, which states no separate licence
    for it -- see ``PHOTO_NAMES`` if that matters for your use.
``texture_patches``
    Crops of ten grey images bundled in the scikit-image wheel that
    ``photo_patches`` does not use (``TEXTURE_NAMES``).  As documented by
    scikit-image: brick, grass and gravel (CC0Textures), camera and cell are
    CC0; clock is public domain; coins and text have "no known copyright
    restrictions"; for moon and page scikit-image states no licence.
``font_letters``
    The capital letters A-J rendered from the TrueType fonts that matplotlib's
    wheel ships (DejaVu: Bitstream Vera / public-domain changes; STIX: SIL OFL
    1.1; Computer Modern (BaKoMa): Knuth's licence), with random size, place,
    rotation, stroke and contrast.
``digits``
    scikit-learn's copy of the UCI optical recognition of handwritten digits
    test set (8x8, CC BY 4.0 on the UCI repository; 1,797 images).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RawTask",
    "SourceError",
    "fashion_mnist",
    "animal_mnist",
    "photo_patches",
    "texture_patches",
    "font_letters",
    "digits",
    "resize_uint8",
    "SOURCES",
    "PHOTO_NAMES",
    "TEXTURE_NAMES",
    "LETTERS",
]


class SourceError(Exception):
    """A dataset is missing or unreadable; the message says how to get it."""


@dataclass(frozen=True, eq=False)
class RawTask:
    """A classification task as raw arrays.

    ``eq=False``: comparing/hashing numpy fields element-wise is meaningless,
    so instances compare and hash by identity.
    """

    name: str
    class_names: tuple[str, ...]
    train_images: np.ndarray  # uint8, (N, H, W, 3)
    train_labels: np.ndarray  # int64, (N,)
    test_images: np.ndarray  # uint8, (M, H, W, 3)
    test_labels: np.ndarray  # int64, (M,)

    def __post_init__(self) -> None:
        k = len(self.class_names)
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"{self.name}: {split}_images must be uint8 (N,H,W,3), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split}_labels must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= k):
                raise ValueError(f"{self.name}: {split}_labels outside 0..{k - 1}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"{self.name}: train/test image shapes differ")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------- #
# resizing
# --------------------------------------------------------------------------- #

_RESIZE_CHUNK = 8192


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a batch of uint8 images to ``(N, size, size, 3)`` uint8.

    ``images`` is ``(N, h, w)`` or ``(N, h, w, c)`` with ``c`` in {1, 3}; grey
    images are resized on one channel and then replicated to three.  Uses
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` in chunks (antialiasing only matters when shrinking; it is
    a no-op for upsampling).  Values are rounded and clipped back to 0..255.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"resize_uint8 expects uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"resize_uint8 expects (N,h,w) or (N,h,w,1|3), got {images.shape}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    n, h, w, c = images.shape
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if (h, w) == (size, size):
        out[...] = images  # broadcasts a grey channel to three
        return out
    for i in range(0, n, _RESIZE_CHUNK):
        # dtype conversion and rounding are done in numpy: torch's small
        # element-wise kernels are very slow on a busy, oversubscribed CPU.
        x = torch.from_numpy(images[i : i + _RESIZE_CHUNK].astype(np.float32)).permute(0, 3, 1, 2)
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        y = y.permute(0, 2, 3, 1).numpy()
        np.clip(np.rint(y, out=y), 0, 255, out=y)  # rint: round half to even, like torch.round
        out[i : i + _RESIZE_CHUNK] = y  # (.., 1) broadcasts to 3 channels
    return out


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split; returns (train_idx, test_idx), each shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


def _drop_exact_duplicates(images: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first occurrence of every byte-identical image (original order)."""
    flat = images.reshape(len(images), -1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if np.any(labels != labels[first][inverse]):
        raise SourceError(f"{name}: identical images carry different labels; the data file looks corrupt")
    keep = np.sort(first)
    return images[keep], labels[keep]


# --------------------------------------------------------------------------- #
# Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------- #

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzipped IDX file holding unsigned bytes; check magic and length."""
    try:
        raw = gzip.decompress(path.read_bytes())  # one-shot: faster than streaming
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{path}: not a readable gzip file ({e})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise SourceError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise SourceError(f"{path}: IDX payload is {len(raw) - header} bytes, header says {expected - header}")
    # bytearray -> a writable array (torch warns on read-only numpy buffers)
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist(root: str = FASHION_MNIST_ROOT, size: int = 32) -> RawTask:
    """Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey clothing images, 10 classes.

    Source: Zalando Research (Xiao et al., 2017), MIT licence, installed by the
    Debian package ``dataset-fashion-mnist`` as gzipped IDX files in ``root``.
    The official train/test split is kept (it has no byte-identical images in
    common).  Images are resized to ``size`` and replicated to 3 channels.
    """
    rootp = Path(root)
    files = {
        "train_x": ("train-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC),
        "train_y": ("train-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC),
        "test_x": ("t10k-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC),
        "test_y": ("t10k-labels-idx1-ubyte.gz", _IDX_LABELS_MAGIC),
    }
    missing = [fn for fn, _ in files.values() if not (rootp / fn).is_file()]
    if missing:
        raise SourceError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    arr = {k: _read_idx(rootp / fn, magic) for k, (fn, magic) in files.items()}
    for split in ("train", "test"):
        x, y = arr[f"{split}_x"], arr[f"{split}_y"]
        if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
            raise SourceError(f"Fashion-MNIST {split}: images {x.shape} do not match labels {y.shape}")
        if y.size and y.max() >= len(FASHION_MNIST_CLASSES):
            raise SourceError(f"Fashion-MNIST {split}: label {int(y.max())} out of range")
    return RawTask(
        name="fashion_mnist",
        class_names=FASHION_MNIST_CLASSES,
        train_images=resize_uint8(arr["train_x"], size),
        train_labels=arr["train_y"].astype(np.int64),
        test_images=resize_uint8(arr["test_x"], size),
        test_labels=arr["test_y"].astype(np.int64),
    )


# --------------------------------------------------------------------------- #
# Animal-MNIST (PyPI package animal-mnist)
# --------------------------------------------------------------------------- #

# The package README: "10 classes of animals (including Bear, Bird, Cat, Cow,
# Dog, Elephant, Giraffe, Horse, Sheep, Zebra) each consisting of 1000
# pictures".  Labels 0..9 follow that (alphabetical) order; spot checks agree
# (class 6 has a long vertical neck = giraffe, class 5 a trunk = elephant).
ANIMAL_MNIST_CLASSES = (
    "bear", "bird", "cat", "cow", "dog",
    "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip

_ANIMAL_DATA = "animal_data_version_3.gz"
_ANIMAL_LABELS = "animal_label_version_3.gz"


def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2: the real module; numpy.core is a deprecated alias
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else."""

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}") from None


def _load_numpy_pickle_gz(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise SourceError(f"{path}: cannot read as a gzipped numpy pickle ({e})") from None
    if not isinstance(obj, np.ndarray):
        raise SourceError(f"{path}: expected a numpy array, got {type(obj).__name__}")
    return obj


def _animal_mnist_dir() -> Path:
    # find_spec on a top-level package locates it without executing its
    # __init__ (and never touches animal_mnist.dataset_Loader, which imports
    # tensorflow).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("animal-mnist not installed: run ./install.sh or `pip install --no-deps animal-mnist`")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data" / "Animal_MNIST"
        if (d / _ANIMAL_DATA).is_file() and (d / _ANIMAL_LABELS).is_file():
            return d
    raise SourceError(
        f"animal-mnist is installed but its data files ({_ANIMAL_DATA}, {_ANIMAL_LABELS}) are missing: "
        "reinstall it with `pip install --force-reinstall animal-mnist`"
    )


def animal_mnist(size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> RawTask:
    """Animal-MNIST: 28x28 animal silhouettes, 10 classes x 1,000 images.

    Source: PyPI package ``animal-mnist`` (Sina Mohammadi, 2025), MIT licence;
    read from the gzipped pickles it ships, with a numpy-only unpickler and
    without importing the package's loader (which needs tensorflow).

    What the files hold (version 3): ``uint8`` images ``(10000, 28, 28)``
    already in 0..255 with a bright (255) silhouette on a dark (0)
    background, like MNIST -- so no inversion; labels ``int64`` ``(10000,)``
    sorted by class, 1,000 each.  284 images occur twice (always with the same
    label); the second copies are dropped before splitting so that no image
    is in both train and test, leaving 9,716 images.  The split is stratified
    and deterministic given ``seed`` and ``test_fraction``.
    """
    d = _animal_mnist_dir()
    x = _load_numpy_pickle_gz(d / _ANIMAL_DATA)
    y = _load_numpy_pickle_gz(d / _ANIMAL_LABELS)
    if x.ndim != 3 or y.shape != (x.shape[0],):
        raise SourceError(f"animal-mnist: unexpected shapes images {x.shape}, labels {y.shape}")
    if x.dtype != np.uint8:  # not the case for version 3; kept for robustness
        xf = x.astype(np.float64)
        if xf.max() <= 1.0:
            xf = xf * 255.0
        x = np.clip(np.rint(xf), 0, 255).astype(np.uint8)
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= len(ANIMAL_MNIST_CLASSES):
        raise SourceError(f"animal-mnist: labels outside 0..{len(ANIMAL_MNIST_CLASSES) - 1}")
    x, y = _drop_exact_duplicates(x, y, "animal-mnist")
    tr, te = _stratified_split(y, test_fraction, seed)
    return RawTask(
        name="animal_mnist",
        class_names=ANIMAL_MNIST_CLASSES,
        train_images=resize_uint8(x[tr], size),
        train_labels=y[tr],
        test_images=resize_uint8(x[te], size),
        test_labels=y[te],
    )


# --------------------------------------------------------------------------- #
# photo_patches (skimage.data + sklearn sample images)
# --------------------------------------------------------------------------- #

PHOTO_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "motorcycle", "china", "flower",
)  # fmt: skip

_TRAIN_WIDTH_FRACTION = 0.7
_MIN_CROP_STD = 4.0  # reject near-constant crops (black retina corners, empty sky)
_MAX_TRIES_PER_CROP = 50


def _load_photo(name: str) -> np.ndarray:
    """One bundled colour photo as uint8 (H, W, 3); never touches the network."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{name}.jpg")
        else:
            import skimage.data

            img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    except Exception as e:  # noqa: BLE001 -- any failure means the bundled file is unavailable
        raise SourceError(
            f"photo '{name}' could not be loaded from scikit-image/scikit-learn ({type(e).__name__}: {e}): "
            "install them with `pip install scikit-image scikit-learn`"
        ) from None
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SourceError(f"photo '{name}': expected uint8 (H,W,3), got {img.dtype} {img.shape}")
    return img


def _sample_crop_boxes(
    img: np.ndarray, n: int, x_lo: int, x_hi: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` square boxes (y0, x0, side) lying entirely inside columns [x_lo, x_hi).

    Side is uniform in [min(h,w)//8, min(h,w)//4]; near-constant crops are
    re-drawn (up to a bounded number of tries, after which they are kept).
    """
    h, w = img.shape[:2]
    s_min, s_max = min(h, w) // 8, min(h, w) // 4
    if s_max > x_hi - x_lo or s_max > h:
        raise ValueError(f"region [{x_lo},{x_hi}) x {h} too small for crops up to {s_max}px")
    grey = img.mean(axis=2, dtype=np.float32)
    boxes = np.empty((n, 3), dtype=np.int64)
    for i in range(n):
        for _ in range(_MAX_TRIES_PER_CROP):
            s = int(rng.integers(s_min, s_max + 1))
            y0 = int(rng.integers(0, h - s + 1))
            x0 = int(rng.integers(x_lo, x_hi - s + 1))
            if grey[y0 : y0 + s, x0 : x0 + s].std() >= _MIN_CROP_STD:
                break
        boxes[i] = (y0, x0, s)
    return boxes


@functools.lru_cache(maxsize=1024)
def _aa_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch's antialiased bilinear resize along one axis.

    Same formula as ATen's ``_compute_indices_min_size_weights_aa`` (triangle
    filter widened by the downscale factor, normalised per output pixel), so
    ``W @ img @ W.T`` equals ``F.interpolate(..., mode="bilinear",
    antialias=True, align_corners=False)`` up to float rounding.
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = np.clip(1.0 - np.abs((j - center + 0.5) * invscale), 0.0, None)
        w[i, lo:hi] = k / k.sum()
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


def _crops_resized(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut the boxes out of ``img`` and resize them to ``size`` (antialiased bilinear).

    Crops of equal side are resized together with two small matrix products
    (the weights of :func:`_aa_bilinear_weights`); this gives the same result as
    :func:`resize_uint8` (up to +-1 from float rounding) without paying
    ``F.interpolate``'s per-call overhead for each of the ~100 distinct sides
    per photo.
    """
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    with _single_threaded_blas():
        _crops_resized_into(out, img, boxes, size)
    return out


def _single_threaded_blas():
    """Cap BLAS at one thread while active (hundreds of tiny matmuls are far
    slower with a thread pool, badly so on a busy machine).  threadpoolctl is a
    scikit-learn dependency; without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _crops_resized_into(out: np.ndarray, img: np.ndarray, boxes: np.ndarray, size: int) -> None:
    for s in np.unique(boxes[:, 2]):
        sel = np.flatnonzero(boxes[:, 2] == s)
        stack = np.stack([img[y0 : y0 + s, x0 : x0 + s] for y0, x0, _ in boxes[sel]]).astype(np.float32)
        w = _aa_bilinear_weights(int(s), size)
        y = np.einsum("oi,nijc->nojc", w, stack, optimize=True)
        y = np.einsum("pj,nojc->nopc", w, y, optimize=True)
        out[sel] = np.clip(np.rint(y), 0, 255)


def _photo_boxes(img: np.ndarray, n_train: int, n_test: int, rng: np.random.Generator):
    w = img.shape[1]
    split = int(round(_TRAIN_WIDTH_FRACTION * w))
    return (
        _sample_crop_boxes(img, n_train, 0, split, rng),
        _sample_crop_boxes(img, n_test, split, w, rng),
        split,
    )


def _patch_task(name: str, image_names: tuple[str, ...], load: Callable[[str], np.ndarray], size: int,
                n_train_per_class: int, n_test_per_class: int, seed: int) -> RawTask:
    """Class ``i`` = random square crops of image ``image_names[i]`` (train crops from the
    left 70 % of its width, test crops from the right 30 %)."""
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError("n_train_per_class and n_test_per_class must be >= 1")
    rng = np.random.default_rng(seed)
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for label, image_name in enumerate(image_names):
        img = load(image_name)
        b_tr, b_te, _ = _photo_boxes(img, n_train_per_class, n_test_per_class, rng)
        xs_tr.append(_crops_resized(img, b_tr, size))
        xs_te.append(_crops_resized(img, b_te, size))
        ys_tr.append(np.full(n_train_per_class, label, dtype=np.int64))
        ys_te.append(np.full(n_test_per_class, label, dtype=np.int64))
    x_tr, y_tr = np.concatenate(xs_tr), np.concatenate(ys_tr)
    x_te, y_te = np.concatenate(xs_te), np.concatenate(ys_te)
    p_tr, p_te = rng.permutation(len(y_tr)), rng.permutation(len(y_te))
    return RawTask(
        name=name,
        class_names=image_names,
        train_images=x_tr[p_tr],
        train_labels=y_tr[p_tr],
        test_images=x_te[p_te],
        test_labels=y_te[p_te],
    )


def photo_patches(
    size: int = 32, n_train_per_class: int = 800, n_test_per_class: int = 200, seed: int = 0
) -> RawTask:
    """10-class colour task: class ``i`` = random square crops of photo ``PHOTO_NAMES[i]``.

    Train crops lie entirely in the left 70 % of the photo's width and test
    crops entirely in the right 30 %, so train and test never share a pixel.
    Crop side is uniform in [min(h,w)/8, min(h,w)/4] px; near-constant crops
    (grey std < 4) are re-drawn.  Crops are resized to ``size`` x ``size``.
    Deterministic given the arguments (one numpy Generator seeded by ``seed``).

    Sources, all bundled in the installed wheels (no download): scikit-image
    ``skimage.data`` -- astronaut (NASA, public domain), chelsea (CC0), coffee
    (CC0), rocket (SpaceX, public domain), hubble_deep_field (NASA, public
    domain), immunohistochemistry (no known copyright restrictions), retina
    (CC0), motorcycle (left image of ``stereo_motorcycle``, Middlebury 2014
    stereo benchmark; scikit-image states no licence for it) -- and
    scikit-learn ``load_sample_images`` -- china, flower (CC BY 2.0).
    """
    return _patch_task("photo_patches", PHOTO_NAMES, _load_photo, size, n_train_per_class,
                       n_test_per_class, seed)


TEXTURE_NAMES = (
    "brick", "grass", "gravel", "coins", "moon", "camera", "cell", "clock", "page", "text",
)  # fmt: skip


def _load_texture(name: str) -> np.ndarray:
    """One bundled grey image of ``skimage.data`` as uint8 (H, W, 3); never touches the network."""
    try:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    except Exception as e:  # noqa: BLE001 -- any failure means the bundled file is unavailable
        raise SourceError(
            f"image '{name}' could not be loaded from scikit-image ({type(e).__name__}: {e}): "
            "install it with `pip install scikit-image`"
        ) from None
    if img.dtype != np.uint8 or img.ndim != 2:
        raise SourceError(f"image '{name}': expected uint8 (H,W), got {img.dtype} {img.shape}")
    return np.repeat(img[:, :, None], 3, axis=2)


def texture_patches(
    size: int = 32, n_train_per_class: int = 800, n_test_per_class: int = 200, seed: int = 0
) -> RawTask:
    """10-class grey task: class ``i`` = random square crops of image ``TEXTURE_NAMES[i]``,
    cut and split exactly as :func:`photo_patches` (train crops from the left 70 % of the
    width, test crops from the right 30 %). Sources: see the module docstring."""
    return _patch_task("texture_patches", TEXTURE_NAMES, _load_texture, size, n_train_per_class,
                       n_test_per_class, seed)


# --------------------------------------------------------------------------- #
# font_letters (TrueType fonts shipped in matplotlib's wheel)
# --------------------------------------------------------------------------- #

# Text faces of matplotlib's mpl-data/fonts/ttf (its symbol-only faces are left out).
LETTER_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)  # fmt: skip
LETTERS = tuple("ABCDEFGHIJ")


def _font_dir() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise SourceError("font_letters needs matplotlib's fonts: `pip install matplotlib`")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


def _render_letters(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image per label: the letter in a random font at a random size, position, rotation
    and contrast, drawn at 64x64 and resized to ``size`` (antialiased)."""
    from PIL import Image, ImageDraw, ImageFont

    folder = _font_dir()
    fonts: dict[tuple[str, int], object] = {}
    canvas = 64
    out = np.empty((len(labels), canvas, canvas), dtype=np.uint8)
    for i, label in enumerate(labels):
        face = LETTER_FONTS[int(rng.integers(len(LETTER_FONTS)))]
        points = int(rng.integers(36, 53))
        if (face, points) not in fonts:
            try:
                fonts[face, points] = ImageFont.truetype(str(folder / face), points)
            except OSError as e:
                raise SourceError(f"font {face} could not be read from {folder} ({e}): "
                                  "reinstall matplotlib") from None
        bg, fg = (int(v) for v in rng.integers(0, 256, 2))
        if abs(fg - bg) < 96:  # keep the letter legible
            fg = (bg + 128) % 256
        img = Image.new("L", (canvas * 2, canvas * 2), color=bg)
        draw = ImageDraw.Draw(img)
        draw.text((canvas, canvas), LETTERS[int(label)], fill=fg, font=fonts[face, points], anchor="mm")
        img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR, fillcolor=bg)
        dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
        left, top = canvas // 2 + dx, canvas // 2 + dy
        out[i] = np.asarray(img.crop((left, top, left + canvas, top + canvas)))
    noise = rng.normal(0.0, 8.0, out.shape)
    out = np.clip(np.rint(out + noise), 0, 255).astype(np.uint8)
    return resize_uint8(np.repeat(out[..., None], 3, axis=3), size)


def font_letters(size: int = 32, n_train_per_class: int = 200, n_test_per_class: int = 50,
                 seed: int = 0) -> RawTask:
    """10-class task: the capital letters A-J, rendered from matplotlib's text fonts
    (``LETTER_FONTS``). Each image draws its font, point size (36-52 on a 64 px canvas),
    offset (±4 px), rotation (±8°), background and ink grey levels (≥ 96 apart) and
    Gaussian pixel noise (σ 8); train and test images are independent draws (every font
    appears in both). Deterministic given the arguments."""
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError("n_train_per_class and n_test_per_class must be >= 1")
    rng = np.random.default_rng(seed)
    y_tr = rng.permutation(np.repeat(np.arange(len(LETTERS), dtype=np.int64), n_train_per_class))
    y_te = rng.permutation(np.repeat(np.arange(len(LETTERS), dtype=np.int64), n_test_per_class))
    x_tr = _render_letters(y_tr, size, rng)
    x_te = _render_letters(y_te, size, rng)
    return RawTask(name="font_letters", class_names=LETTERS, train_images=x_tr, train_labels=y_tr,
                   test_images=x_te, test_labels=y_te)


# --------------------------------------------------------------------------- #
# sklearn digits (unit tests only)
# --------------------------------------------------------------------------- #


def digits(size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> RawTask:
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16).

    Source: ``sklearn.datasets.load_digits`` (bundled with scikit-learn; the
    UCI "Optical Recognition of Handwritten Digits" data, CC BY 4.0).  Scaled
    to 0..255, resized to ``size``, stratified deterministic split.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    return RawTask(
        name="digits",
        class_names=tuple(str(i) for i in range(10)),
        train_images=resize_uint8(x[tr], size),
        train_labels=y[tr],
        test_images=resize_uint8(x[te], size),
        test_labels=y[te],
    )


SOURCES: dict[str, Callable[..., RawTask]] = {
    "fashion_mnist": fashion_mnist,
    "animal_mnist": animal_mnist,
    "photo_patches": photo_patches,
    "texture_patches": texture_patches,
    "font_letters": font_letters,
    "digits": digits,
}
