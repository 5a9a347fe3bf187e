"""Shared fixtures: a store with the `smoke` preset's shared stages built once per session."""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.pop("MMBENCH_PLUGINS", None)  # tests see every installed plugin unless a test narrows it


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """A store where `mmbench run --preset smoke --attack none --merger ta --defense none` has run."""
    from mmbench.cli import main

    root = tmp_path_factory.mktemp("smoke-store")
    assert main(["run", "--preset", "smoke", "--attack", "none", "--merger", "ta", "--defense", "none",
                 "--store", str(root), "--quiet"]) == 0
    return root


@pytest.fixture
def store_copy(smoke_store, tmp_path):
    """A private copy of the smoke store (tests may corrupt or extend it)."""
    dest = tmp_path / "store"
    shutil.copytree(smoke_store, dest)
    return dest


@pytest.fixture
def registrations():
    """``registrations(module, hook)``: what a plugin module registers through ``hook``,
    with the module checked against the hookspecs (``check_pending``) first."""
    import pluggy

    from mmbench import hookspecs

    def call(module, hook: str) -> list:
        pm = pluggy.PluginManager("mmbench")
        pm.add_hookspecs(hookspecs)
        pm.register(module)
        pm.check_pending()
        registered: list = []
        getattr(pm.hook, hook)(register=registered.append)
        return registered
    return call


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def run_unprivileged(call) -> str:
    """``call()`` (→ str, never raising) run as the unprivileged user ``nobody`` in a forked child
    when this is root (root reads and writes any file, so permission tests would be vacuous),
    else here; its string."""
    if not ROOT_USER:
        return call()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, call().encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out
