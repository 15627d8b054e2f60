"""TensorNet passes the model physics battery; its SO(3)-only option is rotation- but not
reflection-invariant; the I/A/S decomposition is the irreducible one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.models.tensornet import decompose, skew
from mlpot.testing import model_checks as mc

SPECIES = [1, 6, 8]
E0S = [-13.6, -1029.5, -2041.8]
SMALL = dict(r_max=3.0, atomic_numbers=SPECIES, e0s=E0S, num_channels=4, num_layers=2, num_rbf=6,
             avg_num_neighbors=4.0, readout_hidden=8, seed=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_cache: dict = {}


def get_model(equivariance="O(3)"):
    if equivariance not in _cache:
        model = build_model("TensorNet", **dict(SMALL, equivariance=equivariance)).to(torch.float64)
        mc.randomize_parameters(model, seed=1, scale=0.3)
        model.eval()
        _cache[equivariance] = model
    return _cache[equivariance]


@pytest.mark.parametrize("check", list(mc.ALL_CHECKS))
def test_tensornet_battery(check):
    fn = mc.ALL_CHECKS[check]
    model = get_model()
    if check in ("isolated_atoms", "cutoff", "unknown_element"):
        fn(model)
    else:
        fn(model, None)


def test_so3_option_is_rotation_equivariant_but_chiral():
    model = get_model("SO(3)")
    mc.check_rotation_equivariance(model)
    mc.check_forces_finite_difference(model)
    with pytest.raises(AssertionError, match="reflection"):
        mc.check_reflection_equivariance(model)


def test_decomposition_is_irreducible_and_skew_is_cross_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    iso, anti, sym = decompose(x)
    assert torch.allclose(iso + anti + sym, x)
    assert torch.allclose(anti, -anti.transpose(-1, -2))
    assert torch.allclose(sym, sym.transpose(-1, -2))
    assert torch.allclose(sym.diagonal(dim1=-2, dim2=-1).sum(-1), torch.zeros(5, dtype=torch.float64))
    # each part transforms on its own: decompose(Q X Q^T) = Q decompose(X) Q^T
    q = torch.as_tensor(mc.random_orthogonal(3), dtype=torch.float64)
    for a, b in zip(decompose(q @ x @ q.T), (iso, anti, sym)):
        assert torch.allclose(a, q @ b @ q.T)
    v, u = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(skew(v) @ u[..., None], torch.linalg.cross(v, u)[..., None])


def test_equivariance_option_is_validated():
    with pytest.raises(ConfigError, match="equivariance"):
        build_model("TensorNet", **dict(SMALL, equivariance="E(3)-ish"))


def _valid_column(run, column):
    import csv

    with open(run / "log.csv") as fh:
        return [float(r[column]) for r in csv.DictReader(fh) if r[column]]


def test_tensornet_trains_from_cli(tmp_path):
    """`mlpot train` with `model.name: TensorNet` on EMT Cu cells lowers the validation force error."""
    import yaml

    from mlpot.cli.main import main

    run = tmp_path / "run"
    config = {
        "output": str(run),
        "seed": 0,
        "data": {"synthetic": {"system": "cu", "n_train": 24, "n_valid": 8, "n_test": 0, "seed": 0}},
        "model": dict(name="TensorNet", r_max=4.0, num_channels=16, num_layers=1, num_rbf=8, e0s="average",
                      avg_num_neighbors="auto", readout_hidden=32, seed=0),
        "training": {"epochs": 10, "batch_size": 4, "lr": 0.01, "forces_weight": 10.0, "ema": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    f_mae = _valid_column(run, "valid_f_mae")
    assert np.isfinite(f_mae[-1]) and min(f_mae) < 0.5 * f_mae[0], f_mae
