"""Shared pytest set-up: float64 by default, few threads, locating ../shared data."""
from __future__ import annotations

import os
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
