"""A missing or unreadable local checkpoint or dataset path is one line (UsageError /
DataError, exit status 2 through the CLI), not a traceback."""
from dataclasses import replace

import pytest
from conftest import ROOT_USER, run_unprivileged

from mmbench.data import DataError
from mmbench.plugins import UsageError
from mmbench.presets import ModelSpec, TaskSpec



def _as_nobody(fn) -> str:
    """``fn()``'s exception as ``Type: message`` (or "ok"), run as an unprivileged user in a
    forked child when this is root (root reads any file), else here."""
    def call():
        try:
            fn()
            return "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            return f"{type(exc).__name__}: {exc}"

    return run_unprivileged(call)


@pytest.fixture
def open_dir():
    import shutil
    import tempfile
    from pathlib import Path

    top = Path(tempfile.mkdtemp(prefix="mmbench-paths-"))
    top.chmod(0o755)
    yield top
    for p in [top, *top.rglob("*")]:
        p.chmod(0o755)
    shutil.rmtree(top)


def _model(pretrained):
    return ModelSpec(name="mmbench-test-vit", pretrained=pretrained)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    from mmbench.models import checkpoint_path

    assert checkpoint_path(_model(None)) is None
    assert checkpoint_path(_model("openai")) is None  # an open_clip tag, not a path
    with pytest.raises(UsageError, match=r"^model 'mmbench-test-vit': checkpoint .*/nope\.pt does not exist$"):
        checkpoint_path(_model(str(tmp_path / "nope.pt")))
    with pytest.raises(UsageError, match=r"does not exist$"):
        checkpoint_path(_model("weights.safetensors"))  # looks like a file, is not there
    with pytest.raises(UsageError, match=r"is a folder, not a checkpoint file$"):
        checkpoint_path(_model(str(tmp_path)))
    ok = tmp_path / "ok.pt"
    ok.write_bytes(b"x")
    assert checkpoint_path(_model(str(ok))) == ok


def test_an_unreadable_checkpoint_is_one_line(open_dir):
    from mmbench.models import checkpoint_path

    locked = open_dir / "locked.pt"
    locked.write_bytes(b"x")
    locked.chmod(0)
    assert _as_nobody(lambda: checkpoint_path(_model(str(locked)))) == (
        f"UsageError: model 'mmbench-test-vit': checkpoint {locked} cannot be read: Permission denied")
    (open_dir / "closed").mkdir()
    (open_dir / "closed" / "w.pt").write_bytes(b"x")
    (open_dir / "closed").chmod(0o700)  # cannot be searched by others: not "does not exist"
    assert _as_nobody(lambda: checkpoint_path(_model(str(open_dir / "closed" / "w.pt")))).endswith(
        "cannot be read: Permission denied")


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path):
    from mmbench.models import create_clip

    try:
        from mmbench.catalogue import SMOKE
    except ImportError:  # before the preset catalogue had its own module
        from mmbench.presets import SMOKE

    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    spec = replace(SMOKE.model, pretrained=str(bad))
    with pytest.raises(UsageError, match=r"^model .*: checkpoint .*garbage\.pt cannot be loaded: ") as info:
        create_clip(spec)
    assert "\n" not in str(info.value)


def _task(**args):
    return TaskSpec(name="t", source="hf", source_args=args)


def test_a_missing_dataset_path_is_one_line(tmp_path):
    from mmbench.hf import check_local_paths

    with pytest.raises(DataError, match=r"^task 't': dataset path .*/absent does not exist$"):
        check_local_paths(_task(path=str(tmp_path / "absent")))
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"^task 't': data file .*/ds/train\.parquet does not exist$"):
        check_local_paths(_task(path=str(tmp_path / "ds"), data_files={"train": "train.parquet"}))
    with pytest.raises(DataError, match=r"^task 't': data file .*/x\.parquet does not exist$"):
        check_local_paths(_task(path="parquet", data_files=[str(tmp_path / "x.parquet")]))
    check_local_paths(_task(path="someone/some-dataset"))  # a hub id: not a local path
    check_local_paths(_task(path=str(tmp_path / "ds"), data_files={"train": "*.parquet"}))  # globs: datasets' job


def test_an_unreadable_dataset_path_is_one_line(open_dir):
    from mmbench.hf import check_local_paths

    locked = open_dir / "locked"
    locked.mkdir()
    locked.chmod(0)
    assert _as_nobody(lambda: check_local_paths(_task(path=str(locked)))) == (
        f"DataError: task 't': dataset path {locked} cannot be read: Permission denied")
