r"""Training speed against mace-torch: the same MACE, the same frames, float64, CPU.

Both programs train one model from the same extxyz files (rMD17 frames converted to eV, written
once by this script) with the same hyperparameters: ``hidden_irreps``, ``max_ell``,
``correlation``, 2 interactions (the first one non-residual, as mace-torch's ``--model MACE``),
8 Bessel functions, polynomial cutoff 5, ``radial_MLP``, the same explicit E0s, shift 0 and scale
= RMS of the training forces, Adam (amsgrad) with the same learning rate, no weight decay,
ReduceLROnPlateau, EMA 0.99, MSE loss with energy weight 1 and forces weight 100, batch size
and validation every epoch. mace-torch runs as ``mace_run_train`` from its own environment
(``--mace-train``), mlpot as ``mlpot train``; each gets ``--threads`` torch threads and
``--minutes`` of wall time (mace-torch has no time limit: it is stopped then). By default
the two run at the same time, so both see the same load on a shared machine.

Reported: epochs done, seconds per epoch (median over epochs, training + validation), the
throughput ratio, the validation force MAE after the same number of epochs (accuracy per
epoch) and the best validation force MAE each reached by the same wall time (measured from
the start of its training loop). Curves go to ``<out>/vs_mace.png``, numbers to
``<out>/vs_mace.json``, a markdown table to stdout.

``--profile`` instead times the phases of one mlpot training step on this model (median
over ``--repeats`` steps): forward (energy), force backward (``create_graph=True``),
loss + double backward, optimizer step + EMA; and lists the top operators (torch.profiler).

    python scripts/bench_train.py --vs-mace --mace-train <mace venv>/bin/mace_run_train --minutes 10
    python scripts/bench_train.py --vs-mace --profile
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_mace_log", "write_extxyz_subset"]

_MACE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: Epoch (\d+): .*?MAE_F=\s*([0-9.eE+-]+) meV"
)
_MACE_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: Started training")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def parse_mace_log(path) -> tuple[list[float], list[tuple[float, float]]]:
    """``(epoch end times, [(seconds, valid F MAE meV/Å), ...])`` from a ``mace_run_train`` log:
    seconds since its "Started training" line to each "Epoch N: ... MAE_F=... meV / A" line."""
    t0, ends, pts = None, [], []
    for line in Path(path).read_text().splitlines():
        m = _MACE_START.match(line)
        if m and t0 is None:
            t0 = _stamp(m.group(1))
            continue
        m = _MACE_LINE.match(line)
        if m and t0 is not None:
            t = _stamp(m.group(1)) - t0
            ends.append(t)
            pts.append((t, float(m.group(3))))
    return ends, pts


def write_extxyz_subset(frames, path) -> Path:
    """Frames (targets in ``atoms.calc``) as extxyz with ``REF_energy`` / ``REF_forces``, atomically."""
    import ase.io

    from mlpot.fileio import atomic_path

    out = []
    for a in frames:
        b = a.copy()
        b.calc = None
        b.info = {"REF_energy": float(a.get_potential_energy())}
        b.arrays["REF_forces"] = np.asarray(a.get_forces(), dtype=float)
        out.append(b)
    path = Path(path)
    with atomic_path(path, suffix=".xyz") as tmp:
        ase.io.write(tmp, out, format="extxyz")
    return path


def _mlpot_config(args, files: dict, e0s: dict, out: Path) -> dict:
    return {
        "output": str(out / "mlpot"), "seed": args.seed, "device": "cpu", "dtype": "float64",
        "data": {"train": str(files["train"]), "valid": str(files["valid"]),
                 "keys": {"energy": "REF_energy", "forces": "REF_forces"}},
        "model": {
            "name": "MACE", "r_max": args.r_max, "num_bessel": 8, "num_polynomial_cutoff": 5,
            "max_ell": args.max_ell, "num_interactions": 2, "hidden_irreps": args.hidden_irreps,
            "MLP_irreps": "16x0e", "correlation": args.correlation, "radial_MLP": args.radial_mlp,
            "interaction_cls_first": "RealAgnosticInteractionBlock", "e0s": {str(z): v for z, v in e0s.items()},
            "shift": 0.0, "scale": "auto", "avg_num_neighbors": "auto",
        },
        "training": {
            "epochs": 100000, "batch_size": args.batch_size, "valid_batch_size": 2 * args.batch_size,
            "lr": args.lr, "optimizer": "adam", "amsgrad": True, "weight_decay": 0.0, "scheduler": "plateau",
            "scheduler_params": {"factor": 0.8, "patience": 50}, "clip_grad": 10.0, "ema": True,
            "ema_decay": 0.99, "loss": "mse", "energy_weight": 1.0, "forces_weight": 100.0,
            "time_limit": args.minutes, "progress": False, "eval_every": 1, "checkpoint_every": 1,
        },
    }


def _mace_command(args, files: dict, e0s: dict, out: Path) -> list[str]:
    d = out / "mace"
    return [
        args.mace_train, "--name", "vs_mlpot", "--seed", str(args.seed), "--device", "cpu",
        "--default_dtype", "float64", "--work_dir", str(d), "--log_dir", str(d / "logs"),
        "--model_dir", str(d), "--checkpoints_dir", str(d / "checkpoints"), "--results_dir", str(d / "results"),
        "--train_file", str(files["train"]), "--valid_file", str(files["valid"]),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--E0s", repr({int(z): float(v) for z, v in e0s.items()}),
        "--model", "MACE", "--r_max", str(args.r_max), "--num_radial_basis", "8", "--num_cutoff_basis", "5",
        "--max_ell", str(args.max_ell), "--num_interactions", "2", "--hidden_irreps", args.hidden_irreps,
        "--MLP_irreps", "16x0e", "--correlation", str(args.correlation),
        "--radial_MLP", repr(list(args.radial_mlp)), "--scaling", "rms_forces_scaling",
        "--batch_size", str(args.batch_size), "--valid_batch_size", str(2 * args.batch_size),
        "--max_num_epochs", "100000", "--lr", str(args.lr), "--optimizer", "adam", "--amsgrad",
        "--weight_decay", "0.0", "--scheduler", "ReduceLROnPlateau", "--lr_factor", "0.8",
        "--scheduler_patience", "50", "--clip_grad", "10.0", "--ema", "--ema_decay", "0.99",
        "--loss", "weighted", "--energy_weight", "1.0", "--forces_weight", "100.0",
        "--error_table", "PerAtomMAE", "--eval_interval", "1", "--patience", "100000",
        "--restart_latest", "--save_cpu",
    ]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    return env


def _mlpot_curve(run_dir: Path) -> tuple[list[float], list[tuple[float, float]]]:
    """Like :func:`parse_mace_log` for an mlpot run; a last epoch cut short by the time limit
    (shorter than half the median epoch) is left out of the epoch count."""
    from mlpot.bench.curves import read_log_curve

    pts, _ = read_log_curve(run_dir)
    ends = [t for t, _ in pts]
    if len(ends) >= 3:
        steps = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
        if steps[-1] < 0.5 * statistics.median(steps[:-1]):
            ends = ends[:-1]
    return ends, pts


def _per_epoch(ends: list[float]) -> float:
    steps = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    return statistics.median(steps) if steps else float("nan")


def _best_by(pts, seconds: float) -> float:
    vals = [f for t, f in pts if t <= seconds]
    return min(vals) if vals else float("nan")


def _prepare(args, out: Path):
    from mlpot.data import read
    from mlpot.data.statistics import compute_statistics

    src = Path(args.data_dir) / "rmd17"
    train_npz = src / f"rmd17_{args.molecule}_train_01.npz"
    if not train_npz.exists():
        from mlpot.errors import ConfigError

        raise ConfigError(f"--data-dir: {train_npz} not found")
    frames = read(train_npz)
    n = args.n_train + args.n_valid
    if len(frames) < n:
        from mlpot.errors import ConfigError

        raise ConfigError(f"{train_npz}: {len(frames)} frames, --n-train + --n-valid asks for {n}")
    train, valid = frames[: args.n_train], frames[args.n_train:n]
    files = {"train": write_extxyz_subset(train, out / "data" / "train.xyz"),
             "valid": write_extxyz_subset(valid, out / "data" / "valid.xyz")}
    e0s = compute_statistics(train, args.r_max, e0s="fit").e0s
    return files, {int(z): float(v) for z, v in e0s.items()}


def profile_step(args, out: Path) -> dict:
    """Median seconds of the phases of one mlpot training step (see module docstring)."""
    import torch

    from mlpot.train.config import validate_config
    from mlpot.train.metrics import _to_device
    from mlpot.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    files, e0s = _prepare(args, out)
    cfg = validate_config(_mlpot_config(args, files, e0s, out / "profile"))
    tr = Trainer(cfg, log=lambda m: None)
    tr.setup()
    model, opt, ema, loss_fn = tr.model, tr.optimizer, tr.ema, tr.loss_fn
    model.train()
    graph = _to_device(next(iter(tr.train_loader)), tr.device)
    phases = {"forward": [], "force backward": [], "loss + double backward": [], "optimizer + EMA": []}

    def step(timed: bool):
        t0 = time.perf_counter()
        model(graph, compute_force=False)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        res = model(graph, compute_force=True, create_graph=True)
        t3 = time.perf_counter()
        loss, _ = loss_fn(res, graph)
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        ema.update(model)
        t5 = time.perf_counter()
        if timed:
            phases["forward"].append(t1 - t0)
            phases["force backward"].append((t3 - t2) - (t1 - t0))
            phases["loss + double backward"].append(t4 - t3)
            phases["optimizer + EMA"].append(t5 - t4)

    step(False)
    for _ in range(args.repeats):
        step(True)
    med = {k: statistics.median(v) for k, v in phases.items()}
    spread = {k: (min(v), max(v)) for k, v in phases.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    total = sum(med.values())
    print(f"mlpot training step, {args.molecule}, batch {args.batch_size}, {args.hidden_irreps}, "
          f"max_ell {args.max_ell}, correlation {args.correlation}, float64, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| phase | ms (median) | min-max | share |")
    print("| --- | --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.1f} | {1e3 * spread[k][0]:.1f}-{1e3 * spread[k][1]:.1f} | {100 * v / total:.0f} % |")
    print(f"| total | {1e3 * total:.1f} | | |")
    print(table)
    return {"median_s": med, "range_s": spread, "top_ops": table}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench_train --vs-mace", description=__doc__.split("\n\n")[0])
    p.add_argument("--vs-mace", action="store_true", help="(selects this benchmark)")
    p.add_argument("--profile", action="store_true", help="time the phases of one mlpot training step")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--mace-train", default="mace_run_train", help="mace-torch's mace_run_train executable")
    p.add_argument("--molecule", default="aspirin", choices=["aspirin", "ethanol"])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-valid", type=int, default=25)
    p.add_argument("--minutes", type=float, default=10.0, help="wall time for each program")
    p.add_argument("--hidden-irreps", default="32x0e + 32x1o")
    p.add_argument("--max-ell", type=int, default=2)
    p.add_argument("--correlation", type=int, default=2)
    p.add_argument("--radial-mlp", type=int, nargs="+", default=[32, 32])
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads for each program")
    p.add_argument("--sequential", action="store_true", help="run one after the other, not side by side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_train_vs_mace")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.profile:
        return profile_step(args, out)

    from mlpot.train.config import dump_config, validate_config

    files, e0s = _prepare(args, out)
    cfg = validate_config(_mlpot_config(args, files, e0s, out))
    dump_config(cfg, out / "mlpot.yaml")
    env = _env(args.threads)
    budget = 60.0 * args.minutes
    mace_cmd = _mace_command(args, files, e0s, out)
    mlpot_cmd = [sys.executable, "-m", "mlpot.cli.main", "train", str(out / "mlpot.yaml")]
    (out / "mace").mkdir(parents=True, exist_ok=True)
    logs = {"mace": open(out / "mace.out", "w"), "mlpot": open(out / "mlpot.out", "w")}
    procs = {}
    try:
        order = [("mace", mace_cmd), ("mlpot", mlpot_cmd)]
        for name, cmd in order:
            procs[name] = subprocess.Popen(cmd, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
            if args.sequential:
                _wait(procs[name], budget if name == "mace" else None)
        for name, proc in procs.items():
            _wait(proc, budget if name == "mace" else None)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fh in logs.values():
            fh.close()
    if procs["mlpot"].returncode != 0:
        raise RuntimeError(f"mlpot train failed; see {out / 'mlpot.out'}")
    mace_logs = sorted(f for f in (out / "mace" / "logs").glob("*.log") if not f.stem.endswith("_debug"))
    if not mace_logs:
        raise RuntimeError(f"mace_run_train wrote no log; see {out / 'mace.out'}")
    runs = {"mace-torch": parse_mace_log(mace_logs[-1]), "mlpot": _mlpot_curve(out / "mlpot")}
    res = {}
    for name, (ends, pts) in runs.items():
        res[name] = {"epochs": len(ends), "s_per_epoch": _per_epoch(ends), "curve": pts}
    t_eq = min(res["mace-torch"]["curve"][-1][0], res["mlpot"]["curve"][-1][0])
    n_eq = min(res["mace-torch"]["epochs"], res["mlpot"]["epochs"])
    for r in res.values():
        r["f_mae_at_equal_time"] = _best_by(r["curve"], t_eq)
        r["f_mae_at_equal_epoch"] = r["curve"][n_eq - 1][1] if n_eq else float("nan")
    from mlpot.bench.curves import plot_force_mae_vs_time
    from mlpot.fileio import atomic_write_text

    plot_force_mae_vs_time({k: v["curve"] for k, v in res.items()}, out / "vs_mace.png",
                           title=f"rMD17 {args.molecule}, {args.n_train} frames, {args.hidden_irreps}, float64 CPU")
    import torch

    info = {"args": vars(args), "torch": torch.__version__, "equal_time_s": t_eq, "equal_epochs": n_eq,
            "side_by_side": not args.sequential}
    atomic_write_text(out / "vs_mace.json", json.dumps({"info": info, "results": res}, indent=2) + "\n")
    ratio = res["mace-torch"]["s_per_epoch"] / res["mlpot"]["s_per_epoch"]
    print(f"rMD17 {args.molecule}: {args.n_train} train / {args.n_valid} valid frames, {args.hidden_irreps}, "
          f"max_ell {args.max_ell}, correlation {args.correlation}, batch {args.batch_size}, float64, CPU, "
          f"{args.threads} thread(s) each, {args.minutes:g} min each, "
          + ("side by side" if not args.sequential else "one after the other"))
    print(f"| program | epochs | s/epoch (median) | valid F MAE after {n_eq} epochs (meV/Å) "
          f"| best valid F MAE by {t_eq / 60:.1f} min (meV/Å) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in res.items():
        print(f"| {name} | {r['epochs']} | {r['s_per_epoch']:.2f} | {r['f_mae_at_equal_epoch']:.1f} "
              f"| {r['f_mae_at_equal_time']:.1f} |")
    print(f"throughput mlpot / mace-torch: {ratio:.2f}x")
    return {"info": info, "results": res}


def _wait(proc, seconds):
    try:
        proc.wait(timeout=seconds + 60.0 if seconds is not None else None)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
