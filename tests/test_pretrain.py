"""Shipped base models: the file format, heads read from it, and the file tiny ships."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from mmbench import catalogue, models
from mmbench.cli import main
from mmbench.context import SharedStages
from mmbench.keys import canonical_json, file_digest
from mmbench.store import Store


def test_the_shipped_tiny_base_is_the_recorded_file_built_by_the_recorded_recipe():
    path = catalogue.TINY_BASE_FILE
    assert path.is_file(), "tiny's base file is missing: run `mmbench pretrain --preset tiny`"
    assert file_digest(path) == catalogue.TINY_BASE_SHA256, (
        "the shipped base differs from the sha256 recorded in mmbench/catalogue.py")
    meta = models.base_file_metadata(path)
    assert meta is not None and meta["format"] == models.BASE_FORMAT
    # the recipe the file was built from is the one `mmbench pretrain` would run now
    assert meta["recipe"] == canonical_json(catalogue.TINY_BASE.key()), (
        "catalogue.TINY_BASE changed since the base was built: rebuild it (mmbench pretrain --preset tiny) "
        "and record the new sha256")
    visual, scale, heads, names, _ = models.read_base_file(path)
    assert set(heads) == set(catalogue.TINY.task_names)
    assert set(names) == set(catalogue.TINY.task_names)
    assert 1.0 <= scale <= 100.0
    assert path.stat().st_size < 8 * 2**20  # a few MB: the image tower and the heads only
    # the file's image tower fits tiny's architecture exactly
    encoder = models.build_encoder(catalogue.TINY)
    encoder.load_state_dict(visual, strict=True)


def test_a_base_file_round_trips_and_serves_as_a_presets_base_and_heads(tmp_path):
    """Build smoke's base in-run, ship it as a file, and run a preset from the file: same
    image tower, the file's heads (here smoke's orthogonal ones) checked against the data."""
    smoke = catalogue.SMOKE
    store = Store(tmp_path / "store")
    shared = SharedStages(smoke, store, torch.device("cpu"), quiet=True)
    state, info = shared.base()
    heads = shared.heads()
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    names = {t: shared.task_data(t).class_names for t in smoke.task_names}
    path = tmp_path / "smoke-base.safetensors"
    models.save_base_file(path, visual, info["logit_scale"], heads, names, {"what": "a test"})
    assert not list(tmp_path.glob(".*.tmp"))

    got_visual, scale, got_heads, got_names, recipe = models.read_base_file(path)
    assert recipe == {"what": "a test"} and scale == pytest.approx(info["logit_scale"])
    assert got_names == {t: list(n) for t, n in names.items()}

    shipped = replace(smoke, model=replace(smoke.model, pretrained=str(path), pretrain_steps=0), heads="base")
    other = SharedStages(shipped, store, torch.device("cpu"), quiet=True)
    pre = other.pretrained()
    assert set(pre) == set(shared.pretrained())
    assert all(torch.equal(pre[k], shared.pretrained()[k]) for k in pre)
    assert all(torch.equal(other.heads()[t], heads[t]) for t in smoke.task_names)
    # a different file is a different base: its content, not its path, keys the stage
    assert other.keys.base() != shared.keys.base()


def test_a_base_file_whose_classes_do_not_match_the_data_is_refused(tmp_path):
    smoke = catalogue.SMOKE
    shared = SharedStages(smoke, Store(tmp_path / "store"), torch.device("cpu"), quiet=True)
    state, info = shared.base()
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    names = {t: [f"x{i}" for i in range(shared.task_data(t).num_classes)] for t in smoke.task_names}
    path = tmp_path / "wrong.safetensors"
    models.save_base_file(path, visual, info["logit_scale"], shared.heads(), names, {})
    shipped = replace(smoke, model=replace(smoke.model, pretrained=str(path), pretrain_steps=0), heads="base")
    with pytest.raises(ValueError, match="no head for task"):
        SharedStages(shipped, Store(tmp_path / "store"), torch.device("cpu"), quiet=True).heads()


def test_pretrain_refuses_a_preset_without_a_shipped_base(capsys, tmp_path):
    assert main(["pretrain", "--preset", "smoke", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ships no base model" in err[0]
