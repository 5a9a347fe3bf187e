import pluggy
import pytest

import mmbench
from mmbench import hookspecs
from mmbench.plugins import Registry, UsageError, load


def test_builtins_load_through_entry_points():
    reg = Registry()
    assert "badnets" in reg.names("attack")
    assert "ta" in reg.names("merger")
    assert "none" in reg.names("defense")
    assert {"tiny", "smoke"} <= set(reg.names("preset"))
    ta = reg.get("merger", "ta")
    assert ta.distribution == "mmbench" and ta.version == mmbench.__version__
    assert ta.entry_point == "ta"


def test_allowlist_limits_what_loads():
    reg = Registry(["ta", "none", "presets"])
    assert reg.names("merger") == ["ta"]
    assert reg.names("attack") == []


def test_unknown_names_suggest_the_closest():
    reg = load()
    with pytest.raises(UsageError, match="did you mean 'badnets'"):
        reg.get("attack", "badnet")
    with pytest.raises(UsageError, match="MMBENCH_PLUGINS"):
        Registry(["no-such-plugin"])


def test_misspelled_hook_fails_loudly():
    class Bad:
        @mmbench.hookimpl
        def mmbench_register_merger(self, register):  # missing the final "s"
            pass
    pm = pluggy.PluginManager("mmbench")
    pm.add_hookspecs(hookspecs)
    pm.register(Bad())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()
