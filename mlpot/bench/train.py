r"""Learning speed of the MACE tensor-product variants: validation force MAE against wall time.

Each variant trains the same MACE (same data, seed, hyperparameters) for a fixed wall-clock
budget (``--minutes``, the trainer's ``time_limit``) and differs only in ``interaction_tp``
(``cg`` | ``gaunt`` | ``so2``) and ``product`` (``symmetric`` | ``gaunt``). Reported per variant:
epochs done, seconds per epoch, the best validation force MAE reached by 25 %, 50 % and 100 % of the
budget, and the test energy/force MAE of the best (EMA) model. Curves go to
``<out>/curves.png``, everything to ``<out>/results.json`` and a markdown table to stdout.

Data: revised MD17 (``--molecule aspirin|ethanol``, split 01) from ``--data-dir``
(default ``../shared/data``): the first ``--n-train`` frames of the training file (5 % of them
held out for validation) and ``--n-test`` frames of the test file.

    python scripts/bench_train.py --molecule aspirin --n-train 200 --minutes 5
    python scripts/bench_train.py --variants cg/symmetric gaunt/gaunt --device cuda --minutes 60
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

DEFAULT_VARIANTS = ["cg/symmetric", "gaunt/symmetric", "so2/symmetric", "cg/gaunt"]


def _subset_npz(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` frames of an rMD17 npz file (same keys and units)."""
    with np.load(src) as z:
        n_frames = z["energies"].shape[0]
        arrays = {}
        for k in z.files:
            per_frame = k != "nuclear_charges" and z[k].ndim > 0 and z[k].shape[0] == n_frames
            arrays[k] = z[k][:n] if per_frame else z[k]
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, **arrays)
    return dst


def variant_config(variant: str, args, out: Path, train: Path, test: Path) -> dict:
    tp, product = variant.split("/")
    return {
        "output": str(out / variant.replace("/", "_")),
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "data": {"train": str(train), "valid": 0.05, "test": str(test)},
        "model": {
            "name": "MACE", "r_max": 5.0, "max_ell": args.max_ell, "num_interactions": 2,
            "hidden_irreps": f"{args.channels}x0e + {args.channels}x1o", "correlation": args.correlation,
            "radial_MLP": [32, 32], "interaction_tp": tp, "product": product,
        },
        "training": {
            "epochs": 100000, "batch_size": args.batch_size, "lr": 0.01, "amsgrad": True,
            "energy_weight": 1.0, "forces_weight": 100.0, "ema": True, "ema_decay": 0.99,
            "scheduler": "plateau", "scheduler_params": {"factor": 0.8, "patience": 10},
            "time_limit": args.minutes, "progress": False, "checkpoint_every": 100000,
        },
    }


def _at(curve, seconds):
    before = [f for t, f in curve if t <= seconds]
    return min(before) if before else float("nan")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--molecule", default="aspirin", choices=["aspirin", "ethanol"])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget per variant")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="interaction_tp/product pairs")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--max-ell", type=int, default=2)
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_train")
    args = p.parse_args(argv)

    from mlpot.bench.curves import plot_force_mae_vs_time, read_log_curve
    from mlpot.errors import ConfigError
    from mlpot.train import train
    from mlpot.train.config import validate_config

    for v in args.variants:
        if v.count("/") != 1:
            raise ConfigError(f"--variants: {v!r} is not of the form interaction_tp/product (e.g. cg/symmetric)")
    src = Path(args.data_dir) / "rmd17"
    train_src, test_src = src / f"rmd17_{args.molecule}_train_01.npz", src / f"rmd17_{args.molecule}_test_01.npz"
    for f in (train_src, test_src):
        if not f.exists():
            raise ConfigError(f"--data-dir: {f} not found")
    out = Path(args.out)
    train_file = _subset_npz(train_src, out / "data" / f"{args.molecule}_train_{args.n_train}.npz", args.n_train)
    test_file = _subset_npz(test_src, out / "data" / f"{args.molecule}_test_{args.n_test}.npz", args.n_test)

    results = []
    for v in args.variants:
        cfg = validate_config(variant_config(v, args, out, train_file, test_file))
        t0 = time.perf_counter()
        metrics = train(cfg, log=lambda msg: None)
        wall = time.perf_counter() - t0
        run_dir = Path(cfg["output"])
        curve = read_log_curve(run_dir)[0]
        budget = 60.0 * args.minutes
        epochs = len(curve)
        row = {
            "variant": v, "epochs": epochs, "s_per_epoch": (curve[-1][0] / epochs) if epochs else float("nan"),
            "valid_f_25": _at(curve, 0.25 * budget), "valid_f_50": _at(curve, 0.5 * budget),
            "valid_f_100": _at(curve, budget + 1e9),
            "test_e_mae": metrics["test"]["e_mae"], "test_f_mae": metrics["test"]["f_mae"],
            "wall_s": wall, "curve": curve,
        }
        results.append(row)
        print(f"{v}: {epochs} epochs, test F MAE {row['test_f_mae']:.1f} meV/Å", flush=True)

    import torch

    info = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "device": args.device, "threads": torch.get_num_threads(), "args": vars(args)}
    from mlpot.fileio import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps({"info": info, "results": results}, indent=2))
    plot_force_mae_vs_time({r["variant"]: r["curve"] for r in results}, out / "curves.png",
                           title=f"rMD17 {args.molecule}, {args.n_train} frames")
    print(f"\nrMD17 {args.molecule}, {args.n_train} train frames, {args.minutes} min per variant, "
          f"{args.dtype}, device {args.device}")
    print("| interaction_tp / product | epochs | s/epoch | best valid F MAE by 25 % / 50 % / 100 % of budget (meV/Å) "
          "| test E MAE (meV/atom) | test F MAE (meV/Å) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['variant']} | {r['epochs']} | {r['s_per_epoch']:.1f} | {r['valid_f_25']:.1f} / "
              f"{r['valid_f_50']:.1f} / {r['valid_f_100']:.1f} | {r['test_e_mae']:.2f} | {r['test_f_mae']:.1f} |")
    return results


if __name__ == "__main__":
    main()
