"""The fault suite's fixtures and report hooks. See README.md in this folder."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .check import RESULTS, format_table
from .harness import FaultStack, StackOptions


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: injects one fault into a real stack while traffic flows")


_LOG_ROOT: Path | None = None


def log_root() -> Path:
    """Where the stacks' files and process logs go: FAULT_LOG_DIR, or a fresh dir in the system tmp dir (not
    pytest's tmp_path, whose old runs pytest deletes — possibly while we still want to read a failure's logs)."""
    global _LOG_ROOT
    if _LOG_ROOT is None:
        base = os.environ.get("FAULT_LOG_DIR")
        if base:
            _LOG_ROOT = Path(base) / time.strftime("run-%Y%m%d-%H%M%S")
            _LOG_ROOT.mkdir(parents=True, exist_ok=True)
        else:
            _LOG_ROOT = Path(tempfile.mkdtemp(prefix="chatsessions-faults-"))
    return _LOG_ROOT


@pytest.fixture
def make_stack(request):
    """make_stack(name, **StackOptions fields) -> a started FaultStack; everything it started ends after the test.
    The stack's directory (config, Redis files, process logs) is kept when the test fails, removed otherwise."""
    stacks: list[FaultStack] = []
    request.node._fault_stacks = stacks
    request.node._fault_rows = len(RESULTS)

    def make(name: str, **options) -> FaultStack:
        stack = FaultStack(log_root() / name, name, StackOptions(**options))
        stacks.append(stack)
        stack.start()
        return stack

    yield make
    failed = getattr(request.node, "_fault_failed", False)
    for stack in stacks:
        took = stack.close()
        slow = {k: v for k, v in took.items() if v is None}
        if slow:
            print(f"\nfaults: {sorted(slow)} ignored SIGTERM and were killed", file=sys.stderr)
        if failed:
            print(f"\nfaults: process logs of {stack.name}: {stack.work}", file=sys.stderr)
        else:
            shutil.rmtree(stack.work, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    stacks = getattr(item, "_fault_stacks", None)
    if report.failed and stacks is not None and len(RESULTS) == item._fault_rows:
        # The test failed before it could compare anything: still one row in the table.
        error = str(call.excinfo.value).strip().splitlines()[0][:100] if call.excinfo else report.when
        RESULTS.append({"fault": item.name.removeprefix("test_"), "notes": f"ERROR ({report.when}): {error}"})
    if report.failed and stacks:
        item._fault_failed = True
        for stack in stacks:
            report.sections.append((f"fault stack {stack.name}: process logs (tails), {stack.work}",
                                    stack.tails(50)))


def pytest_sessionfinish(session, exitstatus):
    if _LOG_ROOT is not None and _LOG_ROOT.exists() and not any(_LOG_ROOT.iterdir()):
        _LOG_ROOT.rmdir()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    terminalreporter.section("fault suite summary")
    terminalreporter.write_line(format_table(RESULTS))
