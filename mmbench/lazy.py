"""``torch`` imported on first use: what plugin modules and the helpers they import use at module
level, so that listing plugins (``mmbench plugins``, ``--help``) does not pay torch's import
(about 2 s here). ``torch.foo`` through the proxy is ``torch.foo`` itself once imported."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for a module, imported on the first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def _load(self) -> ModuleType:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update(module.__dict__)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")


def functional_call(*args: Any, **kwargs: Any) -> Any:
    """``torch.func.functional_call``, imported on first use."""
    from torch.func import functional_call as call

    return call(*args, **kwargs)
