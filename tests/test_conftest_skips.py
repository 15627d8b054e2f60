"""`make test` fails when a test is skipped for a reason other than a missing optional extra or
missing ../shared data (the hooks in tests/conftest.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = '''
import pytest

def test_passes():
    assert True

@pytest.mark.skipif(True, reason="triton not installed")
def test_without_the_extra():
    assert False

def test_without_shared_data():
    pytest.skip("shared data folder (../shared/data) not present")
'''

HIDDEN = '''
import pytest

def test_hidden_regression():
    pytest.skip("flaky, look later")
'''


def _run(tmp_path, files: dict, *args) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_allowed_skips_keep_the_run_green(tmp_path):
    proc = _run(tmp_path, {"test_ok.py": TESTS})
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed, 2 skipped" in proc.stdout


def test_any_other_skip_fails_the_run(tmp_path):
    proc = _run(tmp_path, {"test_ok.py": TESTS, "test_hidden.py": HIDDEN})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "test_hidden.py::test_hidden_regression: flaky, look later" in proc.stdout


def test_any_other_skip_fails_the_run_under_xdist(tmp_path):
    proc = _run(tmp_path, {"test_hidden.py": HIDDEN}, "-n", "2")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "flaky, look later" in proc.stdout
