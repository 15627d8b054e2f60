"""EquiformerV2 and Facet under ``backend: triton`` (CPU interpreter, tiny sizes): EquiformerV2 runs
its SO(2) linear maps and Bessel basis on the kernels with the reference's energy, forces and
training gradients; ops without a kernel (Facet's spline radial) are a ConfigError at build time
naming the op, never a silent fallback."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from ase.build import molecule

from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.o3 import backend as B
from mlpot.o3.backend import kernels_module
from mlpot.testing.model_checks import build_batch

RT = kernels_module("_runtime")

TINY = dict(r_max=3.0, atomic_numbers=[1, 6, 8], num_layers=2, lmax=2, mmax=1, sphere_channels=3,
            attn_hidden_channels=3, num_heads=2, attn_alpha_channels=2, attn_value_channels=2,
            ffn_hidden_channels=4, edge_channels=3, num_bessel=4, avg_num_neighbors=4.0, seed=0)


def _rel_own(a, b):
    return ((a - b).abs().max() / max(1e-8, b.abs().max().item())).item()


def _force_loss_gradients(backend, **config):
    torch.manual_seed(0)
    model = build_model("EquiformerV2", backend=backend, **dict(TINY, **config)).double()
    atoms = molecule("CH3OH")
    atoms.rattle(0.1, seed=1)
    out = model(build_batch([atoms], 3.0), compute_force=True, create_graph=True)
    loss = (out["forces"] ** 2).sum() + out["energy"].sum() ** 2
    named = [(n, p) for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return out, {n: g for (n, _), g in zip(named, grads)}


def test_equiformer_v2_triton_equals_reference_and_launches_the_kernels():
    ref_out, ref_grads = _force_loss_gradients("reference")
    with RT.count_launches() as launched:
        tri_out, tri_grads = _force_loss_gradients("triton")
    kernels = {"_so2_linear_gemm_kernel", "_so2_linear_wgrad_kernel"}
    assert any(k.startswith("_sh_fwd_l") for k in launched), sorted(launched)
    assert kernels <= set(launched), f"kernels not launched: {sorted(kernels - set(launched))}"
    assert _rel_own(tri_out["energy"], ref_out["energy"]) < 1e-9
    assert _rel_own(tri_out["forces"], ref_out["forces"]) < 1e-9
    checked = 0
    for name, ref in ref_grads.items():
        tri = tri_grads[name]
        assert (ref is None) == (tri is None), name
        if ref is None:
            continue
        assert _rel_own(tri, ref) < 1e-8, f"d loss / d {name} differs by {_rel_own(tri, ref):.2e}"
        checked += 1
    assert checked > 20
    model = build_model("EquiformerV2", backend="triton", **TINY)
    assert {m.backend for m in model.modules() if getattr(m, "op", "") == "so2_linear"} == {"triton"}


def test_ops_without_a_kernel_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"op 'spline_radial' has no 'triton' backend"):
        build_model("Facet", atomic_numbers=[1, 8], num_layers=1, lmax=1, sphere_channels=2, hidden_channels=2,
                    backend="triton")
    with pytest.raises(ConfigError, match=r"op 'spline_radial' has no 'triton' backend"):
        build_model("EquiformerV2", backend="triton", **dict(TINY, radial="spline"))
    with pytest.raises(ConfigError, match=r"op 'spline_radial' has no 'triton' backend"):
        build_model("MACE", atomic_numbers=[1, 8], hidden_irreps="2x0e + 2x1o", max_ell=1, radial="spline",
                    backend="triton")
    build_model("Facet", atomic_numbers=[1, 8], num_layers=1, lmax=1, sphere_channels=2, hidden_channels=2,
                backend="auto")  # auto: the reference where no kernel exists, and says so in the log
    monkeypatch.delitem(B.REGISTRY, ("so2_linear", "triton"))
    with pytest.raises(ConfigError, match=r"op 'so2_linear' has no 'triton' backend"):
        build_model("EquiformerV2", backend="triton", **TINY)
    monkeypatch.undo()
    monkeypatch.delitem(B.REGISTRY, ("edge_embedding", "triton"))
    with pytest.raises(ConfigError, match=r"op 'edge_embedding' has no 'triton' backend"):
        build_model("EquiformerV2", backend="triton", **TINY)
