r"""Learning speed of the MACE tensor-product variants: validation force MAE against wall time.

Each variant trains on the same data with the same seed, loss and schedule for a fixed wall-clock
budget (``--minutes``, the trainer's ``time_limit``). A variant is a MACE ``interaction_tp/product``
pair (``cg`` | ``gaunt`` | ``so2`` / ``symmetric`` | ``gaunt``), optionally ``+spline`` (Facet's
spline radial functions in MACE), or a whole model of :data:`MODEL_VARIANTS` (``escn``,
``equiformer_v2``, ``facet``) at ``--channels`` channels and ``--max-ell`` degrees. Reported per
variant: parameters, epochs done, seconds per epoch, the best validation force MAE reached by 25 %,
50 % and 100 % of the budget, the test energy/force MAE of the best (EMA) model, and the force-call
time of the same architecture on ``--cost-systems`` (default Si64 and Cu864, random weights). Curves go to
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

DEFAULT_VARIANTS = ["cg/symmetric", "cg/gaunt", "escn", "equiformer_v2", "facet", "cg/symmetric+spline", "tensornet"]

#: variants that are whole models rather than MACE ``interaction_tp/product`` pairs: name ->
#: ``model:`` section at ``--channels`` channels and ``--max-ell`` degrees (same cutoff as MACE)
MODEL_VARIANTS = {
    "escn": lambda a: {"name": "ESCN", "num_layers": 2, "lmax": a.max_ell, "mmax": 2, "sphere_channels": a.channels,
                       "hidden_channels": 2 * a.channels, "edge_channels": a.channels},
    "equiformer_v2": lambda a: {"name": "EquiformerV2", "num_layers": 2, "lmax": a.max_ell, "mmax": 2,
                                "sphere_channels": a.channels, "attn_hidden_channels": a.channels, "num_heads": 4,
                                "attn_alpha_channels": 8, "attn_value_channels": max(a.channels // 4, 1),
                                "ffn_hidden_channels": 2 * a.channels, "edge_channels": a.channels},
    "facet": lambda a: {"name": "Facet", "num_layers": 2, "lmax": a.max_ell, "mmax": 2, "sphere_channels": a.channels,
                        "hidden_channels": 2 * a.channels, "num_knots": 16},
    "tensornet": lambda a: {"name": "TensorNet", "num_layers": 2, "num_channels": a.channels},
}


def model_section(variant: str, args) -> dict:
    """The ``model:`` section of a variant: a name of :data:`MODEL_VARIANTS`, or a MACE
    ``interaction_tp/product`` pair, optionally ``+spline`` (``radial: spline``, 16 intervals)."""
    if variant in MODEL_VARIANTS:
        return {"r_max": 5.0, **MODEL_VARIANTS[variant](args)}
    pair, _, option = variant.partition("+")
    tp, product = pair.split("/")
    model = {
        "name": "MACE", "r_max": 5.0, "max_ell": args.max_ell, "num_interactions": 2,
        "hidden_irreps": f"{args.channels}x0e + {args.channels}x1o", "correlation": args.correlation,
        "radial_MLP": [32, 32], "interaction_tp": tp, "product": product,
    }
    if option == "spline":
        model.update(radial="spline", num_knots=16)
    return model


def check_variant(variant: str) -> None:
    from mlpot.errors import ConfigError

    pair, _, option = variant.partition("+")
    if variant not in MODEL_VARIANTS and (pair.count("/") != 1 or option not in ("", "spline")):
        raise ConfigError(f"--variants: {variant!r} is not one of {', '.join(MODEL_VARIANTS)} or of the form "
                          "interaction_tp/product[+spline] (e.g. cg/symmetric)")


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
    return {
        "output": str(out / variant.replace("/", "_")),
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "data": {"train": str(train), "valid": 0.05, "test": str(test)},
        "model": model_section(variant, args),
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
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help=f"interaction_tp/product[+spline] MACE pairs or models: {', '.join(MODEL_VARIANTS)}")
    p.add_argument("--cost-systems", default="si64,cu864",
                   help="systems (mlpot.bench.model) for the force-call time of each architecture; '' for none")
    p.add_argument("--cost-repeats", type=int, default=3)
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
        check_variant(v)
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
        row.update(variant_costs(run_dir / "model.pt", [s for s in args.cost_systems.split(",") if s],
                                 args.cost_repeats, args.dtype))
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
    systems = [s for s in args.cost_systems.split(",") if s]
    print("| variant | params | epochs | s/epoch | best valid F MAE by 25 % / 50 % / 100 % of budget (meV/Å) "
          "| test E MAE (meV/atom) | test F MAE (meV/Å) |" + "".join(f" force call {s} (s) |" for s in systems))
    print("| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(systems))
    for r in results:
        print(f"| {r['variant']} | {r['params']} | {r['epochs']} | {r['s_per_epoch']:.1f} | {r['valid_f_25']:.1f} / "
              f"{r['valid_f_50']:.1f} / {r['valid_f_100']:.1f} | {r['test_e_mae']:.2f} | {r['test_f_mae']:.1f} |"
              + "".join(f" {r['force_call_s'][s]:.3f} |" for s in systems))
    return results


def variant_costs(model_file: Path, systems: list[str], repeats: int, dtype: str) -> dict:
    """Parameters of the trained model, and the median force-call time (through the calculator,
    :func:`mlpot.bench.model._time_calls`) of the same architecture built for each system's
    elements (random weights: the cost does not depend on them)."""
    import torch

    from mlpot import load_model
    from mlpot.bench.model import _mlpot_calculator, _time_calls, make_system
    from mlpot.models import build_model

    trained = load_model(model_file, device="cpu")
    costs = {"params": sum(p.numel() for p in trained.parameters()), "force_call_s": {}}
    for name in systems:
        atoms, _ = make_system(name)
        config = dict(trained.config, atomic_numbers=sorted(set(int(z) for z in atoms.numbers)), e0s=None)
        torch.manual_seed(0)
        model = build_model(trained.model_name, **config).to(torch.float64 if dtype == "float64" else torch.float32)
        costs["force_call_s"][name] = _time_calls(atoms, _mlpot_calculator(model.eval(), dtype)[0], repeats)
    return costs


if __name__ == "__main__":
    main()
