"""`mlpot import-mace EXPORT_DIR OUT.pt`: a mace-torch model as an mlpot model file.

``EXPORT_DIR`` is written by ``scripts/export_mace.py`` in mace-torch's environment
(``hyperparameters.json`` + ``weights.safetensors``). The mlpot model gives the same energies,
forces and stress as mace-torch (see :mod:`mlpot.models.mace_import`). With ``--check``, the
energies/forces/stresses stored by ``scripts/make_mace_fixture.py`` in ``reference.json`` are
recomputed and compared.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("export_dir", help="folder written by scripts/export_mace.py")
    parser.add_argument("output", help="mlpot model file to write (e.g. model.pt)")
    parser.add_argument("--backend", default=None, choices=("reference", "triton", "auto"),
                        help="backend stored in the model config (default: auto, the fastest per op and device)")
    parser.add_argument("--check", action="store_true",
                        help="compare with EXPORT_DIR/reference.json (written by scripts/make_mace_fixture.py)")


def check_reference(model, export_dir, tol: float = 1e-8) -> float:
    """Max deviation from ``reference.json`` (energy eV, forces eV/Å, virial eV); raises if > tol."""
    import numpy as np
    from ase import Atoms

    ref = json.loads((Path(export_dir) / "reference.json").read_text())["structures"]
    worst = 0.0
    for r in ref:
        atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"])
        out = model.predict([atoms], compute_stress="stress" in r)
        dev = [abs(out["energy"][0] - r["energy"]), np.abs(out["forces"][0] - np.asarray(r["forces"])).max()]
        if "stress" in r:
            vol = abs(np.linalg.det(np.asarray(r["cell"])))
            dev.append(np.abs(out["stress"][0] * vol - np.asarray(r["stress"]) * r["stress_volume"]).max())
        worst = max(worst, *dev)
        print(f"  {r['name']:12s} |dE| {dev[0]:.2e} eV  |dF| {dev[1]:.2e} eV/Å"
              + (f"  |dW| {dev[2]:.2e} eV" if len(dev) > 2 else ""))
    if worst > tol:
        from mlpot.errors import ModelFileError

        raise ModelFileError(f"imported model deviates from mace-torch's reference by {worst:.3e} (> {tol:g})")
    return worst


def run(args) -> int:
    from mlpot.fileio import check_not_input
    from mlpot.models.mace_import import import_mace

    export = Path(args.export_dir)
    if export.is_dir():
        check_not_input(args.output, *sorted(export.iterdir()))
    from mlpot.errors import MlpotError, ModelFileError

    try:
        model = import_mace(args.export_dir)
    except (MlpotError, FileNotFoundError):
        raise
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{export / 'hyperparameters.json'}: not valid JSON ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - safetensors / shapes / missing keys: one line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"{export}: cannot import the mace-torch export ({type(exc).__name__}: {msg})") from None
    if args.backend is not None:
        model.config["backend"] = args.backend
    if args.check:
        worst = check_reference(model, args.export_dir)
        print(f"parity with mace-torch: max deviation {worst:.2e}")
    model.save(args.output)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.output}: MACE ({model.config['hidden_irreps']}, max_ell {model.config['max_ell']}, "
        f"correlation {model.config['correlation']}, {model.config['num_interactions']} interactions, "
        f"{n} parameters) for elements {model.atomic_numbers}",
        file=sys.stdout,
    )
    return 0
