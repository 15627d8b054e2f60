r"""Reusable physics checks that every mlpot potential (and every backend) must pass.

Each ``check_*`` function takes a model (a :class:`mlpot.models.base.PotentialModel`, float64
unless stated) and raises ``AssertionError`` with a message saying what broke. They are plain
functions so any test file can parametrize them over models; :data:`ALL_CHECKS` lists them.

What is checked (:math:`E` energy, :math:`F_i = -\partial E/\partial r_i`,
:math:`\sigma = V^{-1}\,\partial E/\partial\varepsilon` the ASE-sign stress):

* rotation / reflection, for :math:`Q \in O(3)` acting as :math:`r \to Q r`, cell rows
  :math:`a \to Q a`: :math:`E' = E`, :math:`F'_i = Q F_i`, :math:`\sigma' = Q \sigma Q^T`;
* permutation :math:`P`: :math:`E' = E`, :math:`F' = P F`; translation: :math:`E' = E`,
  :math:`F' = F`;
* forces against central finite differences of :math:`E` (step ``h``, error :math:`O(h^2)`);
* stress against a central finite difference in a symmetric strain :math:`\varepsilon`
  applied as :math:`r \to r (1 + \varepsilon)`, :math:`\text{cell} \to \text{cell}\,(1 + \varepsilon)`;
* atoms farther apart than ``r_max`` (and the ZBL range): :math:`E = \sum_i E_0(Z_i)`
  exactly, :math:`F = 0`;
* a batch of structures gives the same numbers as the structures one by one;
* an :math:`n`-fold periodic supercell has :math:`E = n\,E_{\text{cell}}`, and tiled forces;
* a dimer pulled through ``r_max``: :math:`E` and :math:`F` go continuously to the isolated
  values (the cutoff envelope makes :math:`E - E_0 = O((r_{max} - r)^3)`);
* float32 agrees with float64 to float32 precision;
* ``save`` then :func:`mlpot.load_model` reproduces the outputs bit for bit;
* an element outside ``model.atomic_numbers`` raises :class:`mlpot.errors.UnknownElementError`.

Every check also asserts that the quantities it compares are not trivially zero (a model whose
forces vanish passes equivariance checks vacuously): use :func:`randomize_parameters` first.

Graphs are built with :func:`mlpot.data.atoms_to_graph` and :func:`mlpot.data.collate`.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mlpot.data.graph import atoms_to_graph, collate

__all__ = [
    "ALL_CHECKS",
    "build_batch",
    "evaluate",
    "randomize_parameters",
    "random_model",
    "random_molecule",
    "random_crystal",
    "random_orthogonal",
    "check_rotation_equivariance",
    "check_reflection_equivariance",
    "check_permutation_invariance",
    "check_translation_invariance",
    "check_forces_finite_difference",
    "check_stress_finite_difference",
    "check_isolated_atoms",
    "check_batch_consistency",
    "check_supercell_extensive",
    "check_cutoff_continuity",
    "check_float32",
    "check_save_load",
    "check_unknown_element",
    "run_all_checks",
]


# ---------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------
def build_batch(atoms_list: Sequence[Atoms], r_max: float, dtype=torch.float64) -> dict:
    """One batched graph (see ``docs/architecture.md``) for a list of structures."""
    return collate([atoms_to_graph(a, float(r_max), dtype=dtype) for a in atoms_list])


def _model_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float64


def evaluate(model, atoms_list, compute_stress: bool | None = None) -> dict:
    """Energies (B,), forces (N, 3) and, for periodic inputs, stress (B, 3, 3) as float64 numpy."""
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    if compute_stress is None:
        compute_stress = all(bool(a.pbc.all()) for a in atoms_list)
    graph = build_batch(atoms_list, model.r_max, dtype=_model_dtype(model))
    out = model(graph, compute_force=True, compute_stress=compute_stress, create_graph=False)
    res = {
        "energy": out["energy"].detach().double().numpy(),
        "forces": out["forces"].detach().double().numpy(),
    }
    if compute_stress:
        res["stress"] = out["stress"].detach().double().numpy()
    return res


def _energy(model, atoms: Atoms) -> float:
    graph = build_batch([atoms], model.r_max, dtype=_model_dtype(model))
    with torch.no_grad():
        out = model(graph, compute_force=False, compute_stress=False, create_graph=False)
    return float(out["energy"][0])


# ---------------------------------------------------------------------------------------------
# models and structures
# ---------------------------------------------------------------------------------------------
def randomize_parameters(model, seed: int = 0, scale: float = 0.3):
    """Add Gaussian noise ``scale * N(0, 1)`` to every parameter (in place), so that zero-
    initialised readouts or gates do not make outputs trivially zero. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.add_(scale * noise)
    return model


def random_model(name: str, config: dict, seed: int = 1, scale: float = 0.3):
    """``build_model(name, **config)`` in float64 (torch seed 0), its parameters perturbed by
    :func:`randomize_parameters` (``seed``, ``scale``), in eval mode: the model every battery
    test of a model family starts from."""
    from mlpot.models import build_model

    torch.manual_seed(0)
    model = build_model(name, **config).to(torch.float64)
    randomize_parameters(model, seed=seed, scale=scale)
    return model.eval()


def _place(rng, n, box_fn, min_dist, dist_fn, tries=10000):
    pts = []
    for _ in range(tries):
        if len(pts) == n:
            break
        x = box_fn()
        if all(dist_fn(x, y) >= min_dist for y in pts):
            pts.append(x)
    if len(pts) < n:
        raise RuntimeError("could not place atoms; loosen min_dist")
    return np.array(pts)


def random_molecule(species: Sequence[int], n: int = 5, seed: int = 0, radius: float = 1.6,
                    min_dist: float = 0.9) -> Atoms:
    """``n`` atoms in a ball of ``radius`` Å, pairwise at least ``min_dist`` apart, no cell."""
    rng = np.random.default_rng(seed)
    species = list(species)

    def box():
        while True:
            x = rng.uniform(-radius, radius, 3)
            if np.linalg.norm(x) <= radius:
                return x

    pos = _place(rng, n, box, min_dist, lambda a, b: np.linalg.norm(a - b))
    numbers = [species[k % len(species)] for k in range(n)]
    rng.shuffle(numbers)
    return Atoms(numbers=numbers, positions=pos)


def random_crystal(species: Sequence[int], n: int = 3, seed: int = 0, a: float = 3.0,
                   min_dist: float = 1.0) -> Atoms:
    """A skewed (triclinic) periodic cell of edge about ``a`` Å holding ``n`` atoms."""
    rng = np.random.default_rng(seed)
    cell = a * (np.eye(3) + 0.15 * rng.uniform(-1, 1, (3, 3)))
    inv = np.linalg.inv(cell)

    def mic(x, y):
        f = (x - y) @ inv
        f -= np.round(f)
        return np.linalg.norm(f @ cell)

    pos = _place(rng, n, lambda: rng.uniform(0, 1, 3) @ cell, min_dist, mic)
    numbers = [list(species)[k % len(species)] for k in range(n)]
    rng.shuffle(numbers)
    return Atoms(numbers=numbers, positions=pos, cell=cell, pbc=True)


def random_orthogonal(seed: int = 0, proper: bool = True) -> np.ndarray:
    """A Haar-random rotation (det +1), or an improper one (det -1) when ``proper=False``."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q if proper else -q


def _default_structures(model) -> list[Atoms]:
    species = list(model.atomic_numbers)[:3]
    return [random_molecule(species, n=5, seed=1), random_crystal(species, n=3, seed=2)]


# ---------------------------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------------------------
def _assert_close(actual, expected, tol: float, what: str):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max abs deviation {err:.3e} > {tol:.1e} x scale {scale:.3g}"


def _e0_sum(model, numbers) -> float:
    """:math:`\sum_i E_0(Z_i)` over the atoms ``numbers``."""
    return float(sum(model.e0s[int(z)] for z in numbers))


def _assert_energy_close(actual, expected, e0_sum: float, tol: float, what: str, slack: float = 0.0):
    """Energies compared after subtracting :math:`\sum_i E_0(Z_i)` from both: the tolerance is
    relative to the interaction energy, ``tol * max(1, |E - sum E0|)``, not to the E0s, which
    can be thousands of eV and would hide an error in the interaction part. ``slack`` is an
    absolute allowance (the float32 rounding of the E0s in :func:`check_float32`)."""
    actual = np.asarray(actual, dtype=np.float64) - e0_sum
    expected = np.asarray(expected, dtype=np.float64) - e0_sum
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= tol * scale + slack, (
        f"{what}: max abs deviation {err:.3e} of E - sum E0 > {tol:.1e} x scale {scale:.3g}"
        + (f" + {slack:.1e}" if slack else "")
    )


def _assert_nontrivial(x, what: str, floor: float = 1e-6):
    m = float(np.abs(np.asarray(x)).max(initial=0.0))
    assert m > floor, (
        f"{what} are all ~0 (max {m:.2e}): the check would pass vacuously; randomize the model's parameters"
    )


def _transform(atoms: Atoms, Q: np.ndarray) -> Atoms:
    new = atoms.copy()
    new.set_positions(atoms.get_positions() @ Q.T)
    if atoms.pbc.any():
        new.set_cell(np.asarray(atoms.get_cell()) @ Q.T, scale_atoms=False)
    return new


def _check_orthogonal(model, structures, proper: bool, seed: int, tol: float):
    structures = structures or _default_structures(model)
    for k, atoms in enumerate(structures):
        Q = random_orthogonal(seed + k, proper=proper)
        ref = evaluate(model, atoms)
        out = evaluate(model, _transform(atoms, Q))
        name = "rotation" if proper else "reflection"
        _assert_nontrivial(ref["forces"], f"forces of structure {k}")
        _assert_energy_close(out["energy"], ref["energy"], _e0_sum(model, atoms.numbers), tol,
                             f"energy invariance under {name} (structure {k})")
        _assert_close(out["forces"], ref["forces"] @ Q.T, tol, f"force equivariance under {name} (structure {k})")
        if "stress" in ref:
            _assert_nontrivial(ref["stress"], f"stress of structure {k}")
            _assert_close(
                out["stress"], Q @ ref["stress"][0] @ Q.T, tol, f"stress equivariance under {name} (structure {k})"
            )


def check_rotation_equivariance(model, structures=None, seed: int = 0, tol: float = 1e-9):
    """:math:`E(Qr) = E(r)`, :math:`F(Qr) = Q F(r)`, :math:`\\sigma(Qr) = Q\\sigma Q^T`, det Q = +1."""
    _check_orthogonal(model, structures, True, seed, tol)


def check_reflection_equivariance(model, structures=None, seed: int = 10, tol: float = 1e-9):
    """Same as the rotation check with an improper :math:`Q` (det -1): energies of an
    O(3)-invariant potential do not change under a mirror/inversion."""
    _check_orthogonal(model, structures, False, seed, tol)


def check_permutation_invariance(model, structures=None, seed: int = 0, tol: float = 1e-9):
    """Relabelling atoms permutes forces and leaves the energy unchanged."""
    structures = structures or _default_structures(model)
    rng = np.random.default_rng(seed)
    for k, atoms in enumerate(structures):
        perm = rng.permutation(len(atoms))
        ref = evaluate(model, atoms)
        out = evaluate(model, atoms[perm])
        _assert_nontrivial(ref["forces"], f"forces of structure {k}")
        _assert_energy_close(out["energy"], ref["energy"], _e0_sum(model, atoms.numbers), tol,
                             f"energy under permutation (structure {k})")
        _assert_close(out["forces"], ref["forces"][perm], tol, f"forces under permutation (structure {k})")


def check_translation_invariance(model, structures=None, seed: int = 0, tol: float = 1e-9):
    """A rigid shift of all atoms changes neither energy nor forces (nor stress)."""
    structures = structures or _default_structures(model)
    rng = np.random.default_rng(seed)
    for k, atoms in enumerate(structures):
        moved = atoms.copy()
        moved.translate(rng.uniform(-3, 3, 3))
        ref = evaluate(model, atoms)
        out = evaluate(model, moved)
        _assert_nontrivial(ref["forces"], f"forces of structure {k}")
        _assert_energy_close(out["energy"], ref["energy"], _e0_sum(model, atoms.numbers), tol,
                             f"energy under translation (structure {k})")
        _assert_close(out["forces"], ref["forces"], tol, f"forces under translation (structure {k})")
        if "stress" in ref:
            _assert_close(out["stress"], ref["stress"], tol, f"stress under translation (structure {k})")


def check_forces_finite_difference(model, structures=None, h: float = 1e-4, tol: float = 1e-6,
                                   max_coords: int = 6, seed: int = 0):
    """:math:`F_{ia} = -(E(r + h e_{ia}) - E(r - h e_{ia})) / 2h` on a few random coordinates."""
    structures = structures or _default_structures(model)
    rng = np.random.default_rng(seed)
    for k, atoms in enumerate(structures):
        forces = evaluate(model, atoms, compute_stress=False)["forces"]
        _assert_nontrivial(forces, f"forces of structure {k}")
        coords = [(i, a) for i in range(len(atoms)) for a in range(3)]
        pick = rng.choice(len(coords), size=min(max_coords, len(coords)), replace=False)
        for c in pick:
            i, a = coords[c]
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, a] += h
            minus.positions[i, a] -= h
            fd = -(_energy(model, plus) - _energy(model, minus)) / (2 * h)
            _assert_close(forces[i, a], fd, tol, f"force F[{i},{a}] vs finite difference (structure {k})")


def _strained(atoms: Atoms, eps: np.ndarray) -> Atoms:
    new = atoms.copy()
    m = np.eye(3) + eps
    new.set_cell(np.asarray(atoms.get_cell()) @ m, scale_atoms=False)
    new.set_positions(atoms.get_positions() @ m)
    return new


def check_stress_finite_difference(model, structures=None, h: float = 1e-4, tol: float = 1e-6):
    """:math:`\\sigma_{ab} = V^{-1} \\partial E/\\partial\\varepsilon_{ab}` (ASE sign) by central
    differences in a symmetric strain (:math:`\\varepsilon_{ab} = \\varepsilon_{ba} = h/2` off the
    diagonal), on every periodic structure."""
    structures = structures or _default_structures(model)
    periodic = [a for a in structures if a.pbc.all()]
    assert periodic, "stress check needs at least one fully periodic structure"
    for k, atoms in enumerate(periodic):
        stress = evaluate(model, atoms, compute_stress=True)["stress"][0]
        _assert_nontrivial(stress, f"stress of periodic structure {k}")
        volume = abs(np.linalg.det(np.asarray(atoms.get_cell())))
        for a in range(3):
            for b in range(a, 3):
                e = np.zeros((3, 3))
                if a == b:
                    e[a, a] = h
                else:
                    e[a, b] = e[b, a] = h / 2
                fd = (_energy(model, _strained(atoms, e)) - _energy(model, _strained(atoms, -e))) / (2 * h) / volume
                _assert_close(stress[a, b], fd, tol, f"stress[{a},{b}] vs finite strain (periodic structure {k})")
        _assert_close(stress, stress.T, 1e-10, f"stress symmetry (periodic structure {k})")


def check_isolated_atoms(model, tol: float = 1e-12):
    """Atoms farther apart than the cutoff: :math:`E = \\sum_i E_0(Z_i)` and zero forces."""
    species = list(model.atomic_numbers)
    spacing = model.r_max + 1.0
    numbers = species + species[:1]
    atoms = Atoms(numbers=numbers, positions=[[spacing * k, 0.3 * k, 0.0] for k in range(len(numbers))])
    out = evaluate(model, atoms, compute_stress=False)
    expected = _e0_sum(model, numbers)
    _assert_energy_close(out["energy"], [expected], expected, tol, "energy of isolated atoms vs sum of E0")
    _assert_close(out["forces"], np.zeros((len(numbers), 3)), tol, "forces on isolated atoms")
    single = evaluate(model, Atoms(numbers=species[:1], positions=[[0.0, 0.0, 0.0]]), compute_stress=False)
    e0 = _e0_sum(model, species[:1])
    _assert_energy_close(single["energy"], [e0], e0, tol, "energy of a single atom vs E0")


def check_batch_consistency(model, structures=None, tol: float = 1e-10):
    """Evaluating structures as one batch gives the same energies/forces as one by one."""
    structures = structures or _default_structures(model)
    # mixed periodic and non-periodic structures in one batch: no stress requested
    batched = evaluate(model, structures, compute_stress=False)
    offset = 0
    for k, atoms in enumerate(structures):
        single = evaluate(model, atoms, compute_stress=False)
        n = len(atoms)
        _assert_energy_close(batched["energy"][k], single["energy"][0], _e0_sum(model, atoms.numbers), tol,
                             f"batched energy of structure {k}")
        _assert_close(batched["forces"][offset : offset + n], single["forces"], tol, f"batched forces of structure {k}")
        offset += n
    periodic = [a for a in structures if a.pbc.all()]
    if periodic:
        twice = evaluate(model, [periodic[0], periodic[0]], compute_stress=True)
        one = evaluate(model, periodic[0], compute_stress=True)
        for b in range(2):
            _assert_close(twice["stress"][b], one["stress"][0], tol, f"batched stress, copy {b}")


def check_supercell_extensive(model, structures=None, repeat=(2, 1, 1), tol: float = 1e-9):
    """A periodic supercell of ``prod(repeat)`` cells has ``prod(repeat)`` times the energy, the
    same (tiled) forces and the same stress."""
    structures = structures or _default_structures(model)
    periodic = [a for a in structures if a.pbc.all()]
    assert periodic, "supercell check needs a periodic structure"
    n = int(np.prod(repeat))
    for k, atoms in enumerate(periodic):
        ref = evaluate(model, atoms, compute_stress=True)
        big = evaluate(model, atoms.repeat(repeat), compute_stress=True)
        e0 = _e0_sum(model, atoms.numbers)
        _assert_nontrivial(ref["energy"] - e0, "interaction energy")
        _assert_energy_close(big["energy"], n * ref["energy"], n * e0, tol, f"supercell energy (periodic structure {k})")
        _assert_close(big["forces"], np.tile(ref["forces"], (n, 1)), tol, f"supercell forces (periodic structure {k})")
        _assert_close(big["stress"], ref["stress"], tol, f"supercell stress (periodic structure {k})")


def check_cutoff_continuity(model, delta: float = 1e-4, tol: float = 1e-7):
    """Pull a dimer through ``r_max``: just inside, energy and force equal the isolated values
    up to :math:`O(\\delta^3)` (the envelope is flat at the cutoff); just outside, exactly."""
    species = list(model.atomic_numbers)
    za, zb = species[0], species[-1]
    direction = np.array([0.36, -0.48, 0.8])
    e0 = model.e0s[za] + model.e0s[zb]

    def dimer(r):
        return Atoms(numbers=[za, zb], positions=[[0.1, 0.2, 0.3], [0.1, 0.2, 0.3] + r * direction])

    mid = evaluate(model, dimer(0.5 * model.r_max), compute_stress=False)
    _assert_nontrivial(mid["energy"] - e0, "dimer interaction energy inside the cutoff", floor=1e-9)
    inside = evaluate(model, dimer(model.r_max - delta), compute_stress=False)
    outside = evaluate(model, dimer(model.r_max + delta), compute_stress=False)
    _assert_energy_close(outside["energy"], [e0], e0, 1e-12, "dimer energy just outside r_max")
    _assert_energy_close(inside["energy"], outside["energy"], e0, tol, "energy jump across r_max")
    _assert_close(inside["forces"], outside["forces"], tol, "force jump across r_max")
    # and smoothly: the interaction energy shrinks at least quadratically towards the cutoff
    e_far = abs(evaluate(model, dimer(model.r_max - 0.1), compute_stress=False)["energy"][0] - e0)
    e_near = abs(evaluate(model, dimer(model.r_max - 0.01), compute_stress=False)["energy"][0] - e0)
    assert e_near <= 0.05 * e_far + 1e-12, (
        f"interaction energy does not vanish smoothly at r_max: |E-E0| = {e_far:.3e} at r_max-0.1, "
        f"{e_near:.3e} at r_max-0.01"
    )


def check_float32(model, structures=None, tol: float = 1e-6, force_tol: float = 1e-4):
    """The same model cast to float32 agrees with float64 to float32 accuracy, and outputs
    float32 tensors. Energies are compared after subtracting the E0s (relative to the
    interaction energy), with an absolute allowance for the float32 rounding of the E0 part
    itself: ``n * 2^-24 * sum_i |E0(Z_i)|`` for ``n`` atoms (each per-atom energy carries its E0,
    and their float32 sum rounds at every step)."""
    structures = structures or _default_structures(model)
    m32 = copy.deepcopy(model).to(torch.float32)
    for k, atoms in enumerate(structures):
        ref = evaluate(model, atoms)
        graph = build_batch([atoms], m32.r_max, dtype=torch.float32)
        out = m32(graph, compute_force=True, compute_stress=bool(atoms.pbc.all()), create_graph=False)
        assert out["energy"].dtype == torch.float32 and out["forces"].dtype == torch.float32, (
            f"float32 model returned {out['energy'].dtype} / {out['forces'].dtype}"
        )
        e0_abs = float(sum(abs(model.e0s[int(z)]) for z in atoms.numbers))
        _assert_energy_close(out["energy"].detach().double().numpy(), ref["energy"], _e0_sum(model, atoms.numbers),
                             tol, f"float32 energy (structure {k})", slack=len(atoms) * 2.0**-24 * e0_abs)
        _assert_close(out["forces"].detach().double().numpy(), ref["forces"], force_tol,
                      f"float32 forces (structure {k})")


def check_save_load(model, structures=None):
    """``model.save`` then :func:`mlpot.load_model` rebuilds a model with identical outputs."""
    import mlpot

    structures = structures or _default_structures(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        model.save(path)
        loaded = mlpot.load_model(path, device="cpu", dtype=_model_dtype(model))
    assert type(loaded) is type(model), f"loaded a {type(loaded).__name__}, saved a {type(model).__name__}"
    assert loaded.atomic_numbers == model.atomic_numbers and loaded.r_max == model.r_max
    for k, atoms in enumerate(structures):
        ref = evaluate(model, atoms)
        out = evaluate(loaded, atoms)
        for key in ref:
            assert np.array_equal(ref[key], out[key]), f"{key} differs after save/load (structure {k})"


def check_unknown_element(model):
    """An element outside ``model.atomic_numbers`` raises UnknownElementError naming it."""
    from mlpot.errors import UnknownElementError

    z_bad = next(z for z in (92, 79, 54, 2) if z not in model.atomic_numbers)
    atoms = random_molecule([model.atomic_numbers[0], z_bad], n=3, seed=3)
    atoms.numbers[0] = z_bad
    graph = build_batch([atoms], model.r_max, dtype=_model_dtype(model))
    try:
        model(graph, compute_force=True)
    except UnknownElementError as exc:
        assert f"Z={z_bad}" in str(exc) or str(z_bad) in str(exc), f"error does not name Z={z_bad}: {exc}"
        return
    raise AssertionError(f"no UnknownElementError for Z={z_bad} not in {model.atomic_numbers}")


ALL_CHECKS: dict[str, Callable] = {
    "rotation": check_rotation_equivariance,
    "reflection": check_reflection_equivariance,
    "permutation": check_permutation_invariance,
    "translation": check_translation_invariance,
    "forces_fd": check_forces_finite_difference,
    "stress_fd": check_stress_finite_difference,
    "isolated_atoms": check_isolated_atoms,
    "batch": check_batch_consistency,
    "supercell": check_supercell_extensive,
    "cutoff": check_cutoff_continuity,
    "float32": check_float32,
    "save_load": check_save_load,
    "unknown_element": check_unknown_element,
}

_NO_STRUCTURES = {"isolated_atoms", "cutoff", "unknown_element"}


def run_all_checks(model, structures=None, skip: Sequence[str] = ()):
    """Run every check in :data:`ALL_CHECKS` (except ``skip``) on ``model``."""
    for name, fn in ALL_CHECKS.items():
        if name in skip:
            continue
        if name in _NO_STRUCTURES:
            fn(model)
        else:
            fn(model, structures)
