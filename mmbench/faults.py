"""Named crash points for the crash-safety tests (``tests/test_crash.py``).

``MMBENCH_KILL_AT=NAME[:N]`` makes the process SIGKILL itself the N-th time (default 1st)
it passes :func:`point` ``NAME``: no cleanup runs, exactly as when the machine or the
OOM killer stops a run. Unset (always, outside those tests) a point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("MMBENCH_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
