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
