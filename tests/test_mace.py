"""mlpot's MACE: physics checks on a tiny model, configuration, save/load, variants of its blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

import mlpot
from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.testing import model_checks as mc

SPECIES = [1, 6, 8]
TINY = {
    "r_max": 3.0,
    "atomic_numbers": SPECIES,
    "e0s": {"H": -13.6, "C": -1029.5, "O": -2041.8},
    "hidden_irreps": "3x0e + 3x1o",
    "max_ell": 2,
    "correlation": 3,
    "num_interactions": 2,
    "num_bessel": 4,
    "radial_MLP": [8, 8],
    "MLP_irreps": "4x0e",
    "avg_num_neighbors": 3.0,
    "scale": 1.3,
    # the isolated-atom check (E = E0 for a lone atom) needs the lone-atom readout subtracted;
    # mlpot's default (False) is mace-torch's function
    "subtract_isolated": True,
    "seed": 0,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_cache = {}


def tiny(**overrides):
    key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
    if key not in _cache:
        model = build_model("MACE", **{**TINY, **overrides})
        mc.randomize_parameters(model, seed=1, scale=0.3)
        model.eval()
        _cache[key] = model
    return _cache[key]


@pytest.mark.parametrize(
    "check",
    # (tests/test_models.py runs every check of mlpot.testing on a MACE with correlation 2)
    ["rotation", "reflection", "forces_fd", "stress_fd", "isolated_atoms"],
)
def test_physics(check):
    model = tiny()
    fn = mc.ALL_CHECKS[check]
    if check == "isolated_atoms":
        fn(model)
    else:
        fn(model, None)


@pytest.mark.parametrize(
    "overrides",
    [
        {"interaction_cls_first": "RealAgnosticInteractionBlock", "interaction_cls": "RealAgnosticInteractionBlock"},
        {"correlation": [1, 2], "hidden_irreps": "2x0e+2x0o+2x1o+2x1e"},
        {"num_interactions": 1, "max_ell": 1},
    ],
)
def test_variants_equivariant_and_conservative(overrides):
    model = tiny(**overrides)
    mc.check_rotation_equivariance(model, None)
    mc.check_reflection_equivariance(model, None)
    mc.check_forces_finite_difference(model, None)


def test_defaults_and_config():
    model = build_model("MACE", atomic_numbers=[29])
    c = model.config
    assert (c["r_max"], c["num_bessel"], c["num_polynomial_cutoff"], c["max_ell"]) == (5.0, 8, 5, 3)
    assert c["hidden_irreps"] == "128x0e+128x1o"
    assert c["correlation"] == [3, 3] and c["num_interactions"] == 2 and c["radial_MLP"] == [64, 64, 64]
    assert (c["interaction_tp"], c["product"], c["backend"]) == ("cg", "symmetric", "reference")
    assert next(model.parameters()).dtype == torch.float64
    rebuilt = type(model)(**model.config)
    assert rebuilt.config == model.config
    m2 = build_model("MACE", atomic_numbers=[1, 8], num_channels=16, max_L=2)
    assert m2.config["hidden_irreps"] == "16x0e+16x1o+16x2e"
    assert mlpot.models.MACE is type(model)
    assert build_model("ScaleShiftMACE", atomic_numbers=[1]).model_name == "ScaleShiftMACE"


def test_bad_config_is_clear():
    with pytest.raises(ConfigError, match="atomic_numbers"):
        build_model("MACE")
    with pytest.raises(ConfigError, match="ResidualElementDependentInteractionBlock"):
        build_model("MACE", atomic_numbers=[1], interaction_cls="ResidualElementDependentInteractionBlock")
    with pytest.raises(ConfigError, match="correlation"):
        build_model("MACE", atomic_numbers=[1], correlation=[3, 3, 3])
    with pytest.raises(ConfigError, match="interaction_tp"):
        build_model("MACE", atomic_numbers=[1], interaction_tp="fft")


def test_save_load_and_features(tmp_path):
    model = tiny()
    atoms = molecule("CH3OH")
    before = model.predict([atoms])
    path = tmp_path / "mace.pt"
    model.save(path)
    loaded = mlpot.load_model(path, device="cpu")
    after = loaded.predict([atoms])
    assert abs(before["energy"][0] - after["energy"][0]) < 1e-10
    graph = mc.build_batch([atoms], model.r_max)
    out = model(graph)
    assert out["node_features"].shape == (len(atoms), 2 * 3)  # 3 invariant channels per layer


def test_isolated_atom_is_e0_plus_shift():
    model = tiny(shift=0.25)
    from ase import Atoms

    out = model.predict([Atoms("O", positions=[[0, 0, 0]])])
    assert abs(out["energy"][0] - (-2041.8 + 0.25)) < 1e-10


def test_eval_caches_follow_the_weights():
    """Eval mode caches weight-only quantities (folded product weights, isolated-atom energies);
    they must follow in-place weight changes and agree with train mode."""
    model = build_model("MACE", **{**TINY, "seed": 3})
    mc.randomize_parameters(model, seed=2, scale=0.3)
    atoms = molecule("CH3OH")
    model.eval()
    e_eval = model.predict([atoms])["energy"][0]
    model.train()
    graph = mc.build_batch([atoms], model.r_max)
    e_train = float(model(graph, compute_force=False)["energy"][0].detach())
    assert abs(e_eval - e_train) < 1e-10
    model.eval()
    with torch.no_grad():
        w = model.products[0].symmetric_contractions.contractions[0].weights_3
        w.mul_(1.5)
    e_changed = model.predict([atoms])["energy"][0]
    model.train()
    e_changed_train = float(model(graph, compute_force=False)["energy"][0].detach())
    assert abs(e_changed - e_eval) > 1e-8 and abs(e_changed - e_changed_train) < 1e-10


def test_triton_backend_matches_reference(monkeypatch):
    """backend='triton' routes the message passing and the product basis to the fused kernels
    (run here on Triton's CPU interpreter): same energies and forces as the reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = {**TINY, "hidden_irreps": "2x0e + 2x1o", "max_ell": 1, "correlation": 2, "radial_MLP": [4]}
    ref = build_model("MACE", **cfg)
    tri = build_model("MACE", **{**cfg, "backend": "triton"})
    tri.load_state_dict(ref.state_dict())
    atoms = molecule("H2O")
    a, b = ref.predict([atoms]), tri.predict([atoms])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-10
    np.testing.assert_allclose(a["forces"][0], b["forces"][0], atol=1e-10)


def test_force_loss_gradient_matches_finite_differences():
    """Training on forces differentiates the forces w.r.t. the weights (second derivatives through
    the fused message passing and product basis): compare with central differences."""
    model = build_model("MACE", **{**TINY, "seed": 5})
    mc.randomize_parameters(model, seed=4, scale=0.3)
    model.train()
    graph = mc.build_batch([molecule("CH3OH")], model.r_max)

    def loss():
        out = model(graph, compute_force=True, create_graph=True)
        return (out["forces"] ** 2).sum() + out["energy"].sum()

    params = {
        "radial MLP": model.interactions[1].conv_tp_weights.layer0.weight,
        "product weights": model.products[0].symmetric_contractions.contractions[1].weights_2,
        "linear_up": model.interactions[1].linear_up.weight,
    }
    grads = torch.autograd.grad(loss(), list(params.values()))
    g = torch.Generator().manual_seed(0)
    for (name, p), grad in zip(params.items(), grads):
        direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        h = 1e-5
        with torch.no_grad():
            p.add_(h * direction)
        up = float(loss().detach())
        with torch.no_grad():
            p.sub_(2 * h * direction)
        down = float(loss().detach())
        with torch.no_grad():
            p.add_(h * direction)
        fd = (up - down) / (2 * h)
        assert abs(fd - float((grad * direction).sum())) < 1e-6 * max(1.0, abs(fd)), name


def test_gaunt_interaction_edge_chunks_match_one_pass():
    """interaction_tp gaunt in edge chunks (gather, product and scatter recomputed per chunk)
    gives the energies, forces and stress of one pass, and the same parameter gradients of a
    force loss (the double backward of training)."""
    from mlpot.o3.gaunt import GauntMessageTP

    model = build_model("MACE", **{**TINY, "interaction_tp": "gaunt", "correlation": 2})
    mc.randomize_parameters(model, seed=2, scale=0.3)
    structures = [mc.random_crystal(SPECIES, n=6, seed=4, a=3.2), mc.random_molecule(SPECIES, n=7, seed=5)]
    batch = mc.build_batch(structures, model.r_max)
    n_edges = batch["edge_index"].shape[1]
    tps = [m for m in model.modules() if isinstance(m, GauntMessageTP)]
    assert tps

    def run():
        model.zero_grad()
        out = model(batch, compute_force=True, compute_stress=True, create_graph=True)
        (out["forces"] ** 2).sum().backward()
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        return [out["energy"].detach(), out["forces"].detach(), out["stress"].detach()], grads

    whole, g_whole = run()
    for tp in tps:
        tp.max_chunk_values = 7 * tp.grid_values_per_edge()
        assert tp.edges_per_chunk() == 7
    assert n_edges > 3 * 7  # several chunks
    chunked, g_chunked = run()
    for a, b in zip(chunked + g_chunked, whole + g_whole):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (a - b).abs().max()


@pytest.mark.parametrize("interaction_tp", ["cg", "so2"])
def test_edge_geometry_computed_once_and_only_what_layers_read(monkeypatch, interaction_tp):
    """One edge geometry per forward pass: frames and Wigner blocks once (not per layer), and no
    spherical harmonics when every layer works in the SO(2) edge frames."""
    import mlpot.nn.edge_geometry as eg

    model = build_model("MACE", hidden_irreps="2x0e + 2x1o", max_ell=2, correlation=2, num_interactions=3,
                        r_max=3.0, atomic_numbers=[1, 6, 8], radial_MLP=[4], interaction_tp=interaction_tp).double()
    calls = {"wigner": 0, "geometry": []}
    wigner, build = eg.wigner_D_list, eg.build_edge_geometry

    def count_wigner(*a, **k):
        calls["wigner"] += 1
        return wigner(*a, **k)

    def record(*a, **k):
        g = build(*a, **k)
        calls["geometry"].append(g)
        return g

    monkeypatch.setattr(eg, "wigner_D_list", count_wigner)
    monkeypatch.setattr("mlpot.models.mace.build_edge_geometry", record)
    model(mc.build_batch([molecule("CH3OH")], model.r_max), compute_force=True)
    geometry = calls["geometry"][0]
    if interaction_tp == "so2":
        assert calls["wigner"] == len(calls["geometry"]) and geometry.sh is None and geometry.wigner is not None
    else:
        assert calls["wigner"] == 0 and geometry.sh is not None and geometry.wigner is None
    assert geometry.radial is not None


def test_building_a_model_leaves_the_allocator_alone():
    """``tune_malloc`` changes the whole process: only the ``mlpot`` command applies it."""
    import subprocess
    import sys

    code = (
        "import mlpot.models.mace as m, mlpot.runtime as r\n"
        "m.MACE(hidden_irreps='2x0e', max_ell=1, correlation=1, num_interactions=1, atomic_numbers=[1],"
        " radial_MLP=[4])\n"
        "print(r._MALLOC_TUNED)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("setting, frozen", [(None, True), ("0", False)])
def test_the_command_freezes_the_startup_objects_unless_told_not_to(setting, frozen):
    """The ``mlpot`` command puts the imported libraries out of the garbage collector's walks
    (``freeze_gc``), so a full collection does not land inside a force call; ``MLPOT_FREEZE_GC=0``
    leaves the collector alone, and importing or building a model never touches it."""
    import os
    import subprocess
    import sys

    code = (
        "import gc, io, contextlib\n"
        "import mlpot.models.mace as m\n"
        "m.MACE(hidden_irreps='2x0e', max_ell=1, correlation=1, num_interactions=1, atomic_numbers=[1], radial_MLP=[4])\n"
        "assert gc.get_freeze_count() == 0\n"
        "from mlpot.cli.main import main\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    assert main(['import-mace', 'no-such-export-folder', 'never-written.pt']) == 1\n"
        "print(gc.get_freeze_count() > 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLPOT_FREEZE_GC"}
    if setting is not None:
        env["MLPOT_FREEZE_GC"] = setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(frozen)
    assert "leaked" not in out.stderr  # unfrozen at exit: the last collection frees what extensions hold


@pytest.mark.parametrize("options", [
    {"interaction_cls": "RealAgnosticResidualNonLinearInteractionBlock", "edge_irreps": "4x0e + 4x1o",
     "interaction_cls_first": "RealAgnosticAttResidualInteractionBlock"},
    {"interaction_cls_first": "RealAgnosticDensityInteractionBlock",
     "interaction_cls": "RealAgnosticDensityResidualInteractionBlock", "apply_cutoff": False},
    {"pair_repulsion": True, "distance_transform": "Agnesi", "radial_type": "gaussian",
     "use_agnostic_product": True, "use_last_readout_only": True},
], ids=["nonlinear", "density", "zbl_agnesi"])
def test_mace_torch_options_keep_the_physics(options):
    """Natively built models with mace-torch's other options are equivariant and conservative."""
    model = tiny(**options)
    for check in ("rotation", "reflection", "forces_fd", "stress_fd"):
        mc.ALL_CHECKS[check](model, None)


def test_radial_mlp_eval_mode_folds_the_scalings_and_keeps_the_function():
    """:class:`mlpot.nn.radial.RadialMLP` in eval mode (scalings folded into cached weights)
    gives e3nn's ``FullyConnectedNet`` with the same weights, and its input gradient; the cache
    follows a weight change."""
    from e3nn import nn as enn

    from mlpot.nn.radial import radial_mlp

    torch.manual_seed(0)
    mlp = radial_mlp(8, [16, 16], 12).double()
    ref = enn.FullyConnectedNet([8, 16, 16, 12], torch.nn.functional.silu).double()
    ref.load_state_dict(mlp.state_dict())
    x = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    mlp.eval()
    for step in range(2):
        out, expected = mlp(x), ref(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-13)
        cot = torch.randn_like(out)
        got, = torch.autograd.grad((out * cot).sum(), x)
        want, = torch.autograd.grad((expected * cot).sum(), x)
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
        with torch.no_grad():  # an optimizer-like in-place update: the folded cache is rebuilt
            for p, q in zip(mlp.parameters(), ref.parameters()):
                p.mul_(1.5)
                q.mul_(1.5)
