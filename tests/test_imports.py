"""Every mlpot module imports on its own, and mlpot's import graph has no cycle."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlpot.testing.import_graph import find_cycles, import_graph, package_modules

REPO = Path(__file__).resolve().parents[1]
# the packages of the distribution: every folder of mlpot/ with an __init__.py, and mlpot.kernels
# (the top-level kernels/ folder, mapped by `package-dir`)
PACKAGES = sorted(
    {".".join(("mlpot", *p.parent.relative_to(REPO / "mlpot").parts)) for p in (REPO / "mlpot").rglob("__init__.py")}
    | {"mlpot.kernels"}
)
MODULES = sorted(package_modules(PACKAGES))

# Third-party dependencies the driver imports once before forking; each child then starts with
# no mlpot module loaded, exactly as `python -c "import mlpot.x"` would, without paying for torch
# again 80 times.
_PRELOAD = ["numpy", "scipy", "torch", "torch._dynamo", "e3nn.o3", "e3nn.nn", "ase", "ase.io", "h5py"]

_DRIVER = textwrap.dedent(
    """
    import importlib, json, os, sys, traceback
    for name in {preload!r}:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m == "mlpot" or m.startswith("mlpot.")]
    failures = {{}}
    for name in json.loads(sys.stdin.read()):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            err = fh.read().decode()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failures[name] = err or f"exit status {{status}}"
    print(json.dumps(failures))
    """
).format(preload=_PRELOAD)


def test_pyproject_lists_every_package():
    """A package missing from pyproject.toml's explicit list would not be installed."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert [p for p in PACKAGES if f'"{p}"' not in pyproject] == []
    assert "mlpot.kernels._runtime" in MODULES and "mlpot.data.graph" in MODULES


def test_no_import_cycle_inside_mlpot():
    graph = import_graph(package_modules(PACKAGES))
    cycles = find_cycles(graph)
    detail = "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} imports {b}" for a in c for b in sorted(graph[a]) if b in c) + ")"
        for c in cycles
    )
    assert not cycles, f"import cycles inside mlpot: {detail}"


def test_cycle_detector_sees_deferred_imports_and_skips_type_checking(tmp_path, monkeypatch):
    """The detector itself: a cycle closed by an import inside a function is found; an import
    under ``if TYPE_CHECKING:`` is not an edge."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nimport cyclepkg.a\nif TYPE_CHECKING:\n    from cyclepkg.d import y\n"
    )
    (pkg / "d.py").write_text("import cyclepkg.c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = import_graph(package_modules(["cyclepkg"]))
    assert graph["cyclepkg.b"] == {"cyclepkg.a"} and graph["cyclepkg.c"] == {"cyclepkg.a"}
    assert find_cycles(graph) == [["cyclepkg.a", "cyclepkg.b"]]


def test_every_module_imports_alone():
    """Each module, imported first in an interpreter with no mlpot module loaded."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER], input=json.dumps(MODULES), capture_output=True, text=True,
        cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{err}" for name, err in failures.items())


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_imports_in_a_fresh_interpreter(module):
    """The same, one bare `python -c "import ..."` per module (nothing preloaded)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
