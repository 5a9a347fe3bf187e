"""Stage keys, without torch: canonical JSON, ``stage_key`` and the code fingerprints of
the harness modules each kind of stage runs.

A key is the sha256 of the canonical JSON of (kind, params, input keys, code). Inputs
carry their own keys, so a key covers everything upstream of its stage. ``code`` names
what ran: for a plugin's stage its distribution, version and source fingerprint; for a
core stage mmbench's version and :func:`core_code` of the modules in :data:`CORE_MODULES`
for that kind (their source without docstrings or comments, read from the files, not
imported), so editing a module that computes a stage recomputes that stage and what
depends on it, and editing the CLI or the leaderboard recomputes nothing.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent

SPLIT_SEED = 20240601  # the fixed seed of every task's train/dev/test/pretrain split
# Bump when a loader in mmbench.sources / mmbench.hf changes what it returns: part of the data keys.
DATA_FORMAT = 1

# the harness modules whose code a stage of each kind runs (beyond what its inputs ran)
CORE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("data", "sources", "hf"),
    "base": ("models", "context"),
    "heads": ("models", "zeroshot", "context"),
    "finetune": ("train", "models", "context"),
    "eval-finetuned": ("evaluate", "context", "execute"),
    # a plugin's stages run the plugin's code through the Context (training, evaluation, vectors)
    "attack": ("context", "train", "evaluate", "vectors", "api", "execute"),
    "merge": ("api", "vectors", "execute"),
    "cell": ("context", "evaluate", "vectors", "api", "execute"),
    "plugin": ("context", "train", "evaluate", "vectors", "api"),
    # the detection track's detect and screen stages (mmbench.detect, run by mmbench.worker)
    "detect": ("detect", "worker", "context", "evaluate", "vectors", "api", "execute"),
}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-able in a stage key or result: {obj!r}")


def stage_key(kind: str, params: Any, inputs: list[str] | tuple[str, ...] = (),
              plugin: tuple[str, ...] | list[str] | None = None) -> str:
    """sha256 of the canonical JSON of (kind, params, input keys, code that runs it)."""
    payload = {"kind": kind, "params": params, "inputs": list(inputs),
               "plugin": list(plugin) if plugin else None}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def normalised_source(text: str) -> str:
    """Python source as its AST without docstrings: comments, formatting and docs do not count."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


_core: dict[str, str] = {}


def core_code(kind: str) -> str:
    """12 hex digits: the fingerprint of the harness modules that a stage of ``kind`` runs."""
    if kind not in _core:
        h = hashlib.sha256()
        for name in sorted(CORE_MODULES[kind]):
            path = _HERE / f"{name}.py"
            text = path.read_text() if path.exists() else ""
            h.update(f"{name}\n{normalised_source(text)}\n".encode())
        _core[kind] = h.hexdigest()[:12]
    return _core[kind]


def core(kind: str) -> tuple[str, str, str]:
    """The ``plugin`` part of a core stage's key: ("mmbench", version, code fingerprint)."""
    from . import __version__

    return ("mmbench", __version__, core_code(kind))


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted):
    what keys a local checkpoint or dataset, so that moving it changes nothing and
    replacing its content recomputes what it feeds."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\n".encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
