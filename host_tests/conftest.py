"""Shared fixtures for every host test."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a currently free TCP port on 127.0.0.1 (never a fixed one; see
    host_tests.units.free_port: outside the ephemeral range, one slice per xdist worker)."""
    from host_tests.units import free_port as pick
    return pick


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


QEMU_DIR = "host_tests/realkernel/"
# The real-kernel tests in two queues of about equal length (about 7-8 min each on 2 quiet cores):
# each queue runs on one worker, one QEMU guest after the other, so at most two guests run at once.
QEMU_QUEUE_A = frozenset({"test_gadget_realkernel.py", "test_mirror_realkernel.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Real-kernel tests live in host_tests/realkernel/ (the scheduler below queues them); one
    elsewhere is refused at collection."""
    stray = [item.nodeid for item in items if item.get_closest_marker("realkernel") is not None
             and not item.nodeid.startswith(QEMU_DIR)]
    if stray:
        raise pytest.UsageError(f"real-kernel tests belong in {QEMU_DIR}: {', '.join(stray[:5])}")


def qemu_queue(nodeid: str) -> str | None:
    """The real-kernel queue a test runs in under `make test`, None for any other test."""
    if not nodeid.startswith(QEMU_DIR):
        return None
    return "qemu-a" if nodeid.split("::", 1)[0][len(QEMU_DIR):] in QEMU_QUEUE_A else "qemu-b"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two pytest-xdist workers with `--dist loadgroup`: each real-kernel queue
    (`qemu_queue`) goes whole to one worker, in order, and every other test to whichever worker is
    free. (xdist's own `xdist_group` mark cannot do it with this pytest: it carries the group in a
    node id attribute pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RealKernelQueues(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return qemu_queue(nodeid) or nodeid

    return RealKernelQueues(config, log)


# Lines a test publishes with `record_property("summary_line", ...)` (the short torture campaign's
# `torture: seed=...` line), printed at the end of the run; with xdist the reports carry them to the controller.
_SUMMARY_LINES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _SUMMARY_LINES.extend(str(v) for k, v in report.user_properties if k == "summary_line")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _SUMMARY_LINES:
        terminalreporter.write_line(line)
