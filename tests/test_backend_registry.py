"""The (op, backend) registry: the README's table, build-time errors, auto's pick, no silent fallback."""
import logging
import re
from pathlib import Path

import pytest

from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.o3 import backend as B

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table():
    text = README.read_text()
    body = text.split("<!-- backend-table -->", 1)[1].split("<!-- /backend-table -->", 1)[0]
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        op = cells[0].strip("`")
        rows[op] = tuple(b for b, cell in zip(B.IMPLEMENTATIONS, cells[3:6]) if cell.startswith("yes"))
    return rows


def test_readme_backend_table_matches_registry():
    assert _readme_table() == dict(B.backend_table())


def test_every_registered_implementation_imports():
    for (op, backend), impl in B.REGISTRY.items():
        assert callable(impl.load()), f"{op}/{backend}: {impl.target} is not callable"


def test_unsupported_pair_is_a_config_error_naming_op_and_backend(monkeypatch):
    monkeypatch.delitem(B.REGISTRY, ("symmetric_contraction", "triton"))
    with pytest.raises(ConfigError, match=r"op 'symmetric_contraction' has no 'triton' backend"):
        build_model("MACE", hidden_irreps="2x0e", max_ell=1, correlation=2, num_interactions=1, r_max=3.0,
                    atomic_numbers=[1], radial_MLP=[4], backend="triton")


def test_unsupported_option_is_a_config_error(monkeypatch):
    monkeypatch.setitem(B.REGISTRY, ("gaunt_product", "triton"),
                        B.OpImplementation("gaunt_product", "triton", "mlpot.kernels.gaunt:gaunt_product",
                                           {"method": ("grid",)}))
    with pytest.raises(ConfigError, match=r"'gaunt_product' on backend 'triton' does not support method='fourier'"):
        build_model("MACE", hidden_irreps="2x0e", max_ell=1, correlation=2, num_interactions=1, r_max=3.0,
                    atomic_numbers=[1], radial_MLP=[4], interaction_tp="gaunt", gaunt_method="fourier",
                    backend="triton")


def test_so2_kernel_layout_limit_is_a_config_error():
    """The SO(2) kernel needs one multiplicity per side; a plan with two is refused at build time."""
    from mlpot.o3.so2 import SO2MessageTP

    with pytest.raises(ConfigError, match=r"'so2_message_passing' on backend 'triton' does not support layout"):
        SO2MessageTP("2x0e + 3x1o", 1, "0e + 1o", mmax=1, backend="triton")
    SO2MessageTP("2x0e + 2x1o", 1, "0e + 1o", mmax=1, backend="triton")


def test_auto_picks_on_cpu_and_logs_once(caplog):
    B._AUTO_LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="mlpot.o3.backend"):
        assert B.select_backend("so2_linear", "auto", "cpu") == "reference"  # no CPU kernels
        assert B.select_backend("so2_linear", "auto", "cpu") == "reference"
        # the CPU kernels where the op has them and the call suits them (inference)
        assert B.select_backend("channelwise_tp", "auto", "cpu", layout="uniform", training=False) == "cpu"
        assert B.select_backend("channelwise_tp", "auto", "cpu", layout="uniform", training=True) == "reference"
    picks = [r.getMessage() for r in caplog.records if "so2_linear" in r.getMessage()]
    assert picks == ["backend auto: op so2_linear runs on reference (device cpu)"]
    picks = [r.getMessage() for r in caplog.records if "channelwise_tp" in r.getMessage()]
    assert picks == ["backend auto: op channelwise_tp runs on cpu (device cpu)",
                     "backend auto: op channelwise_tp runs on reference (device cpu)"]


def test_model_options_validated():
    common = dict(hidden_irreps="2x0e", max_ell=1, correlation=2, num_interactions=1, r_max=3.0,
                  atomic_numbers=[1], radial_MLP=[4])
    with pytest.raises(ConfigError, match="gaunt_method"):
        build_model("MACE", gaunt_method="fourier", **common)
    with pytest.raises(ConfigError, match="mmax"):
        build_model("MACE", mmax=1, **common)
    with pytest.raises(ConfigError, match="mmax"):
        build_model("MACE", mmax=-1, interaction_tp="so2", **common)
    m = build_model("MACE", interaction_tp="so2", mmax=0, **common)
    assert m.interactions[0].conv_tp.mmax == 0
    g = build_model("MACE", interaction_tp="gaunt", product="gaunt", gaunt_method="fourier", **common)
    assert g.interactions[0].conv_tp.method == "fourier"
    assert g.products[0].symmetric_contractions.method == "fourier"


def test_o3_does_not_import_nn():
    import subprocess
    import sys

    code = "import sys, mlpot.o3; print(sorted(m for m in sys.modules if m.startswith(('mlpot.nn', 'mlpot.models'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_silent_backend_dropping_left():
    """The old factory dropped ``backend=`` for constructors without it; none may remain."""
    src = (Path(__file__).resolve().parents[1] / "mlpot" / "nn" / "variants.py").read_text()
    assert not re.search(r"_call_with_supported|inspect\.signature", src)


def test_escn_triton_builds_on_its_kernels_and_names_a_missing_one(monkeypatch):
    kw = dict(atomic_numbers=[1], num_layers=1, lmax=1, mmax=1, sphere_channels=2, hidden_channels=2,
              edge_channels=2)
    model = build_model("ESCN", backend="triton", **kw)
    assert {m.backend for m in model.modules() if getattr(m, "op", "") == "so2_linear"} == {"triton"}
    build_model("ESCN", backend="auto", **kw)
    monkeypatch.delitem(B.REGISTRY, ("so2_linear", "triton"))
    with pytest.raises(ConfigError, match=r"op 'so2_linear' has no 'triton' backend"):
        build_model("ESCN", backend="triton", **kw)
    monkeypatch.undo()
    monkeypatch.delitem(B.REGISTRY, ("edge_embedding", "triton"))
    with pytest.raises(ConfigError, match=r"op 'edge_embedding' has no 'triton' backend"):
        build_model("ESCN", backend="triton", **kw)
