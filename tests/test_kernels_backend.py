"""The backend switch (mlpot.o3.backend) and errors of the kernel entry points."""
import pytest
import torch

from mlpot.errors import ConfigError
from mlpot.o3.backend import resolve_backend, triton_available


def test_reference_always(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("auto", "cpu") == "reference"  # auto never picks the interpreter


def test_unknown_backend():
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("cuda-magic", "cpu")


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"


def test_triton_missing_is_a_config_error(monkeypatch):
    import mlpot.o3.backend as B

    monkeypatch.setattr(B, "_triton_import_error", lambda: "ImportError: no triton")
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_backend("triton", "cuda")
    assert resolve_backend("auto", "cuda") == "reference"


def test_bench_kernels_quick_smoke(tmp_path):
    from mlpot.cli.main import main

    rc = main(["bench", "kernels", "--quick", "--kernels", "sh", "gaunt", "--modes", "fwd", "fwd+bwd",
               "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    import json

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"sh", "gaunt"}
    ours = [r for r in rows if r["impl"] == "reference"]
    assert {r["kernel"] for r in ours} == {"sh", "gaunt"}
    assert all(r["ms"] is not None and r["ms"] > 0 for r in ours)
    assert (tmp_path / "results.md").read_text().startswith("| kernel")


def test_bench_cli_missing_module_is_clear(capsys):
    from mlpot.cli import bench

    args = type("Args", (), {"benchmark": "nonexistent", "bench_args": ()})()
    with pytest.raises(ConfigError, match="not available"):
        bench.run(args)
