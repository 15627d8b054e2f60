"""Shared pytest set-up: float64 by default, few threads, locating ../shared data, and a run
that fails when a test is skipped for any reason but a missing optional extra or missing
../shared data (a skip must never hide a regression)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLPOT_SHARED", REPO.parent / "shared")) / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data folder (../shared/data) not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models or systems, where intra-op threads only add overhead (and
    oversubscribe a busy machine): ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------ allowed skip reasons
# The only reasons a test may be skipped; any other skip fails the run (exit status 1).
ALLOWED_SKIP_REASONS = {
    "a missing optional extra": re.compile(
        r"triton not installed|could not import '(triton|torch_scatter|lammps|matscipy)'|needs CUDA"
        r"|mace-torch venv"
    ),
    "missing ../shared data": re.compile(r"shared (\w+ )?(DFT |rMD17 )?data|\.\./shared|no rMD17 \w+ data under"),
}
_DISALLOWED_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(p.search(reason) for p in ALLOWED_SKIP_REASONS.values()):
            _DISALLOWED_SKIPS.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller decides
        return
    if _DISALLOWED_SKIPS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _DISALLOWED_SKIPS and not hasattr(terminalreporter.config, "workerinput"):
        terminalreporter.section("skips that are not allowed (the run fails)", red=True)
        for nodeid, reason in _DISALLOWED_SKIPS:
            terminalreporter.line(f"{nodeid}: {reason}")
        allowed = "; ".join(ALLOWED_SKIP_REASONS)
        terminalreporter.line(f"a test may only be skipped for {allowed} (tests/conftest.py)")
