"""A small built-in dataset: fcc Cu, Ni and Cu-Ni alloy cells labelled with ASE's EMT potential.

It lets anyone train, evaluate and relax without downloading DFT data (``make quickstart``).
EMT is a cheap analytic many-body potential; here it plays the role of the "reference
method" that a model learns. Three kinds of structures, each tagged by ``config_type``:

* ``rattled``  - equilibrium fcc cells with Gaussian displacements (sigma 0.03-0.12 Å);
* ``strained`` - cells under a random symmetric strain (up to ±4 %), lightly rattled;
* ``md``       - snapshots of a short velocity-Verlet run started at 300-1500 K.

Cells hold 4-32 atoms (the cubic 4-atom fcc cell repeated 1-2 times along each axis), with a
random Cu fraction in the alloy cells. Targets are written to extxyz under ``REF_energy``
(eV), ``REF_forces`` (eV/Å) and ``REF_stress`` (eV/Å^3, ASE sign, Voigt order), as with
mace-torch's ``--energy_key REF_energy`` convention.

Everything is deterministic given ``seed``. Files are written atomically into a cache folder;
``manifest.json`` (the generation parameters and the SHA-256 of every file) is removed before
and written last, atomically, after them. A later call reuses the files only when the manifest
names the same parameters and every hash still matches, so an interrupted or tampered
generation is regenerated.

``system: molecules`` draws small H/C/N/O molecules (:data:`MOLECULES`) at their EMT-relaxed
geometries (:func:`emt_molecule`), rattled (``rattled``)
or scaled by up to ±4 % (``strained``, ``md``), without a cell or stress. ``hessian: true``
labels every structure with its EMT Hessian by central differences of the forces
(``REF_hessian`` in ``info``, eV/Å², flattened; :mod:`mlpot.data.hessians`), for training a
Hessian head (``training.hessian_weight``).

In a training config::

    data:
      synthetic: {system: cu-ni, n_train: 200, n_valid: 40, n_test: 60, seed: 0}

writes ``train.xyz``, ``valid.xyz``, ``test.xyz`` and ``relax_start.xyz`` (one rattled and
strained cell to relax) into ``<output>/data/`` unless ``cache_dir`` says otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mlpot.errors import ConfigError
from mlpot.fileio import atomic_path, atomic_write_text, remove_stale_temps

__all__ = ["SYSTEMS", "MOLECULES", "generate_emt_dataset", "emt_structures", "emt_molecule", "default_cache_dir"]

#: system name -> elements it mixes
SYSTEMS = {"cu-ni": ("Cu", "Ni"), "cu": ("Cu",), "ni": ("Ni",), "molecules": ("H", "C", "N", "O")}
#: the small H/C/N/O molecules of ``system: molecules`` (ASE's g2 names)
MOLECULES = ("H2O", "NH3", "CH4", "CO2", "C2H2", "C2H4", "HCN", "H2CO", "CH3OH", "C2H6", "HCOOH", "CH3CHO",
             "N2H4", "H2O2", "CH3CN", "CH3CH2OH")
_LATTICE = {"Cu": 3.61, "Ni": 3.52}
_REPEATS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2)]
_KINDS = ("rattled", "strained", "md")
GENERATOR_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLPOT_CACHE", Path.home() / ".cache" / "mlpot")) / "synthetic"


def _random_cell(rng: np.random.Generator, elements: tuple[str, ...]):
    from ase.build import bulk

    rep = _REPEATS[rng.integers(len(_REPEATS))]
    if len(elements) == 1:
        frac = {elements[0]: 1.0}
    else:
        x = float(rng.uniform(0.0, 1.0))
        frac = {elements[0]: x, elements[1]: 1.0 - x}
    # Vegard's law for the alloy lattice constant
    a = sum(_LATTICE[e] * f for e, f in frac.items())
    atoms = bulk(elements[0], "fcc", a=a, cubic=True).repeat(rep)
    if len(elements) > 1:
        symbols = rng.choice(list(elements), size=len(atoms), p=[frac[e] for e in elements])
        atoms.set_chemical_symbols(list(symbols))
    return atoms


def _symmetric_strain(rng: np.random.Generator, magnitude: float) -> np.ndarray:
    e = rng.uniform(-magnitude, magnitude, size=(3, 3))
    return 0.5 * (e + e.T)


def _label(atoms, kind: str, hessian: bool = False):
    from ase.calculators.emt import EMT

    atoms = atoms.copy()
    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces())
    periodic = bool(atoms.pbc.all())
    stress = np.array(atoms.get_stress(voigt=True)) if periodic else None
    if hessian:  # central differences of EMT forces (mlpot.data.hessians)
        from mlpot.data.hessians import finite_difference_hessian

        atoms.info["REF_hessian"] = finite_difference_hessian(atoms, EMT()).reshape(-1)
    atoms.calc = None
    atoms.info["REF_energy"] = energy
    if stress is not None:
        atoms.info["REF_stress"] = stress
    atoms.arrays["REF_forces"] = forces
    atoms.info["config_type"] = kind
    return atoms


@functools.cache
def _emt_relaxed_positions(name: str) -> np.ndarray:
    """Positions of g2 molecule ``name`` relaxed with EMT (BFGS to 1e-4 eV/Å; deterministic)."""
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    atoms = molecule(name)
    atoms.calc = EMT()
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=1000)
    return atoms.positions.copy()


def emt_molecule(name: str):
    """g2 molecule ``name`` at its EMT-relaxed geometry (a minimum or saddle of EMT), no cell."""
    from ase.build import molecule

    atoms = molecule(name)
    atoms.positions = _emt_relaxed_positions(name)
    atoms.pbc = False
    return atoms


def _make_molecule(rng: np.random.Generator, kind: str):
    """A small g2 molecule at its EMT-relaxed geometry, rattled (sigma 0.02-0.06 Å), or uniformly
    compressed / stretched by up to 4 % and lightly rattled, in a non-periodic box."""
    atoms = emt_molecule(MOLECULES[rng.integers(len(MOLECULES))])
    if kind == "rattled":
        atoms.positions += rng.normal(0.0, float(rng.uniform(0.02, 0.06)), size=atoms.positions.shape)
    else:
        atoms.positions *= float(rng.uniform(0.96, 1.04))
        atoms.positions += rng.normal(0.0, 0.02, size=atoms.positions.shape)
    atoms.pbc = False
    return atoms


def _make_one(rng: np.random.Generator, elements, kind: str, hessian: bool = False):
    if elements == SYSTEMS["molecules"]:
        return _label(_make_molecule(rng, kind), kind, hessian)
    atoms = _random_cell(rng, elements)
    if kind == "rattled":
        sigma = float(rng.uniform(0.03, 0.12))
        atoms.positions += rng.normal(0.0, sigma, size=atoms.positions.shape)
    elif kind == "strained":
        eps = _symmetric_strain(rng, 0.04)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.03, size=atoms.positions.shape)
    elif kind == "md":
        from ase import units
        from ase.calculators.emt import EMT
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet

        eps = _symmetric_strain(rng, 0.02)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        temperature = float(rng.uniform(300.0, 1500.0))
        atoms.calc = EMT()
        MaxwellBoltzmannDistribution(atoms, temperature_K=2 * temperature, rng=rng)
        dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
        dyn.run(int(rng.integers(10, 40)))
        atoms.calc = None
        del atoms.arrays["momenta"]
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    atoms.wrap()
    return _label(atoms, kind, hessian)


def emt_structures(n: int, seed: int = 0, system: str = "cu-ni", hessian: bool = False) -> list:
    """``n`` labelled structures, kinds cycling rattled / strained / md; deterministic in ``seed``.
    ``hessian``: also label each with its EMT Hessian (``info["REF_hessian"]``, flattened)."""
    if system not in SYSTEMS:
        raise ConfigError(f"data.synthetic.system: unknown system {system!r}; choose from {sorted(SYSTEMS)}")
    elements = SYSTEMS[system]
    out = []
    for k in range(n):
        rng = np.random.default_rng([int(seed), k])
        out.append(_make_one(rng, elements, _KINDS[k % len(_KINDS)], hessian))
    return out


def _relax_start(seed: int, system: str):
    """A 2x2x2 (32-atom) cell, 3 % strained and rattled by 0.1 Å: something to relax."""
    from ase.build import bulk

    elements = SYSTEMS[system]
    rng = np.random.default_rng([int(seed), 10**6])
    atoms = bulk(elements[0], "fcc", a=_LATTICE[elements[0]], cubic=True).repeat((2, 2, 2))
    if len(elements) > 1:
        atoms.set_chemical_symbols(["Cu" if k % 2 == 0 else "Ni" for k in range(len(atoms))])
        atoms.set_cell(atoms.cell.array * (0.5 * (_LATTICE["Cu"] + _LATTICE["Ni"]) / _LATTICE["Cu"]),
                       scale_atoms=True)
    atoms.set_cell(atoms.cell.array * 1.03, scale_atoms=True)
    atoms.positions += rng.normal(0.0, 0.1, size=atoms.positions.shape)
    atoms.info["config_type"] = "relax_start"
    return atoms


def _atomic_write(path: Path, images) -> None:
    from ase.io import write

    with atomic_path(path) as tmp:
        write(tmp, images, format="extxyz")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_matches(manifest: Path, params: dict, paths: dict[str, Path]) -> bool:
    """True when ``manifest`` records ``params`` and the files still have the recorded hashes."""
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(recorded, dict) or recorded.get("params") != params:
        return False
    hashes = recorded.get("sha256", {})
    try:
        return all(hashes.get(k) == _sha256(p) for k, p in paths.items())
    except OSError:
        return False


def generate_emt_dataset(
    out_dir=None,
    n_train: int = 200,
    n_valid: int = 40,
    n_test: int = 60,
    seed: int = 0,
    system: str = "cu-ni",
    hessian: bool = False,
) -> dict[str, Path]:
    """Write (or reuse) ``train.xyz``, ``valid.xyz``, ``test.xyz``, ``relax_start.xyz`` in ``out_dir``.

    The three splits are disjoint: they are drawn from independent seeds. Returns
    ``{"train": path, "valid": path, "test": path, "relax_start": path}``.
    """
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"data.synthetic.{name} must be a non-negative integer, got {n!r}")
    if n_train < 1:
        raise ConfigError("data.synthetic.n_train must be at least 1")
    if system not in SYSTEMS:
        raise ConfigError(f"data.synthetic.system: unknown system {system!r}; choose from {sorted(SYSTEMS)}")
    out_dir = Path(out_dir) if out_dir is not None else default_cache_dir() / f"{system}-seed{seed}"
    params = {
        "generator": "emt", "version": GENERATOR_VERSION, "system": system, "seed": int(seed),
        "n_train": n_train, "n_valid": n_valid, "n_test": n_test,
    }
    if hessian:
        params["hessian"] = True
    paths = {k: out_dir / f"{k}.xyz" for k in ("train", "valid", "test", "relax_start")}
    manifest = out_dir / "manifest.json"
    if manifest.exists() and _manifest_matches(manifest, params, paths):
        return paths
    # the manifest goes first: a run killed while regenerating leaves no manifest, never a
    # stale one beside new files (and the next run regenerates)
    if manifest.exists():
        manifest.unlink()
    for name in [*(p.name for p in paths.values()), manifest.name]:
        remove_stale_temps(out_dir, name)  # left by a writer that was killed
    # independent streams per split: seed offsets far apart
    splits = {"train": (n_train, 0), "valid": (n_valid, 1), "test": (n_test, 2)}
    for name, (n, offset) in splits.items():
        images = emt_structures(n, seed=int(seed) * 1000 + offset, system=system, hessian=bool(hessian))
        _atomic_write(paths[name], images)
    _atomic_write(paths["relax_start"], [_relax_start(seed, system)] if system != "molecules" else
                  emt_structures(1, seed=int(seed) * 1000 + 3, system=system))
    record = {"params": params, "sha256": {k: _sha256(p) for k, p in paths.items()}}
    atomic_write_text(manifest, json.dumps(record, indent=1) + "\n")
    return paths


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(generate_emt_dataset(sys.argv[1] if len(sys.argv) > 1 else None))
