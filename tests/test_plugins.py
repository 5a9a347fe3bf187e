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


def test_fingerprint_sees_helper_edits_and_ignores_docs(tmp_path, monkeypatch):
    import importlib
    import sys

    from mmbench import plugins

    def fingerprint(plugin_src: str, helper_src: str) -> str:
        # one package name for every variant, freshly imported, so only the code differs
        for name in [m for m in sys.modules if m == "fp_pkg" or m.startswith("fp_pkg.")]:
            del sys.modules[name]
        monkeypatch.setattr(plugins, "_fingerprints", {})
        root = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        (root / "fp_pkg").mkdir(parents=True)
        (root / "fp_pkg" / "__init__.py").write_text("")
        (root / "fp_pkg" / "helper.py").write_text(helper_src)
        (root / "fp_pkg" / "plugin.py").write_text(plugin_src)
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        try:
            return plugins.source_fingerprint(importlib.import_module("fp_pkg.plugin").Plugin())
        finally:
            sys.path.remove(str(root))

    plugin = ('from .helper import scale\n\nclass Plugin:\n    """Doc."""\n\n'
              '    def run(self):\n        return scale(2)\n')
    helper = "def scale(x):\n    return 3 * x\n"
    base = fingerprint(plugin, helper)
    restyled = plugin.replace('"""Doc."""', '"""Other words."""  # a comment').replace("scale(2)", "scale( 2 )")
    assert fingerprint(restyled, helper) == base            # docs, comments, spacing: same code
    assert fingerprint(plugin, helper.replace("3 *", "4 *")) != base   # a helper it imports changed
    assert fingerprint(plugin.replace("scale(2)", "scale(5)"), helper) != base


def test_listing_plugins_does_not_import_torch():
    """`mmbench plugins` and `--help` load every plugin through its entry point without
    importing torch (it costs about 2 s): plugins take torch from mmbench.lazy."""
    import subprocess
    import sys

    code = ("import sys\nfrom mmbench.cli import main\nmain(['plugins'])\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "badnets" in out and "adamerging" in out and "dam" in out
    assert out.strip().splitlines()[-1] == "TORCH False"


def test_the_lazy_torch_is_torch():
    import torch as real

    from mmbench.lazy import F, functional_call, torch

    assert torch.Tensor is real.Tensor and torch.zeros(2).sum().item() == 0
    assert F.relu(real.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
    lin = real.nn.Linear(1, 1, bias=False)
    out = functional_call(lin, {"weight": real.tensor([[3.0]])}, (real.tensor([[2.0]]),))
    assert out.item() == 6.0
