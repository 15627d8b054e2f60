"""eSCN pieces: the SO(2) linear map against the o3 reference, S2 grid, layer norm, config,
and (slow) learning on rMD17 ethanol."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3

from mlpot.errors import ConfigError
from mlpot.models.escn import ESCN, EdgeFrameRotation, SO2Linear, edge_frame_index
from mlpot.nn.norm import EquivariantLayerNorm
from mlpot.nn.s2_activation import SeparableS2Activation
from mlpot.o3.s2grid import S2Grid
from mlpot.o3.so2 import SO2Plan, mul_ir_to_sph_channels, so2_conv, sph_channels_to_mul_ir
from mlpot.o3.wigner import edge_rotation, wigner_D_blocks
from mlpot.testing.model_checks import random_orthogonal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sh_irreps(lmax, channels):
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


@pytest.mark.parametrize("lmax,mmax", [(2, 1), (3, 3), (2, 0)])
def test_so2_linear_matches_reference_so2_conv(lmax, mmax):
    """Rotate -> SO2Linear -> rotate back == mlpot.o3.so2.so2_conv with the same shared weights."""
    torch.manual_seed(0)
    cin, cout, E = 3, 2, 7
    lin = SO2Linear(lmax, mmax, cin, cout).double()
    plan = SO2Plan(_sh_irreps(lmax, cin), _sh_irreps(lmax, cout), mmax, mode="full")
    assert all(p.kind == "even" for p in plan.paths)  # sh parity on both sides: no +m <-> -m mixing
    w = torch.zeros(plan.weight_numel, dtype=torch.float64)
    blocks = {m: (start, n, W) for (m, start, n), W in zip(lin.blocks, lin.weights)}
    for p in plan.paths:
        l_i, l_o = p.i_in, p.i_out  # one irrep per degree
        _, n, W = blocks[p.m]
        Wb = W.detach().reshape(n, cin, n, cout)[l_i - p.m, :, l_o - p.m, :]  # (cin, cout)
        w[p.offset : p.offset + p.numel] = Wb.T.reshape(-1)  # (out, in) row-major
    x = torch.randn(E, (lmax + 1) ** 2, cin, dtype=torch.float64)
    vec = torch.randn(E, 3, dtype=torch.float64)
    rows, _, _ = edge_frame_index(lmax, mmax)
    rot = wigner_D_blocks(lmax, edge_rotation(vec))[:, rows, :]
    ours = torch.bmm(rot.transpose(1, 2), lin(torch.bmm(rot, x)))
    # the per-degree rotation used by the model is the same truncated Wigner map
    frame = EdgeFrameRotation(lmax, mmax)
    Ds = frame.setup(vec)
    torch.testing.assert_close(frame.to_frame(Ds, x), torch.bmm(rot, x), rtol=1e-12, atol=1e-12)
    y = torch.randn(E, len(rows), cout, dtype=torch.float64)
    torch.testing.assert_close(frame.from_frame(Ds, y), torch.bmm(rot.transpose(1, 2), y), rtol=1e-12, atol=1e-12)
    ref = mul_ir_to_sph_channels(so2_conv(plan, sph_channels_to_mul_ir(x), vec, w), _sh_irreps(lmax, cout))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert ours.abs().max() > 1e-3


def test_edge_frame_index_layout():
    rows, half, blocks = edge_frame_index(3, 2)
    assert len(rows) == len(set(rows)) == 4 + 2 * 3 + 2 * 2
    assert [m for m, _, _ in blocks] == [0, 1, 2]
    # +m and -m entries of the same l share a modulation slot; m = 0 slots are 0..L
    for m, start, n in blocks[1:]:
        assert half[start : start + n] == half[start + n : start + 2 * n]
        for k in range(n):
            l = m + k
            assert rows[start + k] == l * l + l + m and rows[start + n + k] == l * l + l - m


def test_s2_grid_round_trip_exact():
    lmax = 4
    grid = S2Grid(lmax, lmax + 1, 2 * lmax + 1, impl="matrix")  # the grid of the S2 activation
    to_grid, from_grid = grid.dense_matrices()
    eye = from_grid @ to_grid
    torch.testing.assert_close(eye, torch.eye((lmax + 1) ** 2, dtype=torch.float64), atol=1e-12, rtol=0)


def _rotate(x, R):
    lmax = int(math.isqrt(x.shape[1])) - 1
    D = wigner_D_blocks(lmax, torch.as_tensor(R, dtype=torch.float64))
    return torch.einsum("ab,nbc->nac", D, x)


def test_s2_activation_equivariance_improves_with_resolution_and_inversion_is_exact():
    torch.manual_seed(0)
    lmax = 2
    x = torch.randn(5, 9, 3, dtype=torch.float64)
    R = random_orthogonal(3)
    errs = []
    for res in (6, 12, 24):
        act = SeparableS2Activation(lmax, res_beta=res)
        errs.append(float((act(_rotate(x, R)) - _rotate(act(x), R)).abs().max()))
        inv = -np.eye(3)
        torch.testing.assert_close(act(_rotate(x, inv)), _rotate(act(x), inv), atol=1e-12, rtol=0)
    assert errs[2] < 1e-3 * errs[0], errs
    assert errs[2] < 1e-5, errs  # unit-variance coefficients: |f| up to ~5 on the sphere
    # the scalar part is plain SiLU of the l = 0 coefficient
    act = SeparableS2Activation(lmax)
    torch.testing.assert_close(act(x)[:, 0], torch.nn.functional.silu(x[:, 0]))


def test_layer_norm_equivariant_and_normalised():
    torch.manual_seed(0)
    lmax, C = 3, 4
    norm = EquivariantLayerNorm(lmax, C)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.double()
    x = torch.randn(6, 16, C, dtype=torch.float64)
    for proper in (True, False):
        R = random_orthogonal(1, proper=proper)
        torch.testing.assert_close(norm(_rotate(x, R)), _rotate(norm(x), R), atol=1e-12, rtol=0)
    plain = EquivariantLayerNorm(lmax, C, eps=0.0, affine=False)
    y = plain(x)
    torch.testing.assert_close(y[:, 0].mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    for l in range(lmax + 1):
        ms = y[:, l * l : (l + 1) ** 2].pow(2).mean(dim=(1, 2))
        torch.testing.assert_close(ms, torch.ones(6, dtype=torch.float64))
    z = x.clone()
    z[:, 1:4] = 0
    assert EquivariantLayerNorm(lmax, C)(z)[:, 1:4].abs().max() == 0  # a zero block stays zero (eps > 0)


def _small(**kw):
    cfg = dict(r_max=3.0, atomic_numbers=[1, 8], num_layers=1, lmax=2, mmax=1, sphere_channels=4,
               hidden_channels=4, edge_channels=4, num_bessel=4, seed=3)
    cfg.update(kw)
    return cfg


def test_config_json_and_rebuild():
    model = ESCN(**_small(e0s={"H": -13.6, "O": -2041.8}))
    text = json.dumps(model.config)
    again = ESCN(**json.loads(text))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert model.e0s == {1: -13.6, 8: -2041.8}


@pytest.mark.parametrize(
    "bad", [dict(atomic_numbers=None), dict(ffn_activation="relu"), dict(num_layers=0), dict(backend="cuda!"),
            dict(avg_num_neighbors=0.0)]
)
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError):
        ESCN(**_small(**bad))


# --------------------------------------------------------------------------------------- slow
KCAL_TO_EV = 0.0433641153


def _shared_data() -> Path:
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("MLPOT_SHARED", root.parent / "shared")) / "data"


@pytest.mark.slow
def test_escn_learns_rmd17_ethanol():
    """A small eSCN trained for ~2 minutes on 300 rMD17 ethanol frames cuts the test force MAE
    by at least 3x from its initial value."""
    path = _shared_data() / "rmd17"
    files = sorted(path.glob("*ethanol*train*.npz")) or sorted(path.glob("*ethanol*.npz"))
    if not files:
        pytest.skip(f"no rMD17 ethanol data under {path}")
    from ase import Atoms

    from mlpot.testing.model_checks import build_batch

    raw = np.load(files[0])
    z = raw["nuclear_charges"].astype(int)
    coords = raw["coords"]
    energies = raw["energies"] * KCAL_TO_EV
    forces = raw["forces"] * KCAL_TO_EV
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(coords))
    train, test = idx[:300], idx[300:400]
    species = sorted(set(z.tolist()))
    shift = float(energies[train].mean()) / len(z)
    torch.manual_seed(0)
    model = ESCN(r_max=5.0, atomic_numbers=species, num_layers=2, lmax=2, mmax=2, sphere_channels=16,
                 hidden_channels=32, edge_channels=16, num_bessel=8, avg_num_neighbors=8.0, shift=shift,
                 scale=float(np.std(forces[train])), seed=0)

    def batch(ids):
        g = build_batch([Atoms(numbers=z, positions=coords[i]) for i in ids], model.r_max)
        return g, torch.tensor(energies[ids]), torch.tensor(forces[ids].reshape(-1, 3))

    test_graph, e_test, f_test = batch(test)

    def force_mae():
        model.eval()
        out = model(test_graph, compute_force=True, create_graph=False)
        return float((out["forces"].detach() - f_test).abs().mean())

    start_mae = force_mae()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.time()
    step = 0
    while time.time() - t0 < 120:
        ids = train[rng.choice(len(train), 16, replace=False)]
        g, e, f = batch(ids)
        model.train()
        out = model(g, compute_force=True)
        loss = ((out["energy"] - e) / len(z)).pow(2).mean() + 10.0 * (out["forces"] - f).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    end_mae = force_mae()
    print(f"eSCN ethanol: {step} steps, force MAE {start_mae:.3f} -> {end_mae:.3f} eV/A")
    assert end_mae < start_mae / 3, (start_mae, end_mae)
