"""Every model (and variant) passes the physics checks of :mod:`mlpot.testing.model_checks`.

Models are tiny (a few channels, lmax 2, two layers) with randomized weights, float64, CPU.
"""
from __future__ import annotations

import pytest
import torch

from mlpot.testing import model_checks as mc

SPECIES = [1, 6, 8]
E0S = [-13.6, -1029.5, -2041.8]
R_MAX = 3.0

_MACE_SMALL = dict(
    r_max=R_MAX,
    atomic_numbers=SPECIES,
    e0s=E0S,
    hidden_irreps="4x0e + 4x1o",
    max_ell=2,
    correlation=2,
    num_interactions=2,
    num_bessel=4,
    avg_num_neighbors=4.0,
    # mace-torch's standard first layer (no residual): an atom without neighbours gets exactly E0
    interaction_cls_first="RealAgnosticInteractionBlock",
)
_ESCN_SMALL = dict(
    r_max=R_MAX,
    atomic_numbers=SPECIES,
    e0s=E0S,
    num_layers=2,
    lmax=2,
    mmax=1,
    sphere_channels=4,
    hidden_channels=6,
    edge_channels=4,
    num_bessel=4,
    avg_num_neighbors=4.0,
    seed=0,
)

# name -> (model name, config, equivariance tolerance)
MODELS = {
    "mace": ("MACE", dict(_MACE_SMALL), 1e-9),
    "mace_gaunt_product": ("MACE", dict(_MACE_SMALL, product="gaunt"), 1e-9),
    "mace_gaunt_tp": ("MACE", dict(_MACE_SMALL, interaction_tp="gaunt"), 1e-9),
    "mace_so2_tp": ("MACE", dict(_MACE_SMALL, interaction_tp="so2"), 1e-9),
    # the S2-grid activation is equivariant up to the grid's aliasing error: a fine grid
    # (24 x 48 points for lmax 2) brings it to ~1e-8 on these random weights
    "escn": ("ESCN", dict(_ESCN_SMALL, ffn_activation="s2", grid_resolution=24), 1e-6),
    # exactly equivariant gate activation, with the ZBL pair repulsion on top
    "escn_gate_zbl": ("ESCN", dict(_ESCN_SMALL, ffn_activation="gate", zbl=True), 1e-9),
}

_cache: dict[str, torch.nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def get_model(key: str):
    name, config, _ = MODELS[key]
    if key not in _cache:
        _cache[key] = mc.random_model(name, config)
    return _cache[key]


CHECKS = list(mc.ALL_CHECKS)
TOL_CHECKS = {"rotation", "reflection", "permutation", "translation"}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("key", list(MODELS))
def test_model_check(key, check):
    model = get_model(key)
    fn = mc.ALL_CHECKS[check]
    kwargs = {"tol": MODELS[key][2]} if check in TOL_CHECKS else {}
    if check in ("isolated_atoms", "cutoff", "unknown_element"):
        fn(model, **kwargs)
    else:
        fn(model, None, **kwargs)


def test_checks_catch_a_broken_model():
    """The checks are not vacuous: a model whose energy depends on absolute positions and on a
    fixed direction fails translation, rotation and isolated-atom checks."""
    from mlpot.models.base import PotentialModel

    class Broken(PotentialModel):
        def __init__(self, **config):
            super().__init__(config)
            self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))

        def compute_node_energies(self, graph, vectors):
            pos = graph["positions"]
            return {"node_energy": self.node_e0(graph) + torch.sin(pos @ self.w.to(pos.dtype))}

    model = Broken(r_max=R_MAX, atomic_numbers=SPECIES, e0s=E0S)
    for check in (mc.check_translation_invariance, mc.check_rotation_equivariance):
        with pytest.raises(AssertionError):
            check(model)
    with pytest.raises(AssertionError):
        mc.check_isolated_atoms(model)


def test_energy_checks_compare_interaction_energies_not_e0s():
    """E0s of thousands of eV must not widen the tolerance: a batch-size dependence of 1e-8 eV
    per atom is far below ``1e-10 x |E|`` (|E| ~ 3000 eV) but far above ``1e-10 x |E - sum E0|``."""
    from mlpot.models.base import PotentialModel

    class BatchDependent(PotentialModel):
        def __init__(self, **config):
            super().__init__(config)
            self.k = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def compute_node_energies(self, graph, vectors):
            pair = torch.exp(-self.k * vectors.norm(dim=-1))  # an invariant pair energy, nonzero forces
            node = self.node_e0(graph).index_add(0, graph["edge_index"][1], pair)
            return {"node_energy": node + 1e-8 * graph["num_atoms"].numel()}

    model = BatchDependent(r_max=R_MAX, atomic_numbers=SPECIES, e0s=E0S)
    with pytest.raises(AssertionError, match="batched energy .* of E - sum E0"):
        mc.check_batch_consistency(model)


# ------------------------------------------------------------------ pluggable variants
def _D(irreps, Q):
    """Block-diagonal representation matrix of ``irreps`` at ``Q`` in O(3), to float64 accuracy
    (e3nn's own ``D_from_matrix`` goes through float32 constants)."""
    from e3nn import o3

    from mlpot.o3.wigner import wigner_D

    Q = torch.as_tensor(Q, dtype=torch.float64)
    improper = bool(torch.linalg.det(Q) < 0)
    blocks = []
    for mul, ir in o3.Irreps(irreps):
        # mlpot's wigner_D carries parity (-1)^l for improper Q; fix it to the irrep's parity
        d = wigner_D(ir.l, Q) * ((-1) ** ir.l * ir.p if improper else 1)
        blocks += [d] * mul
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("kind", ["cg", "gaunt", "so2"])
@pytest.mark.parametrize("proper", [True, False])
def test_message_tp_variants_equivariant(kind, proper):
    from mlpot.nn.variants import make_message_tp

    torch.manual_seed(0)
    irreps_in, lmax_sh, target = "3x0e + 3x1o + 3x2e", 2, "0e + 1o + 2e"
    tp = make_message_tp(kind, irreps_in, lmax_sh, target).double()
    assert tp.weight_numel > 0 and tp.irreps_out.dim > 0
    E = 5
    x = torch.randn(E, tp.irreps_in.dim if tp.irreps_in is not None else 27, dtype=torch.float64)
    vec = torch.randn(E, 3, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64)
    Q = mc.random_orthogonal(4, proper=proper)
    Qt = torch.as_tensor(Q)

    def run(x, vec):
        idx = torch.arange(E)
        return tp.message_passing(x, _geometry(vec, lmax_sh, tp.frames_lmax), w, idx, idx, E)

    y = run(x, vec)
    assert y.shape == (E, tp.irreps_out.dim) and y.abs().max() > 1e-3
    y_rot = run(x @ _D(irreps_in, Q).T, vec @ Qt.T)
    torch.testing.assert_close(y_rot, y @ _D(tp.irreps_out, Q).T, atol=1e-10, rtol=1e-10)


def _geometry(vec, lmax_sh, frames_lmax):
    """The shared edge geometry of ``vec``: harmonics, and frames when ``frames_lmax`` is set."""
    from mlpot.o3.message_passing import EdgeGeometry
    from mlpot.o3.spherical_harmonics import spherical_harmonics
    from mlpot.o3.wigner import edge_rotation, wigner_D_list

    rot = None if frames_lmax is None else edge_rotation(vec)
    return EdgeGeometry(
        vectors=vec, lengths=vec.norm(dim=-1, keepdim=True), sh=spherical_harmonics(lmax_sh, vec), rotation=rot,
        wigner=None if rot is None else wigner_D_list(frames_lmax, rot),
    )


def test_so2_message_tp_needs_frames():
    from mlpot.errors import ConfigError
    from mlpot.nn.variants import make_message_tp

    tp = make_message_tp("so2", "2x0e + 2x1o", 1, "0e + 1o")
    x = torch.randn(3, tp.irreps_in.dim)
    idx = torch.arange(3)
    with pytest.raises(ConfigError, match="wigner"):
        tp.message_passing(x, _geometry(torch.randn(3, 3), 1, None), torch.randn(3, tp.weight_numel), idx, idx, 3)


@pytest.mark.parametrize("proper", [True, False])
def test_gaunt_product_basis_equivariant(proper):
    from mlpot.nn.variants import make_product_basis

    torch.manual_seed(0)
    C, lmax, S = 3, 2, 2
    irreps_in = f"{C}x0e + {C}x1o + {C}x2e"
    irreps_out = f"{C}x0e + {C}x1o"
    pb = make_product_basis("gaunt", irreps_in, irreps_out, correlation=3, num_elements=S).double()
    N = 4
    feats = torch.randn(N, C, (lmax + 1) ** 2, dtype=torch.float64)
    attrs = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), S).double()
    Q = mc.random_orthogonal(5, proper=proper)
    from e3nn import o3

    D_sh = _D("0e + 1o + 2e", Q)
    y = pb(feats, attrs)
    assert y.shape == (N, o3.Irreps(irreps_out).dim) and y.abs().max() > 1e-3
    torch.testing.assert_close(pb(feats @ D_sh.T, attrs), y @ _D(irreps_out, Q).T, atol=1e-10, rtol=1e-10)


def test_unknown_variant_kinds():
    from mlpot.errors import ConfigError
    from mlpot.nn.variants import make_message_tp, make_product_basis

    with pytest.raises(ConfigError, match="gaunt"):
        make_message_tp("fft", "2x0e", 1, "0e")
    with pytest.raises(ConfigError, match="symmetric"):
        make_product_basis("cheb", "2x0e", "2x0e", 2, 1)
