"""The performance suite: ``.venv/bin/python -m pytest benchmarks`` (not part of ``pytest -q``,
whose testpaths is ``tests``).

Collects ``bench_*.py`` files, runs every stage-like measurement with one intra-op thread
(as ``mmbench run`` runs its stages on a CPU), and at the end writes every recorded figure
with the machine it came from to docs/performance.md (``--perf-doc PATH`` elsewhere,
``--perf-doc ''`` not at all), the plots beside it and the figures as JSON
(docs/performance.json). A missed target is reported, not failed, unless ``--perf-strict``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Recorder, write_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    group = parser.getgroup("mmbench performance")
    group.addoption("--perf-doc", default=str(REPO / "docs" / "performance.md"),
                    help="where to write the figures ('' = nowhere); plots and JSON go beside it")
    group.addoption("--perf-strict", action="store_true", help="fail a benchmark that misses its target")
    group.addoption("--perf-cold-log", default="/tmp/tiny-run.log",
                    help="log of a cold `mmbench run --preset tiny` (last line 'done in X s'): the cold figure")


def pytest_collect_file(file_path, parent):
    # bench_*.py are benchmark modules (pytest's default pattern is test_*.py); a file named
    # on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_recorder: Recorder | None = None
_started = time.time()


@pytest.fixture(scope="session")
def perf(request) -> Recorder:
    global _recorder
    if _recorder is None:
        _recorder = Recorder(strict=request.config.getoption("--perf-strict"))
    return _recorder


@pytest.fixture(scope="session")
def cold_log(request) -> str:
    return request.config.getoption("--perf-cold-log")


def pytest_sessionstart(session):
    global _started
    _started = time.time()


def pytest_sessionfinish(session, exitstatus):
    doc = session.config.getoption("--perf-doc")
    if _recorder is None or not doc or not _recorder.figures:
        return
    path = write_report(_recorder, Path(doc), seconds=time.time() - _started)
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(f"performance figures: {path}")
