"""Tests for mmbench.sources: shapes, dtypes, label ranges, determinism, disjointness."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from mmbench import sources as S
from mmbench.sources import RawTask, SourceError

FASHION_ROOT = Path(S.FASHION_MNIST_ROOT)
HAS_FASHION = FASHION_ROOT.is_dir()
HAS_ANIMAL = importlib.util.find_spec("animal_mnist") is not None

needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason=f"{FASHION_ROOT} missing (apt-get install dataset-fashion-mnist)")
needs_animal = pytest.mark.skipif(not HAS_ANIMAL, reason="animal-mnist not installed (pip install animal-mnist)")


def check_task(t: RawTask, size: int, n_classes: int = 10) -> None:
    assert isinstance(t, RawTask)
    assert len(t.class_names) == n_classes and len(set(t.class_names)) == n_classes
    for x, y in ((t.train_images, t.train_labels), (t.test_images, t.test_labels)):
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (size, size, 3)
        assert x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < n_classes
        assert set(np.unique(y)) == set(range(n_classes))  # every class present
        assert x.max() > x.min()  # not blank


def assert_same(a: RawTask, b: RawTask) -> None:
    assert a.class_names == b.class_names
    for f in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def image_set(x: np.ndarray) -> set[bytes]:
    return {bytes(row) for row in x.reshape(len(x), -1)}


def assert_disjoint(t: RawTask) -> None:
    assert not image_set(t.train_images) & image_set(t.test_images)


# --------------------------------------------------------------------------- resize


def test_resize_grey_and_colour():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = S.resize_uint8(grey, 32)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(S.resize_uint8(grey[..., None], 32), out)
    colour = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    assert S.resize_uint8(colour, 16).shape == (3, 16, 16, 3)
    # same size: identity (plus channel replication)
    np.testing.assert_array_equal(S.resize_uint8(grey, 28)[..., 1], grey)


def test_resize_preserves_constant_and_range():
    x = np.full((2, 8, 8), 200, dtype=np.uint8)
    np.testing.assert_array_equal(S.resize_uint8(x, 19), 200)
    x = np.zeros((1, 8, 8), dtype=np.uint8)
    x[0, :, 4:] = 255
    y = S.resize_uint8(x, 32)
    assert y.min() == 0 and y.max() == 255


def test_resize_batching_is_consistent(monkeypatch):
    x = np.random.default_rng(1).integers(0, 256, (10, 9, 9), dtype=np.uint8)
    whole = S.resize_uint8(x, 13)
    monkeypatch.setattr(S, "_RESIZE_CHUNK", 3)
    np.testing.assert_array_equal(S.resize_uint8(x, 13), whole)


def test_resize_rejects_bad_input():
    with pytest.raises(TypeError):
        S.resize_uint8(np.zeros((1, 4, 4), np.float32), 8)
    with pytest.raises(ValueError):
        S.resize_uint8(np.zeros((1, 4, 4, 2), np.uint8), 8)
    with pytest.raises(ValueError):
        S.resize_uint8(np.zeros((4, 4), np.uint8), 8)


def test_resize_read_only_input_no_warning():
    x = np.zeros((2, 6, 6), np.uint8)
    x.flags.writeable = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.resize_uint8(x, 12)


# --------------------------------------------------------------------------- misc


def test_sources_registry():
    assert set(S.SOURCES) == {"fashion_mnist", "animal_mnist", "photo_patches", "texture_patches",
                              "font_letters", "digits"}
    assert all(callable(f) for f in S.SOURCES.values())


def test_rawtask_validates():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = np.array([0, 1], np.int64)
    RawTask("ok", ("a", "b"), x, y, x, y)
    with pytest.raises(ValueError):
        RawTask("bad", ("a", "b"), x.astype(np.float32), y, x, y)
    with pytest.raises(ValueError):
        RawTask("bad", ("a", "b"), x, y.astype(np.int32), x, y)
    with pytest.raises(ValueError):
        RawTask("bad", ("a",), x, y, x, y)  # label 1 out of range


def test_stratified_split():
    labels = np.repeat(np.arange(4), [10, 20, 30, 41])
    tr, te = S._stratified_split(labels, 0.25, seed=3)
    assert not set(tr) & set(te)
    assert sorted(np.concatenate([tr, te])) == list(range(len(labels)))
    for c, n in enumerate([10, 20, 30, 41]):
        assert (labels[te] == c).sum() == round(0.25 * n)
    tr2, te2 = S._stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    tr3, _ = S._stratified_split(labels, 0.25, seed=4)
    assert not np.array_equal(tr, tr3)
    with pytest.raises(ValueError):
        S._stratified_split(labels, 1.0, seed=0)


# --------------------------------------------------------------------------- digits


def test_digits():
    t = S.digits()
    check_task(t, 16)
    assert t.name == "digits"
    assert len(t.train_labels) + len(t.test_labels) == 1797
    assert len(t.test_labels) == pytest.approx(0.25 * 1797, abs=10)
    assert_disjoint(t)
    assert_same(t, S.digits())
    other = S.digits(seed=1)
    assert not np.array_equal(t.train_labels, other.train_labels)
    check_task(S.digits(size=8, test_fraction=0.5), 8)


# --------------------------------------------------------------------------- Fashion-MNIST: file parsing


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.write_bytes(gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + payload))


def _fake_fashion(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, (n, 28, 28),
                   rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())  # fmt: skip
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, (n,), (np.arange(n) % 10).astype(np.uint8).tobytes())


def test_fashion_missing_dir(tmp_path):
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        S.fashion_mnist(root=str(tmp_path / "nope"))


def test_fashion_parses_fake_idx(tmp_path):
    _fake_fashion(tmp_path)
    t = S.fashion_mnist(root=str(tmp_path), size=16)
    assert t.train_images.shape == (6, 16, 16, 3) and t.test_images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(t.train_labels, np.arange(6))
    t28 = S.fashion_mnist(root=str(tmp_path), size=28)
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    np.testing.assert_array_equal(t28.train_images[..., 0].reshape(-1), np.frombuffer(raw, np.uint8))


@pytest.mark.parametrize(
    "breakage",
    ["bad_magic", "truncated", "not_gzip", "label_mismatch"],
)
def test_fashion_bad_files(tmp_path, breakage):
    _fake_fashion(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    if breakage == "bad_magic":
        _write_idx(img, 0x801, (6, 28, 28), bytes(6 * 784))
    elif breakage == "truncated":
        _write_idx(img, 0x803, (6, 28, 28), bytes(5 * 784))
    elif breakage == "not_gzip":
        img.write_bytes(b"this is not gzip")
    elif breakage == "label_mismatch":
        _write_idx(img, 0x803, (5, 28, 28), bytes(5 * 784))
    with pytest.raises(SourceError):
        S.fashion_mnist(root=str(tmp_path))


# --------------------------------------------------------------------------- Fashion-MNIST: real data


@pytest.fixture(scope="module")
def fashion():
    if not HAS_FASHION:
        pytest.skip(f"{FASHION_ROOT} missing (apt-get install dataset-fashion-mnist)")
    return S.fashion_mnist()


@needs_fashion
def test_fashion_real(fashion):
    check_task(fashion, 32)
    assert fashion.name == "fashion_mnist"
    assert fashion.train_images.shape == (60000, 32, 32, 3)
    assert fashion.test_images.shape == (10000, 32, 32, 3)
    assert fashion.class_names[0] == "t-shirt" and fashion.class_names[9] == "ankle boot"
    np.testing.assert_array_equal(np.bincount(fashion.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.test_labels), [1000] * 10)
    x = fashion.train_images
    assert np.array_equal(x[..., 0], x[..., 2])  # grey replicated


@needs_fashion
def test_fashion_disjoint(fashion):
    assert_disjoint(fashion)


@needs_fashion
def test_fashion_deterministic_small():
    a = S.fashion_mnist(size=8)
    b = S.fashion_mnist(size=8)
    assert_same(a, b)


# --------------------------------------------------------------------------- Animal-MNIST


@pytest.fixture(scope="module")
def animal():
    if not HAS_ANIMAL:
        pytest.skip("animal-mnist not installed (pip install animal-mnist)")
    return S.animal_mnist()


@needs_animal
def test_animal(animal):
    check_task(animal, 32)
    assert animal.name == "animal_mnist"
    assert animal.class_names == S.ANIMAL_MNIST_CLASSES
    n = len(animal.train_labels) + len(animal.test_labels)
    assert n == 9716  # 10,000 minus 284 exact duplicates
    assert len(animal.test_labels) == pytest.approx(0.2 * n, abs=10)
    # each class keeps (about) the same test fraction
    counts_tr = np.bincount(animal.train_labels, minlength=10)
    counts_te = np.bincount(animal.test_labels, minlength=10)
    np.testing.assert_allclose(counts_te / (counts_tr + counts_te), 0.2, atol=0.01)
    # bright silhouette on a dark background, like MNIST
    x = animal.train_images[..., 0]
    assert x[:, 0, :].mean() < 20 and x[:, 12:20, 12:20].mean() > 100


@needs_animal
def test_animal_disjoint_and_deterministic(animal):
    assert_disjoint(animal)
    assert_same(animal, S.animal_mnist())
    other = S.animal_mnist(seed=1)
    assert not np.array_equal(animal.test_labels, other.test_labels)


@needs_animal
def test_animal_native_size():
    t = S.animal_mnist(size=28, test_fraction=0.5, seed=2)
    check_task(t, 28)
    assert_disjoint(t)


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    p = tmp_path / "evil.gz"
    with gzip.open(p, "wb") as f:
        pickle.dump(Path("/etc/passwd"), f)  # needs pathlib globals
    with pytest.raises(SourceError, match="refusing"):
        S._load_numpy_pickle_gz(p)


def test_restricted_unpickler_loads_arrays(tmp_path):
    p = tmp_path / "ok.gz"
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    with gzip.open(p, "wb") as f:
        pickle.dump(arr, f, protocol=4)
    np.testing.assert_array_equal(S._load_numpy_pickle_gz(p), arr)


def test_animal_missing(monkeypatch):
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="pip install --no-deps animal-mnist"):
        S.animal_mnist()


def test_animal_does_not_import_tensorflow_loader(animal):
    import sys

    assert "animal_mnist.dataset_Loader" not in sys.modules
    assert "tensorflow" not in sys.modules


# --------------------------------------------------------------------------- photo patches


@pytest.fixture(scope="module")
def photos():
    return S.photo_patches(n_train_per_class=60, n_test_per_class=20)


def test_photo_patches(photos):
    check_task(photos, 32)
    assert photos.name == "photo_patches"
    assert photos.class_names == S.PHOTO_NAMES
    np.testing.assert_array_equal(np.bincount(photos.train_labels), [60] * 10)
    np.testing.assert_array_equal(np.bincount(photos.test_labels), [20] * 10)
    # colour: channels differ
    x = photos.train_images.astype(int)
    assert np.abs(x[..., 0] - x[..., 2]).mean() > 5


def test_photo_patches_deterministic(photos):
    assert_same(photos, S.photo_patches(n_train_per_class=60, n_test_per_class=20))
    other = S.photo_patches(n_train_per_class=60, n_test_per_class=20, seed=1)
    assert not np.array_equal(photos.train_images, other.train_images)


def test_photo_patches_disjoint(photos):
    assert_disjoint(photos)


@pytest.mark.parametrize("name", S.PHOTO_NAMES)
def test_photo_crop_boxes_stay_on_their_side(name):
    img = S._load_photo(name)
    h, w = img.shape[:2]
    train, test, split = S._photo_boxes(img, 300, 300, np.random.default_rng(0))
    assert split == round(0.7 * w)
    lo, hi = min(h, w) // 8, min(h, w) // 4
    for boxes in (train, test):
        y0, x0, s = boxes.T
        assert (s >= lo).all() and (s <= hi).all()
        assert (y0 >= 0).all() and (y0 + s <= h).all()
    assert (train[:, 1] >= 0).all() and (train[:, 1] + train[:, 2] <= split).all()
    assert (test[:, 1] >= split).all() and (test[:, 1] + test[:, 2] <= w).all()


def test_photo_patches_other_size():
    t = S.photo_patches(size=20, n_train_per_class=5, n_test_per_class=3, seed=7)
    check_task(t, 20)
    assert t.train_images.shape == (50, 20, 20, 3) and t.test_images.shape == (30, 20, 20, 3)


# --------------------------------------------------------------------------- texture patches


@pytest.fixture(scope="module")
def textures():
    return S.texture_patches(n_train_per_class=40, n_test_per_class=10)


def test_texture_patches(textures):
    check_task(textures, 32)
    assert textures.class_names == S.TEXTURE_NAMES
    assert not set(S.TEXTURE_NAMES) & set(S.PHOTO_NAMES)  # other images than photo_patches'
    np.testing.assert_array_equal(np.bincount(textures.train_labels), [40] * 10)
    np.testing.assert_array_equal(np.bincount(textures.test_labels), [10] * 10)
    x = textures.train_images
    assert (x[..., 0] == x[..., 2]).all()  # grey images, replicated to three channels
    assert_disjoint(textures)
    assert_same(textures, S.texture_patches(n_train_per_class=40, n_test_per_class=10))


@pytest.mark.parametrize("name", S.TEXTURE_NAMES)
def test_texture_crop_boxes_stay_on_their_side(name):
    img = S._load_texture(name)
    train, test, split = S._photo_boxes(img, 200, 200, np.random.default_rng(0))
    assert (train[:, 1] + train[:, 2] <= split).all() and (test[:, 1] >= split).all()


# --------------------------------------------------------------------------- font letters


@pytest.fixture(scope="module")
def letters():
    return S.font_letters(n_train_per_class=8, n_test_per_class=3)


def test_font_letters(letters):
    check_task(letters, 32)
    assert letters.class_names == tuple("ABCDEFGHIJ")
    np.testing.assert_array_equal(np.bincount(letters.train_labels), [8] * 10)
    np.testing.assert_array_equal(np.bincount(letters.test_labels), [3] * 10)
    assert_same(letters, S.font_letters(n_train_per_class=8, n_test_per_class=3))
    other = S.font_letters(n_train_per_class=8, n_test_per_class=3, seed=1)
    assert not np.array_equal(letters.train_images, other.train_images)


def test_font_letters_are_drawn_on_a_plain_background():
    """Each image is one letter on a flat background: its border is near one grey level,
    and ink of another level (≥ 96 apart before noise and resizing) covers part of it."""
    t = S.font_letters(size=32, n_train_per_class=2, n_test_per_class=1)
    x = t.train_images[..., 0].astype(float)
    border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], axis=1)
    centre = x[:, 8:24, 8:24]
    assert (border.std(axis=1) < 30).mean() > 0.8  # mostly flat (a rotated or offset letter may touch it)
    contrast = np.abs(centre - np.median(border, axis=1)[:, None, None]).max(axis=(1, 2))
    assert (contrast > 50).all()


def test_every_letter_font_is_shipped():
    folder = S._font_dir()
    assert all((folder / f).is_file() for f in S.LETTER_FONTS)


@pytest.mark.parametrize("n_in,n_out", [(8, 16), (28, 32), (37, 32), (64, 32), (128, 20), (352, 32), (100, 100)])
def test_aa_weights_match_torch(n_in, n_out):
    import torch
    import torch.nn.functional as F

    eye = torch.eye(n_in)[None, None]
    ref = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    np.testing.assert_allclose(S._aa_bilinear_weights(n_in, n_out), ref.numpy(), atol=1e-5)


def test_crops_resized_matches_resize_uint8():
    img = S._load_photo("coffee")
    boxes = np.array([[0, 0, 50], [10, 20, 50], [100, 300, 77], [5, 5, 100]])
    got = S._crops_resized(img, boxes, 32)
    ref = np.stack([S.resize_uint8(img[None, y : y + s, x : x + s], 32)[0] for y, x, s in boxes])
    assert np.abs(got.astype(int) - ref).max() <= 1
