"""The store: content-addressed artifacts and one JSON result per cell.

Layout under the store root (``--store``, ``$MMBENCH_STORE``, default ``.mmbench``)::

    artifacts/<key[:2]>/<key>.safetensors   tensors (safetensors only, never pickle)
    artifacts/<key[:2]>/<key>.json          {"kind", "sha256", "info", "created", "seconds", "threads", ...}
    artifacts/<key[:2]>/<key>.lock          held while a worker computes the stage
    results/<preset>/<cell id>.json         one per cell, status ok | failed

Every write goes to a temporary file in the same folder, is fsynced and then
renamed, so a crash leaves either the old file or the new one. The sidecar
JSON records the safetensors file's sha256; a read verifies it and treats a
mismatch (or an unreadable file) as missing, so the stage is recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors.torch import load_file, save_file

from .api import StateDict
from .keys import canonical_json, json_default as _json_default, stage_key  # noqa: F401  (re-exported)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Store:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.corrupt: list[str] = []  # artifacts that failed verification this session

    # artifacts --------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / "artifacts" / key[:2]
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def has(self, key: str) -> bool:
        tensors, meta = self._paths(key)
        return tensors.exists() and meta.exists()

    def save(self, key: str, kind: str, tensors: StateDict, info: dict[str, Any],
             seconds: float | None = None) -> None:
        """Write tensors then the sidecar (which makes the artifact visible), both atomically."""
        tensor_path, meta_path = self._paths(key)
        json.dumps(info, default=_json_default)  # an info that cannot be stored fails before any write
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tensor_path.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            plain, storages = {}, set()
            for k, v in tensors.items():  # safetensors refuses tensors that share memory: copy those
                v = v.detach().cpu().contiguous()
                ptr = v.untyped_storage().data_ptr()
                if ptr in storages or v.untyped_storage().nbytes() != v.numel() * v.element_size():
                    v = v.clone()
                storages.add(v.untyped_storage().data_ptr())
                plain[k] = v
            save_file(plain, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            digest = sha256_file(Path(tmp))
            os.replace(tmp, tensor_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        meta = {"key": key, "kind": kind, "sha256": digest, "info": info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds,
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1, default=_json_default).encode())

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock on ``key`` while computing it, so that parallel workers
        (``mmbench run --jobs``) compute a shared stage once and the others wait, then load it.

        An advisory ``flock`` on ``artifacts/<key[:2]>/<key>.lock``: released by the
        kernel if the holder dies, so a crash never leaves a stage locked. Where
        ``fcntl`` does not exist (Windows) this is a no-op: stages may be computed
        twice, which costs time but no correctness (writes are atomic)."""
        if fcntl is None:
            yield
            return
        path = self._paths(key)[0].with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def load(self, key: str) -> tuple[StateDict, dict[str, Any]] | None:
        """The artifact's tensors and info, or None when missing or failing verification."""
        tensor_path, meta_path = self._paths(key)
        if not (tensor_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if sha256_file(tensor_path) != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # a bad artifact is recomputed, never used
            if f"{key[:12]} ({exc})" not in self.corrupt:  # read again under the stage lock
                self.corrupt.append(f"{key[:12]} ({exc})")
            return None
        return tensors, meta.get("info", {})

    # results ----------------------------------------------------------------
    def result_path(self, preset: str, cell_id: str) -> Path:
        return self.root / "results" / preset / f"{cell_id}.json"

    def save_result(self, preset: str, cell_id: str, result: dict[str, Any]) -> Path:
        path = self.result_path(preset, cell_id)
        atomic_write_bytes(path, json.dumps(result, indent=1, default=_json_default).encode())
        return path

    def load_result(self, preset: str, cell_id: str) -> dict[str, Any] | None:
        path = self.result_path(preset, cell_id)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def results(self, preset: str | None = None) -> list[dict[str, Any]]:
        base = self.root / "results"
        pattern = f"{preset}/*.json" if preset else "*/*.json"
        out = []
        for path in sorted(base.glob(pattern)):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out
