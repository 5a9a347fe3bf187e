"""The plugin contract: every hook mmbench calls, in one module.

A plugin module implements any of these with ``@mmbench.hookimpl`` and is
declared as an entry point in the group ``mmbench`` of its distribution::

    [project.entry-points.mmbench]
    my_merger = "my_package.my_merger"

Each hook receives ``register``: call it once per object you provide. The
core owns the registries; names must be unique across all installed
plugins, across kinds: a later package whose name clashes is skipped with one
warning line naming both packages (docs/plugins.md, "What goes wrong"). The
built-in plugins load through this same path, first.
"""
import pluggy

hookspec = pluggy.HookspecMarker("mmbench")


@hookspec
def mmbench_register_attacks(register):
    """Register :class:`mmbench.api.Attack` instances: ``register(MyAttack())``."""


@hookspec
def mmbench_register_mergers(register):
    """Register :class:`mmbench.api.Merger` instances: ``register(MyMerger())``."""


@hookspec
def mmbench_register_defenses(register):
    """Register :class:`mmbench.api.Defense` instances: ``register(MyDefense())``."""


@hookspec
def mmbench_register_detectors(register):
    """Register :class:`mmbench.detect.Detector` instances (the detection track): ``register(MyDetector())``."""


@hookspec
def mmbench_register_presets(register):
    """Register :class:`mmbench.presets.Preset` objects: ``register(preset)``."""


@hookspec
def mmbench_register_executors(register):
    """Register executors: ``register(name, factory)``; ``factory(jobs=N[, address=A])``
    returns an object with ``execute(graph, todo, forced, runtime, on_outcome)``
    (:class:`mmbench.executors.Executor`). ``mmbench run --executor NAME`` picks one;
    ``local`` and ``ray`` are mmbench's own (:mod:`mmbench.executors`)."""
