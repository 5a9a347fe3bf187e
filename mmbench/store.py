"""The store: content-addressed artifacts and one JSON result per cell.

Layout under the store root (``--store``, ``$MMBENCH_STORE``, default ``.mmbench``)::

    artifacts/<key[:2]>/<key>.safetensors   tensors (safetensors only, never pickle)
    artifacts/<key[:2]>/<key>.json          {"kind", "sha256", "info", "created", "seconds", "threads", ...}
    artifacts/<key[:2]>/<key>.lock          exists only while a process computes the stage
    results/<preset>/<cell id>.json         one per cell, status ok | failed

Every write goes to a temporary file in the same folder (``.<name>.<host>.<pid>.<random>.tmp``),
is fsynced and then renamed, so a crash leaves either the old file or the new one, never a
partial one under a real name. The sidecar JSON records the safetensors file's sha256 and is
written last: it makes the artifact visible. A read verifies the sha256 and treats a mismatch
(or an unreadable file) as missing, so the stage is recomputed; :attr:`Store.corrupt` lists
each such artifact once. A result JSON that cannot be read is reported as ``unreadable``
(:meth:`Store.results`, :meth:`Store.load_result`, :attr:`Store.unreadable`), never as
missing.

What this needs from the filesystem (atomic rename, fsync, ``flock``), what happens on one
without working locks, and how to check yours: ``docs/store.md``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from .api import StateDict
from .faults import point
from .keys import canonical_json, json_default as _json_default, stage_key  # noqa: F401  (re-exported)
from .plugins import UsageError

# a temporary file of another host is stale once unlocked and this old (seconds); one of this
# host is stale as soon as the process that made it is gone
FOREIGN_TEMP_AGE = 3600.0
# errors by which a filesystem says it has no (working) advisory locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class StoreError(UsageError, OSError):
    """The store's filesystem refused a write (permissions, read-only, full, missing folder).

    One line, naming the file and the reason (``cannot write PATH: Permission denied``). An
    ``OSError`` (so code that handles I/O errors still does) and a
    :class:`~mmbench.plugins.UsageError` (so the CLI prints the line and exits with status 2:
    the run cannot go on, and no cell is to blame)."""


class LockTimeout(StoreError):
    """:meth:`Store.lock` waited ``timeout`` seconds for another holder."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_handle(f)


def _sha256_handle(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    return f".{name}.{_HOST}.{os.getpid()}."


def _new_temp(path: Path) -> tuple[int, str]:
    """A locked temporary file beside ``path``: (fd, name). The ``flock`` held on it until the
    fd closes tells another host's sweep that its writer is alive."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, tmp


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (power loss; a killed process needs nothing)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _temp_is_stale(path: Path, name: str | None = None) -> bool:
    """Whether the temporary file ``path`` was left by a writer that is gone.

    Of this host: its process (named in the file name) no longer exists. Of another host (or
    an unparsable name): nobody holds its ``flock`` and it has not changed for
    :data:`FOREIGN_TEMP_AGE` seconds."""
    fname = path.name
    m = re.fullmatch(r"\.(.+)\.([A-Za-z0-9-]+)\.(\d+)\.[^.]+\.tmp", fname)
    if m and (name is None or m.group(1) == name) and m.group(2) == _HOST:
        pid = int(m.group(3))
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    if age < FOREIGN_TEMP_AGE:
        return False
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _sweep_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the stale temporary files in ``folder`` (of ``name`` only, when given)."""
    pattern = f".{glob_escape(name)}.*.tmp" if name else ".*.tmp"
    removed = []
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return removed
    for tmp in candidates:
        if _temp_is_stale(tmp, name):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    """``data`` to ``path`` through a fsynced temporary file and a rename; ``fault`` names
    the :func:`mmbench.faults.point` passed just before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if fault:
                point(fault)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, exc: OSError) -> StoreError:
    return StoreError(f"cannot write {path}: {_reason(exc)}")


# one lock per lock file per process: threads of one process exclude each other here, so that
# the fcntl emulation of flock on NFS (whose locks belong to the process, not the open file)
# never sees two users in one process
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.abspath(path), threading.Lock())


class Store:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.corrupt: list[str] = []  # artifacts that failed verification this session, once each
        self.unreadable: list[str] = []  # result files that could not be read, once each
        self.notes: list[str] = []  # other things worth one warning (a filesystem without locks)
        self._corrupt_keys: set[str] = set()
        self._unreadable_paths: set[str] = set()
        self._read_once = False  # see read_results_once
        self._results_read: list[tuple[str, dict[str, Any]]] | None = None

    def read_results_once(self) -> None:
        """From now on :meth:`results` reads the result files once and answers every later call
        from what it read (for a command that only reads them, as ``mmbench leaderboard``, which
        asks for them per preset several times). The entries are shared: callers must not modify them."""
        self._read_once = True

    # the whole store ------------------------------------------------------------
    def check_writable(self) -> None:
        """Create the root if missing, then create and remove a file in it (and in its
        ``artifacts``/``results`` folders where they exist); a
        :class:`~mmbench.plugins.UsageError` of one line when that fails:
        ``store PATH is not writable: <reason>``."""
        where = self.root
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in (self.root, self.root / "artifacts", self.root / "results"):
                if folder is not self.root and not folder.exists():
                    continue
                where = folder
                fd, tmp = _new_temp(folder / "write-check")
                os.close(fd)
                os.unlink(tmp)
        except OSError as exc:
            detail = "" if where == self.root else f" ({where})"
            raise UsageError(f"store {self.root} is not writable: {_reason(exc)}{detail}") from None

    def sweep(self) -> list[Path]:
        """Remove what crashed writers left: temporary files whose writer is gone and lock
        files nobody holds. Safe while other processes use the store; returns what it removed."""
        removed: list[Path] = []
        for top in ("artifacts", "results"):
            base = self.root / top
            if not base.is_dir():
                continue
            for folder in [p for p in base.iterdir() if p.is_dir()]:
                removed += _sweep_temps(folder)
                if top == "artifacts" and fcntl is not None:
                    for lock in list(folder.glob("*.lock")):
                        if self._remove_if_unheld(lock):
                            removed.append(lock)
        return removed

    # artifacts --------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / "artifacts" / key[:2]
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def lock_path(self, key: str) -> Path:
        return self._paths(key)[0].with_suffix(".lock")

    def has(self, key: str) -> bool:
        tensors, meta = self._paths(key)
        return tensors.exists() and meta.exists()

    def save(self, key: str, kind: str, tensors: StateDict, info: dict[str, Any],
             seconds: float | None = None) -> None:
        """Write tensors then the sidecar (which makes the artifact visible), both atomically.

        A filesystem error is a :class:`StoreError` naming the file."""
        import torch  # here, not at module level: reading results (mmbench leaderboard) needs no torch
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(key)
        json.dumps(info, default=_json_default)  # an info that cannot be stored fails before any write
        try:
            tensor_path.parent.mkdir(parents=True, exist_ok=True)
            _sweep_temps(tensor_path.parent, tensor_path.name)
            _sweep_temps(meta_path.parent, meta_path.name)
            fd, tmp = _new_temp(tensor_path)
        except OSError as exc:
            raise _write_error(tensor_path, exc) from None
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
                digest = _sha256_handle(f)
            os.replace(tmp, tensor_path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise _write_error(tensor_path, exc) from None
            raise
        finally:
            os.close(fd)
        point("store.save.tensors")
        meta = {"key": key, "kind": kind, "sha256": digest, "info": info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds,
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        try:
            atomic_write_bytes(meta_path, json.dumps(meta, indent=1, default=_json_default).encode())
        except StoreError:
            raise
        except OSError as exc:
            raise _write_error(meta_path, exc) from None

    @contextlib.contextmanager
    def lock(self, key: str, *, timeout: float | None = None,
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold an exclusive lock on ``key`` while computing it, so that parallel workers and
        concurrent runs on one store compute a shared stage once and the others wait, then load it.

        An advisory ``flock`` on ``artifacts/<key[:2]>/<key>.lock``, which exists only while
        held: the holder removes it before releasing, and a waiter that then gets the lock on
        the removed file notices (the path no longer names the file it locked) and tries
        again, so lock files do not accumulate and no two holders ever coexist. The kernel
        releases the lock when its holder dies, so a crash never leaves a stage locked (a
        crashed holder's file stays until the key is next locked, or :meth:`sweep`).

        Waiting has no limit by default (the holder is alive and computing); ``timeout``
        seconds raises :class:`LockTimeout`. ``on_wait(holder)`` is called once when the lock
        is busy, with what the holder wrote ("host pid since"). Where ``fcntl`` does not
        exist (Windows), or the filesystem refuses locks, this is a no-op (noted once in
        :attr:`notes`): a stage may then be computed twice at once, which costs time but
        never correctness (every write is an atomic rename)."""
        if fcntl is None:
            yield
            return
        path = self.lock_path(key)
        guard = _thread_lock(path)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not guard.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise LockTimeout(f"waited {timeout:g} s for the lock on {key[:12]} (held in this process)")
        try:
            fd = self._acquire(path, deadline, on_wait)
            try:
                yield
            finally:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # before releasing: nobody can lock this file and keep it
                    os.close(fd)  # releases the flock
        finally:
            guard.release()

    def _acquire(self, path: Path, deadline: float | None,
                 on_wait: Callable[[str], None] | None) -> int | None:
        """flock ``path`` (see :meth:`lock`): the locked fd, or None where locks do not work."""
        told = False
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise _write_error(path, exc) from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if on_wait is not None and not told:
                        told = True
                        on_wait(_read_holder(fd))
                    self._wait(fd, path, deadline)
                except OSError as exc:
                    if exc.errno in _NO_LOCKS:
                        os.close(fd)
                        note = (f"the filesystem of {self.root} refuses flock ({_reason(exc)}): stages "
                                f"may be computed twice at once (harmless, see docs/store.md)")
                        if note not in self.notes:
                            self.notes.append(note)
                        return None
                    raise
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if same:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, f"{_HOST} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
                                  .encode(), 0)
                    return fd
                os.close(fd)  # the holder removed this file before releasing it: lock the new one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    @staticmethod
    def _wait(fd: int, path: Path, deadline: float | None) -> None:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        delay = 0.02
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(f"timed out waiting for the lock {path} (held by "
                                      f"{_read_holder(fd) or 'another process'})") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.5)

    def _remove_if_unheld(self, path: Path) -> bool:
        """Remove the lock file ``path`` if nobody holds it (the same steps as acquiring it)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
                return True
        except OSError:
            pass
        finally:
            os.close(fd)
        return False

    def discard(self, key: str) -> None:
        """Remove an artifact (a finished stage's checkpoint): the sidecar first, so that it is
        never visible without its tensors; a missing file is no error."""
        for path in self._paths(key)[::-1]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def load(self, key: str) -> tuple[StateDict, dict[str, Any]] | None:
        """The artifact's tensors and info, or None when missing or failing verification.

        The sha256 is checked on the very file that is then loaded (held open throughout), so
        a concurrent rewrite of the same key is never half-read: a changed sidecar or tensor
        file during the read is retried, a real mismatch is recorded once in :attr:`corrupt`."""
        from safetensors.torch import load_file

        tensor_path, meta_path = self._paths(key)
        for attempt in range(3):
            if not (tensor_path.exists() and meta_path.exists()):
                return None
            try:
                meta_stat = os.stat(meta_path)
                meta = json.loads(meta_path.read_text())
                with open(tensor_path, "rb") as f:
                    if _sha256_handle(f) != meta["sha256"]:
                        if attempt < 2 and self._changed(meta_path, meta_stat, tensor_path, f):
                            time.sleep(0.05)
                            continue
                        raise ValueError("sha256 mismatch")
                    tensors = load_file(str(tensor_path))
                    if not os.path.samestat(os.fstat(f.fileno()), os.stat(tensor_path)):
                        continue  # replaced while loading: read the new one
            except FileNotFoundError:
                continue
            except Exception as exc:  # a bad artifact is recomputed, never used
                if key not in self._corrupt_keys:  # read again under the stage lock: report once
                    self._corrupt_keys.add(key)
                    self.corrupt.append(f"{key[:12]} ({exc})")
                return None
            return tensors, meta.get("info", {})
        return None

    @staticmethod
    def _changed(meta_path: Path, meta_stat: os.stat_result, tensor_path: Path, f) -> bool:
        try:
            return not (os.path.samestat(meta_stat, os.stat(meta_path))
                        and os.path.samestat(os.fstat(f.fileno()), os.stat(tensor_path)))
        except OSError:
            return True

    # results ----------------------------------------------------------------
    def result_path(self, preset: str, cell_id: str) -> Path:
        return self.root / "results" / preset / f"{cell_id}.json"

    def save_result(self, preset: str, cell_id: str, result: dict[str, Any]) -> Path:
        """Write one cell's result atomically; a filesystem error is a :class:`StoreError`."""
        path = self.result_path(preset, cell_id)
        data = json.dumps(result, indent=1, default=_json_default).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _sweep_temps(path.parent, path.name)
            atomic_write_bytes(path, data, fault="store.save_result")
        except StoreError:
            raise
        except OSError as exc:
            raise _write_error(path, exc) from None
        return path

    def load_result(self, preset: str, cell_id: str) -> dict[str, Any] | None:
        """The cell's stored result; None when there is none; when the file exists but cannot
        be read or parsed, an entry with status ``unreadable`` (see :meth:`unreadable_entry`),
        recorded once in :attr:`unreadable`. Callers that recompute anything but an ``ok``
        result with the current key recompute it, and the rewrite replaces the bad file."""
        path = self.result_path(preset, cell_id)
        try:
            return self._read_result(path)
        except FileNotFoundError:
            return None

    def results(self, preset: str | None = None) -> list[dict[str, Any]]:
        """Every stored result (of ``preset``), a file that cannot be read as an ``unreadable`` entry."""
        base = self.root / "results"
        if self._read_once:
            if self._results_read is None:
                self._results_read = [(path.parent.name, entry) for path, entry in self._read_results(base, "*/*.json")]
            return [entry for folder, entry in self._results_read if preset is None or folder == preset]
        return [entry for _, entry in self._read_results(base, f"{glob_escape(preset)}/*.json" if preset else "*/*.json")]

    def _read_results(self, base: Path, pattern: str) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in sorted(base.glob(pattern)):
            if path.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):  # removed since listed
                out.append((path, self._read_result(path)))
        return out

    def _read_result(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            return data
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            return self.unreadable_entry(path, exc)

    def unreadable_entry(self, path: Path, exc: BaseException) -> dict[str, Any]:
        """What stands for a result file that cannot be read: status ``unreadable``, the preset
        and cell from its path (and attack, merger, defense, seed from the cell id when it has
        the usual form), the error; recorded once in :attr:`unreadable`."""
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else _reason(exc)
        cell = path.stem
        entry: dict[str, Any] = {"cell": cell, "preset": path.parent.name, "status": "unreadable",
                                 "error": error, "path": str(path)}
        parts = cell.split("__")
        if len(parts) == 4 and re.fullmatch(r"seed-?\d+", parts[3]):
            entry.update(attack=parts[0], merger=parts[1], defense=parts[2], seed=int(parts[3][4:]))
        if str(path) not in self._unreadable_paths:
            self._unreadable_paths.add(str(path))
            self.unreadable.append(f"{path} ({error})")
        return entry


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""
