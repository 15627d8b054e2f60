"""Force-training gradients through the Triton kernels equal the torch reference (float64, 1e-10).

Training differentiates a loss of the forces, ``L(E, -dE/dx)``, with respect to the parameters.
Inside that second backward pass the upstream gradient of a kernel (``dE/d out``) depends on the
kernel's own inputs through the rest of the model. The kernel tests with a constant upstream
gradient cannot see an error there: these tests make the upstream gradient depend on the inputs,
first for each kernel alone and then for whole models built with ``backend: triton``.

All kernels run on Triton's CPU interpreter.
"""
import os
import re

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from ase.build import molecule
from e3nn import o3

from mlpot.models import build_model
from mlpot.o3.backend import kernels_module
from mlpot.testing.model_checks import build_batch

SC = kernels_module("symmetric_contraction")
SH = kernels_module("spherical_harmonics")
SO2K = kernels_module("so2")
CT = kernels_module("channelwise_tp")
GA = kernels_module("gaunt")
LK = kernels_module("so2_linear")
RT = kernels_module("_runtime")

TOL = 1e-10


def _rel(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _force_loss_grads(fn, inputs, positions):
    """Gradient w.r.t. every input of ``L = |dE/dpositions|^2 + E^2`` with ``E = sum(out^3)``.

    ``dE/d out = 3 out^2`` depends on the inputs, as the upstream gradient of a layer does in a model.
    """
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    energy = sum((o ** 3).sum() for o in outs)
    forces = torch.autograd.grad(energy, [inputs[i] for i in positions], create_graph=True)
    loss = sum((f ** 2).sum() for f in forces) + energy ** 2
    return torch.autograd.grad(loss, inputs)


def _assert_same_grads(kernel_fn, reference_fn, inputs, positions):
    gk = _force_loss_grads(kernel_fn, inputs, positions)
    gr = _force_loss_grads(reference_fn, inputs, positions)
    for i, (a, b) in enumerate(zip(gk, gr)):
        assert b.abs().max() > 1e-8, f"input {i}: reference gradient vanishes, the test is vacuous"
        assert _rel(a, b) < TOL, f"input {i}: kernel vs reference {_rel(a, b):.2e}"


def _leaf(*shape, gen, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()


def test_symmetric_contraction_force_loss():
    g = torch.Generator().manual_seed(21)
    D, C, Z, N = 4, 3, 2, 3
    Us = []
    for nu, q in ((1, 1), (2, 2), (3, 1)):
        u = torch.randn(2, *([D] * nu), q, generator=g, dtype=torch.float64)
        Us.append(u * (torch.rand(u.shape, generator=g) < 0.3))
    table = SC.build_table(Us)
    elem = torch.tensor([1, 0, 1])
    A, W = _leaf(N, D, C, gen=g, scale=0.5), _leaf(Z, table.Q, C, gen=g, scale=0.5)

    def kernel(a, w):
        return SC.symmetric_contraction(a, elem, [w], table)

    def reference(a, w):
        return SC.reference_symmetric_contraction(a, elem, Us, list(torch.split(w, table.Qs, dim=1)))

    _assert_same_grads(kernel, reference, (A, W), positions=[0])


def test_edge_embedding_force_loss():
    g = torch.Generator().manual_seed(22)
    vec = _leaf(7, 3, gen=g, scale=1.5)
    r_max, nb, lmax = 4.0, 3, 3
    freqs = torch.arange(1, nb + 1, dtype=torch.float64) * torch.pi / r_max

    def kernel(v):
        return SH.edge_embedding(v, lmax, nb, r_max)

    def reference(v):
        return SH.reference_edge_embedding(v, lmax, freqs, r_max, 5)

    _assert_same_grads(kernel, reference, (vec,), positions=[0])


def test_so2_message_passing_force_loss():
    from mlpot.o3 import so2 as S
    from mlpot.o3 import wigner as Wg

    g = torch.Generator().manual_seed(23)
    L, C, N = 2, 2, 3
    irreps = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
    plan = S.SO2Plan(irreps, irreps, 1, mode="full")
    table = SO2K.SO2Table(plan)
    src = torch.tensor([0, 1, 2, 2, 0, 1])
    dst = torch.tensor([1, 1, 0, 2, 2, 1])
    edge_plan = CT.EdgePlan.build(src, dst, N)
    x = _leaf(N, (L + 1) ** 2, C, gen=g, scale=0.5)
    w = _leaf(len(src), plan.weight_numel, gen=g, scale=0.5)
    vec = _leaf(len(src), 3, gen=g)

    def kernel(x_, w_, v):
        return SO2K.so2_message_passing(x_, w_, Wg.wigner_D_blocks(L, Wg.edge_rotation(v)), edge_plan, table)

    def reference(x_, w_, v):
        wig = Wg.wigner_D_blocks(L, Wg.edge_rotation(v))
        return SO2K.reference_so2_message_passing(x_, w_, wig, src, dst, N, table)

    _assert_same_grads(kernel, reference, (x, w, vec), positions=[0, 2])


def test_gaunt_and_channelwise_force_loss():
    g = torch.Generator().manual_seed(24)
    x1, x2 = _leaf(2, 3, 9, gen=g), _leaf(2, 3, 4, gen=g)
    _assert_same_grads(lambda a, b: GA.gaunt_product(a, b, 2),
                       lambda a, b: GA.reference_gaunt_product(a, b, 2), (x1, x2), positions=[1])


def test_so2_linear_force_loss():
    from mlpot.o3.so2 import so2_linear

    g = torch.Generator().manual_seed(25)
    table = LK.SO2LinearTable(2, 2, 2, 3)
    x = _leaf(4, table.K, 2, gen=g, scale=0.5)
    ws = [_leaf(n * 2, n * 3, gen=g, scale=0.5) for _, _, n in table.blocks]
    _assert_same_grads(lambda x_, *w: LK.so2_linear(x_, list(w), table),
                       lambda x_, *w: so2_linear(x_, list(w), table.blocks), (x, *ws), positions=[0])


# ------------------------------------------------------------------------------------------------
# whole models: every kernel-backed op of MACE, as a training step sees it
# ------------------------------------------------------------------------------------------------
#: variant -> (model options, the kernels a triton model must launch)
MACE_VARIANTS = {
    "cg-symmetric": ({}, {"_sh_fwd_l2", "_segment_sum_kernel", "_sc_fwd_", "_sc_dA_"}),
    "gaunt-symmetric": ({"interaction_tp": "gaunt"}, {"_sh_fwd_l2", "_grid_product_kernel", "_sc_fwd_", "_sc_dA_"}),
    "so2-symmetric": ({"interaction_tp": "so2"},
                      {"_sh_fwd_l0", "_so2_node_kernel", "_so2_bwd_kernel", "_so2_edge_kernel", "_sc_fwd_", "_sc_dA_"}),
    "cg-gaunt": ({"product": "gaunt"}, {"_sh_fwd_l2", "_segment_sum_kernel", "_grid_product_kernel"}),
    "gaunt-gaunt-fourier": ({"interaction_tp": "gaunt", "product": "gaunt", "gaunt_method": "fourier",
                             "num_interactions": 1}, {"_sh_fwd_l2", "_grid_product_kernel"}),
}


def _training_gradients(name: str, backend: str, **config):
    """Energy, forces and the parameter gradients of a force loss of model ``name`` on methanol."""
    torch.manual_seed(0)
    model = build_model(name, r_max=3.0, atomic_numbers=[1, 6, 8], backend=backend, **config).double()
    atoms = molecule("CH3OH")
    atoms.rattle(0.1, seed=1)
    out = model(build_batch([atoms], 3.0), compute_force=True, create_graph=True)
    loss = (out["forces"] ** 2).sum() + out["energy"].sum() ** 2
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return out, {n: gr for (n, _), gr in zip(named, grads)}


def _reference_and_triton(name: str, **config):
    """``(reference, triton, launched kernel names)``, each of the first two ``(out, grads)``."""
    ref = _training_gradients(name, "reference", **config)
    with RT.count_launches() as launched:
        tri = _training_gradients(name, "triton", **config)
    return ref, tri, {re.sub(r"_[0-9a-f]{16}$", "_", k) for k in launched}  # generated: hash dropped


@pytest.mark.parametrize("variant", sorted(MACE_VARIANTS))
def test_mace_triton_force_training_gradients_equal_reference(variant):
    options, kernels = MACE_VARIANTS[variant]
    (ref_out, ref_grads), (tri_out, tri_grads), launched = _reference_and_triton(
        "MACE", hidden_irreps="4x0e + 4x1o", max_ell=2, correlation=2, **{"num_interactions": 2, **options})
    assert kernels <= launched, f"{variant}: kernels not launched: {sorted(kernels - launched)}"
    if variant.startswith("cg-"):  # the loss backward builds no graph: the fused double backward
        assert {k[:8] for k in launched if k.startswith("_mp_")} == {"_mp_fwd_", "_mp_bwd_", "_mp_tbw_"}
    assert _rel(tri_out["energy"], ref_out["energy"]) < TOL
    assert _rel(tri_out["forces"], ref_out["forces"]) < TOL
    assert ref_grads.keys() == tri_grads.keys()
    checked = 0
    for name, ref in ref_grads.items():
        tri = tri_grads[name]
        assert (ref is None) == (tri is None), name
        if ref is None:
            continue
        assert _rel(tri, ref) < TOL, f"{variant}: d loss / d {name} differs by {_rel(tri, ref):.2e}"
        checked += 1
    assert checked >= 10


def _rel_own(a, b):
    """Relative to ``b``'s own size (ESCN's gradients are 1e-6..1e-2: ``_rel`` would be absolute);
    below 1e-8 absolute."""
    return ((a - b).abs().max() / max(1e-8, b.abs().max().item())).item()


def test_escn_triton_force_training_gradients_equal_reference():
    """ESCN with ``backend: triton``: the SO(2) linear maps and the radial basis run on their
    kernels (the Wigner rotations stay torch ops); energy, forces and every parameter gradient of
    a force loss equal the reference."""
    (ref_out, ref_grads), (tri_out, tri_grads), launched = _reference_and_triton(
        "ESCN", num_layers=3, lmax=2, mmax=1, sphere_channels=3, hidden_channels=3, edge_channels=3,
        num_bessel=4, ffn_activation="gate")
    kernels = {"_sh_fwd_l0", "_sh_bwd_l0", "_so2_linear_gemm_kernel", "_so2_linear_wgrad_kernel"}
    assert kernels <= launched, f"ESCN: kernels not launched: {sorted(kernels - launched)}"
    assert _rel_own(tri_out["energy"], ref_out["energy"]) < TOL
    assert _rel_own(tri_out["forces"], ref_out["forces"]) < TOL
    assert ref_grads.keys() == tri_grads.keys()
    for name, ref in ref_grads.items():
        tri = tri_grads[name]
        assert (ref is None) == (tri is None), name
        if ref is None:
            continue
        err = _rel_own(tri, ref)
        assert err < TOL, f"ESCN: d loss / d {name} differs by {err:.2e} relative"
    # the m = 1 blocks are exercised in the middle layer only: the first layer's input has l = 0
    # features alone (its m = 1 rows are zero), and the last layer's l >= 1 output never reaches
    # the energy (the readout and the feed-forward's scalars read l = 0 only)
    conv = [n for n in ref_grads if ".conv" in n and (n.startswith("layers.1.") or n.endswith("weights.0"))]
    assert len(conv) == 8
    for name in conv:
        assert ref_grads[name].abs().max() > 1e-8, f"{name}: vanishing gradient, the test is vacuous"
