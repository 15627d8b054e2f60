#!/usr/bin/env python
"""Regenerate the mace-torch parity fixture ``tests/fixtures/mace_parity/`` (runs in the *mace* venv).

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python scripts/make_mace_fixture.py [--out DIR]

Builds a small mace-torch ``ScaleShiftMACE`` in float64 (species H, C, O; ``8x0e + 8x1o``,
``max_ell`` 2, correlation 3, 2 interactions, residual interaction blocks, non-trivial scale
and shift), exports it with ``scripts/export_mace.py`` and writes the energies, forces and
stresses mace-torch computes (through its ASE calculator) for

* ``molecule``: a perturbed ethanol molecule (no cell);
* ``triclinic``: a periodic triclinic cell shorter than the cutoff (atoms see their own images);
* ``slab``: periodic in a and b only.

to ``reference.json`` (positions etc. in full float64 precision). ``tests/test_mace_parity.py``
checks that ``mlpot`` reproduces them to 1e-8 without mace-torch installed.

End-to-end check with both venvs (what the committed fixture was made with)::

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python scripts/make_mace_fixture.py --out /tmp/mace_fx
    .venv/bin/mlpot import-mace /tmp/mace_fx /tmp/mace_fx/mlpot.pt
    MLPOT_MACE_FIXTURE=/tmp/mace_fx .venv/bin/python -m pytest tests/test_mace_parity.py -q
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "fixtures" / "mace_parity"


def build_model(seed: int = 7, hidden_irreps: str = "8x0e + 8x1o", max_ell: int = 2, correlation=3,
                num_interactions: int = 2, interaction: str = "RealAgnosticResidualInteractionBlock",
                interaction_first: str = "RealAgnosticResidualInteractionBlock", model_class: str = "ScaleShiftMACE",
                heads=None, options=None, num_bessel: int = 6):
    """A small mace-torch model; ``heads`` (names) gives per-head E0s and scale/shift, ``options``
    any further ``mace.modules.MACE`` keyword arguments (``pair_repulsion``, ``distance_transform``,
    ``radial_type``, ...)."""
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    kwargs = {
        "r_max": 3.6,
        "num_bessel": num_bessel,
        "num_polynomial_cutoff": 5,
        "max_ell": max_ell,
        "interaction_cls": modules.interaction_classes[interaction],
        "interaction_cls_first": modules.interaction_classes[interaction_first],
        "num_interactions": num_interactions,
        "num_elements": 3,
        "hidden_irreps": o3.Irreps(hidden_irreps),
        "MLP_irreps": o3.Irreps("16x0e"),
        "atomic_energies": np.array([-13.587, -1029.41, -2042.61]),
        "avg_num_neighbors": 6.5,
        "atomic_numbers": [1, 6, 8],
        "correlation": correlation,
        "gate": torch.nn.functional.silu,
        "radial_MLP": [16, 16, 16],
    }
    scale, shift = 1.7, -0.35
    if heads:
        H = len(heads)
        kwargs["heads"] = list(heads)
        kwargs["atomic_energies"] = np.stack([kwargs["atomic_energies"] + 0.25 * h for h in range(H)])
        scale, shift = [1.7 - 0.3 * h for h in range(H)], [-0.35 + 0.2 * h for h in range(H)]
    kwargs.update(options or {})
    if model_class == "ScaleShiftMACE":
        model = modules.ScaleShiftMACE(atomic_inter_scale=scale, atomic_inter_shift=shift, **kwargs)
    else:
        model = modules.MACE(**kwargs)
    # mace-torch initialises some weights to small values; make every path count
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.numel():
                p.mul_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
        if kwargs.get("radial_type") == "chebyshev":
            # T_n of the raw distance reaches ~(2 r)^n: damp the radial MLPs' input layer so that
            # energies stay O(10^3) eV and a 1e-8 eV comparison is meaningful
            for inter in model.interactions:
                inter.conv_tp_weights.layer0.weight.mul_(0.01)
    return model.double().eval()


def structures():
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(3)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(scale=0.08, size=mol.positions.shape)
    mol.info["name"] = "molecule"

    cell = np.array([[3.9, 0.0, 0.0], [0.7, 3.6, 0.0], [-0.5, 0.9, 4.1]])
    frac = rng.random((5, 3))
    tri = Atoms(numbers=[6, 8, 1, 1, 6], scaled_positions=frac, cell=cell, pbc=True)
    # keep atoms apart (> 0.9 Å) so the structure is physical
    for _ in range(200):
        d = tri.get_all_distances(mic=True) + np.eye(len(tri)) * 10
        if d.min() > 0.9:
            break
        tri.set_scaled_positions(rng.random((5, 3)))
    tri.info["name"] = "triclinic"

    slab_cell = np.array([[4.3, 0.0, 0.0], [1.1, 4.0, 0.0], [0.0, 0.0, 12.0]])
    slab = Atoms(numbers=[8, 6, 1, 1, 1, 6], cell=slab_cell, pbc=[True, True, False])
    slab.set_scaled_positions(np.c_[rng.random((6, 2)), 0.4 + 0.15 * rng.random(6)])
    for _ in range(200):
        d = slab.get_all_distances(mic=True) + np.eye(len(slab)) * 10
        if d.min() > 0.9:
            break
        slab.set_scaled_positions(np.c_[rng.random((6, 2)), 0.4 + 0.15 * rng.random(6)])
    slab.info["name"] = "slab"
    return [mol, tri, slab]


def reference(model, atoms_list) -> list[dict]:
    """mace-torch's numbers for every structure: with the calculator's default head (entries
    without ``head``; only when the model has one) and with every head by name."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    lowered = [h.lower() for h in heads]
    runs = ([None] if len(heads) == 1 or "default" in lowered else []) + (heads if len(heads) > 1 else [])
    out = []
    for head in runs:
        out.extend(_reference_one_head(model, atoms_list, head))
    return out


def _reference_one_head(model, atoms_list, head) -> list[dict]:
    from mace.calculators import MACECalculator
    from mace.data.neighborhood import get_neighborhood

    kw = {} if head is None else {"head": head}
    calc = MACECalculator(models=model, device="cpu", default_dtype="float64", compute_atomic_stresses=True, **kw)
    out = []
    for atoms in atoms_list:
        a = atoms.copy()
        a.calc = calc
        entry = {
            "name": atoms.info["name"] + ("" if head is None else f"@{head}"),
            **({} if head is None else {"head": head}),
            "numbers": [int(z) for z in a.numbers],
            "positions": a.positions.tolist(),
            "cell": np.asarray(a.cell).tolist(),
            "pbc": [bool(p) for p in a.pbc],
            "energy": float(a.get_potential_energy()),
            "forces": a.get_forces().tolist(),
        }
        if a.pbc.any():
            entry["stress"] = a.get_stress().tolist()  # Voigt xx yy zz yz xz xy, eV/Å^3
            # mace-torch divides the virial by the volume of the cell its neighbour list returns,
            # which replaces non-periodic cell vectors by long ones: keep that volume to compare
            _, _, _, cell = get_neighborhood(a.positions, float(model.r_max), tuple(bool(p) for p in a.pbc),
                                             np.array(a.cell, dtype=float))
            entry["stress_volume"] = float(abs(np.linalg.det(cell)))
            if a.pbc.all():
                # per-atom virials (N, 3, 3), mace-torch's atomic_virials
                entry["atomic_virials"] = np.asarray(calc.results["virials"]).reshape(len(a), 3, 3).tolist()
        out.append(entry)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--save-model", action="store_true", help="also write the mace-torch model (mace.model)")
    p.add_argument("--hidden-irreps", default="8x0e + 8x1o")
    p.add_argument("--max-ell", type=int, default=2)
    p.add_argument("--correlation", default="3", help="int, or one per layer: 3,2")
    p.add_argument("--num-interactions", type=int, default=2)
    p.add_argument("--interaction", default="RealAgnosticResidualInteractionBlock")
    p.add_argument("--interaction-first", default="RealAgnosticResidualInteractionBlock")
    p.add_argument("--model-class", default="ScaleShiftMACE", choices=["MACE", "ScaleShiftMACE"])
    p.add_argument("--num-bessel", type=int, default=6)
    p.add_argument("--heads", default=None, help="comma-separated head names (per-head E0s, scale/shift)")
    p.add_argument("--options", default=None,
                   help='JSON of further mace.modules.MACE arguments, e.g. {"pair_repulsion": true}')
    args = p.parse_args(argv)

    import torch

    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, str(HERE))
    from export_mace import export

    corr = [int(c) for c in str(args.correlation).split(",")]
    corr = corr[0] if len(corr) == 1 else corr
    model = build_model(args.seed, args.hidden_irreps, args.max_ell, corr, args.num_interactions,
                        args.interaction, args.interaction_first, args.model_class,
                        heads=args.heads.split(",") if args.heads else None,
                        options=json.loads(args.options) if args.options else None, num_bessel=args.num_bessel)
    out = export(model, args.out)
    if args.save_model:
        torch.save(model, out / "mace.model")
    ref = reference(model, structures())
    (out / "reference.json").write_text(
        "{\"structures\": [\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in ref) + "\n]}\n"
    )
    for r in ref:
        print(f"{r['name']:10s} E = {r['energy']:.10f} eV  |F|max = {np.abs(r['forces']).max():.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
