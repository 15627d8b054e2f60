"""`mlpot eval --model M.pt --data FILE`: MAE and RMSE per config_type.

Units: energy meV/atom, forces meV/Å, stress meV/Å^3. ``--write-predictions OUT.xyz`` writes
the structures with the model's predictions under ``mlpot_energy`` (info), ``mlpot_forces``
(arrays) and ``mlpot_stress`` (info, Voigt, periodic cells only) beside the reference values.
"""
from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="mlpot model file (model.pt)")
    parser.add_argument("--data", required=True, nargs="+", help="structure file(s) with reference labels")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    parser.add_argument("--output", help="write the metrics to this file instead of stdout")
    parser.add_argument("--write-predictions", metavar="OUT.xyz", help="extxyz file with the predictions")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float64 or float32 (default: the model's)")
    parser.add_argument("--head", default=None, help="head of a multi-head model (default: the only head, or the one named default)")
    parser.add_argument("--data-format", default=None, help="file format (default: from the suffix)")
    parser.add_argument("--energy-key", default=None)
    parser.add_argument("--forces-key", default=None)
    parser.add_argument("--stress-key", default=None)


def evaluate_atoms(model, atoms_list, batch_size: int = 16, predictions: list | None = None) -> dict:
    """Metrics of ``model`` on labelled ``ase.Atoms`` (see :mod:`mlpot.train.metrics`)."""
    from mlpot.data import AtomicDataset, make_dataloader
    from mlpot.train.metrics import evaluate_loader

    p = next(model.parameters())
    ds = AtomicDataset(atoms_list, model.r_max, p.dtype)
    loader = make_dataloader(ds, batch_size, shuffle=False)
    return evaluate_loader(model, loader, p.device, predictions=predictions)


def _csv(results: dict) -> str:
    import csv
    import io

    keys = ["e_mae", "e_rmse", "f_mae", "f_rmse", "s_mae", "s_rmse", "n_configs"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["data", "config_type"] + keys)
    for name, m in results.items():
        w.writerow([name, "all"] + [m.get(k, "") for k in keys])
        for ct, mm in m.get("by_config_type", {}).items():
            w.writerow([name, ct] + [mm.get(k, "") for k in keys])
    return buf.getvalue()


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    import mlpot
    from mlpot.errors import ConfigError, MlpotError
    from mlpot.fileio import check_not_input
    from mlpot.train.metrics import format_table
    from mlpot.train.setup import read_frames
    from mlpot.voigt import full_3x3_to_voigt

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    for opt, out in (("--output", args.output), ("--write-predictions", args.write_predictions)):
        if out:
            check_not_input(out, args.model, *args.data, what=opt)
    model = mlpot.load_model(args.model, device=args.device, dtype=args.dtype)
    model.select_head(args.head)
    data_cfg = {"format": args.data_format,
                "keys": {"energy": args.energy_key, "forces": args.forces_key, "stress": args.stress_key}}
    results, written = {}, []
    for path in args.data:
        atoms_list = read_frames(path, data_cfg)
        preds: list | None = [] if args.write_predictions else None
        name = Path(path).stem
        if name in results:
            name = path
        try:
            results[name] = evaluate_atoms(model, atoms_list, args.batch_size, preds)
        except MlpotError as exc:
            raise type(exc)(f"{path}: {exc}") from None
        if preds is not None:
            for atoms, pr in zip(atoms_list, preds):
                a = atoms.copy()
                a.info.pop("_mlpot_source", None)
                res = dict(atoms.calc.results) if atoms.calc is not None else {}
                if "energy" in res:
                    a.info["REF_energy"] = float(res["energy"])
                if "forces" in res:
                    a.arrays["REF_forces"] = np.asarray(res["forces"])
                if "stress" in res:
                    a.info["REF_stress"] = np.asarray(res["stress"])
                a.info["mlpot_energy"] = pr["energy"]
                a.arrays["mlpot_forces"] = np.asarray(pr["forces"])
                if pr["stress"] is not None:
                    a.info["mlpot_stress"] = full_3x3_to_voigt(pr["stress"])
                a.calc = None
                written.append(a)
    if args.write_predictions:
        from mlpot.data.synthetic import _atomic_write

        _atomic_write(Path(args.write_predictions), written)
    if args.format == "json":
        text = json.dumps(results, indent=2) + "\n"
    elif args.format == "csv":
        text = _csv(results)
    else:
        text = format_table(results) + "\n"
    if args.output:
        from mlpot.fileio import atomic_write_text

        atomic_write_text(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0
