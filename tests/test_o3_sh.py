"""Spherical harmonics: parity with e3nn, equivariance (rotations + reflections), gradients."""
import pytest
import torch
from e3nn import o3

from mlpot.errors import DataError
from mlpot.o3 import SphericalHarmonics, spherical_harmonics
from mlpot.testing import assert_equivariant, assert_gradcheck, assert_gradgradcheck

AXES = torch.tensor(
    [[0.0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=torch.float64
)


@pytest.mark.parametrize("lmax", [0, 1, 2, 3, 6, 8, 12])
def test_matches_e3nn_component(lmax):
    g = torch.Generator().manual_seed(lmax)
    v = torch.cat([torch.randn(64, 3, dtype=torch.float64, generator=g), AXES])
    ours = spherical_harmonics(lmax, v, normalize=True)
    ref = o3.spherical_harmonics(list(range(lmax + 1)), v, True, normalization="component")
    assert ours.shape == (v.shape[0], (lmax + 1) ** 2)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    # unnormalised: solid harmonics |v|^l Y_l(v_hat), compared relative to their size
    ours = spherical_harmonics(lmax, v, normalize=False)
    ref = o3.spherical_harmonics(list(range(lmax + 1)), v, False, normalization="component")
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


def test_component_normalisation_high_l():
    # sum_m Y_lm^2 = 2l+1 on the sphere, also beyond e3nn's lmax = 12
    v = torch.randn(32, 3, dtype=torch.float64)
    lmax = 16
    Y = spherical_harmonics(lmax, v)
    for l in range(lmax + 1):
        s = Y[:, l * l : (l + 1) ** 2].pow(2).sum(-1)
        torch.testing.assert_close(s, torch.full_like(s, 2 * l + 1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("lmax", [1, 4, 8])
def test_equivariance_rotations_and_reflections(lmax):
    # e3nn builds D^l from matrix exponentials of its generators; at l = 8 that carries ~1e-10
    # relative round-off of its own, so the bound grows there (our SH match e3nn's to 1e-12).
    assert_equivariant(
        lambda v: spherical_harmonics(lmax, v),
        irreps_in="1o",
        irreps_out=o3.Irreps.spherical_harmonics(lmax),
        batch=8,
        n_matrices=4,
        atol=1e-10 if lmax <= 6 else 5e-10,
    )


def test_float32_close_to_float64():
    v = torch.randn(50, 3, dtype=torch.float64)
    y64 = spherical_harmonics(6, v)
    y32 = spherical_harmonics(6, v.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=2e-5, rtol=0)


def test_gradcheck_and_gradgradcheck_including_axes():
    v = torch.cat([torch.randn(2, 3, dtype=torch.float64), AXES[:3], 0.5 * AXES[4:5]])
    for normalize in (True, False):

        def fn(x, normalize=normalize):
            return spherical_harmonics(3, x, normalize=normalize)

        assert_gradcheck(fn, [v])
        assert_gradgradcheck(fn, [v])


def test_no_nan_at_poles_and_zero_vector():
    v = torch.cat([AXES, torch.zeros(1, 3, dtype=torch.float64)]).requires_grad_(True)
    Y = spherical_harmonics(6, v, normalize=True)
    assert torch.isfinite(Y).all()
    # zero vector -> Y_0 = 1, higher l = 0
    expected = torch.zeros(49, dtype=torch.float64)
    expected[0] = 1
    torch.testing.assert_close(Y[-1], expected)
    w = torch.randn_like(Y)
    (g,) = torch.autograd.grad((Y * w).sum(), v, create_graph=True)
    assert torch.isfinite(g).all()
    (gg,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), v)
    assert torch.isfinite(gg).all()


def test_module_and_errors():
    m = SphericalHarmonics(3, normalize=False)
    v = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(m(v), spherical_harmonics(3, v, normalize=False))
    assert m.dim == 16
    with pytest.raises(DataError):
        spherical_harmonics(2, torch.randn(4, 2))
    with pytest.raises(DataError):
        spherical_harmonics(-1, torch.randn(4, 3))
    with pytest.raises(DataError):
        spherical_harmonics(2, torch.ones(4, 3, dtype=torch.int64))
