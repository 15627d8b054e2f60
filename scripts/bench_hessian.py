"""Hessian benchmarks: direct (HIP head) vs autograd time and memory, and HIP accuracy on EMT.

``speed``: for Cu clusters of N atoms (the N atoms of an fcc crystal nearest to a lattice site,
no cell), one MACE with a HIP head (random weights: the cost does not depend on them) computes
the (3N, 3N) Hessian by ``autograd`` and by ``direct``. Each (N, method) runs in a fresh
subprocess that reports the median wall time of ``--repeats`` calls (after one warm-up) and
its peak resident memory above the resident size before the first call (``ru_maxrss``).
Above ``--autograd-full-max`` atoms the full autograd Hessian (3N backward passes) takes too
long on a shared CPU: its time is estimated as the force pass with ``create_graph`` plus 3N
times the median of ``--autograd-rows`` measured backward passes, and marked "est." (its
memory is that of the graph and those rows, which is what the full loop holds too).

``accuracy``: trains a MACE with a HIP head from the CLI (``mlpot train``) on the built-in EMT
molecules with Hessian labels (``data.synthetic: {system: molecules, hessian: true}``), then
compares its direct Hessian with EMT's (central differences of forces) at the EMT-relaxed
geometry of every molecule of :data:`mlpot.data.synthetic.MOLECULES`: Hessian MAE (eV/Å²) and
the MAE of the harmonic frequencies (cm⁻¹; rigid-body modes dropped; an imaginary frequency
counts as negative).

    python scripts/bench_hessian.py speed --sizes 10 50 100 250 500 --repeats 3
    python scripts/bench_hessian.py accuracy --n-train 120 --epochs 40 --out runs/hip_bench
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODEL = dict(r_max=4.5, hidden_irreps="32x0e + 32x1o", max_ell=2, correlation=2, num_interactions=2,
             num_bessel=8, radial_MLP=[32, 32], avg_num_neighbors=12.0, hessian_head=True, seed=0)


def cu_cluster(n: int):
    import numpy as np
    from ase import Atoms
    from ase.build import bulk

    crystal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    centre = crystal.positions[np.argmin(np.linalg.norm(crystal.positions - crystal.cell.sum(0) / 2, axis=1))]
    order = np.argsort(np.linalg.norm(crystal.positions - centre, axis=1), kind="stable")[:n]
    return Atoms("Cu" * n, positions=crystal.positions[order])


def _child(n: int, method: str, repeats: int) -> None:
    import resource

    import torch

    from mlpot.calculators import MLPotCalculator
    from mlpot.models import build_model

    torch.manual_seed(0)
    model = build_model("MACE", atomic_numbers=[29], **MODEL)
    calc = MLPotCalculator(model, device="cpu")
    atoms = cu_cluster(n)
    page = 4096
    with open("/proc/self/statm") as fh:
        rss_before = int(fh.read().split()[1]) * page
    times = []
    if method == "autograd-rows":  # time `repeats` rows of the autograd Hessian, scaled to all 3N rows
        graph = calc.build_graph(atoms)
        positions = graph["positions"].detach().requires_grad_(True)
        graph["positions"] = positions
        t0 = time.perf_counter()
        out = model(graph, compute_force=True, create_graph=True)
        grad = -out["forces"].reshape(-1)
        t_first = time.perf_counter() - t0
        per_row = []
        for k in range(repeats):
            t0 = time.perf_counter()
            torch.autograd.grad(grad[k], positions, retain_graph=True)
            per_row.append(time.perf_counter() - t0)
        times = [t_first + 3 * n * statistics.median(per_row)]
    else:
        for k in range(repeats + 1):
            t0 = time.perf_counter()
            calc.get_hessian(atoms, method=method)
            if k:
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n": n, "method": method, "times": times, "peak_extra_mb": (peak - rss_before) / 2**20}))


def speed(args) -> None:
    rows = []
    for n in args.sizes:
        for method in ("direct", "autograd"):
            reps = args.repeats
            if method == "autograd" and n > args.autograd_full_max:
                method, reps = "autograd-rows", args.autograd_rows
            res = subprocess.run([sys.executable, __file__, "_child", str(n), method, str(reps)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            t = row["times"]
            print(f"N={n:4d} {method:8s} median {statistics.median(t):9.4f} s  (min {min(t):.4f}, max {max(t):.4f}, "
                  f"{len(t)} runs)  peak +{row['peak_extra_mb']:.0f} MB", flush=True)
    print("\n| N atoms | autograd (s) | direct (s) | autograd / direct | autograd peak +MB | direct peak +MB |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        a = next(r for r in rows if r["n"] == n and r["method"].startswith("autograd"))
        d = next(r for r in rows if r["n"] == n and r["method"] == "direct")
        ta, td = statistics.median(a["times"]), statistics.median(d["times"])
        est = " (est.)" if a["method"] == "autograd-rows" else ""
        print(f"| {n} | {ta:.3f}{est} | {td:.4f} | {ta / td:.0f}x | {a['peak_extra_mb']:.0f}{est} | "
              f"{d['peak_extra_mb']:.0f} |")


def signed(freqs):
    import numpy as np

    f = np.asarray(freqs, dtype=complex)
    return np.where(np.abs(f.imag) > np.abs(f.real), -np.abs(f.imag), f.real)


def accuracy(args) -> None:
    from pathlib import Path

    import numpy as np
    import yaml
    from ase.calculators.emt import EMT

    from mlpot.calculators import MLPotCalculator
    from mlpot.cli.main import main
    from mlpot.data.hessians import finite_difference_hessian
    from mlpot.data.synthetic import MOLECULES, emt_molecule
    from mlpot.sim.vibrations import harmonic_modes

    out = Path(args.out)
    model = dict(name="MACE", r_max=4.0, hidden_irreps="32x0e + 32x1o", max_ell=2, correlation=2,
                 num_interactions=2, num_bessel=8, radial_MLP=[32, 32], e0s="average", avg_num_neighbors="auto",
                 hessian_head=True, seed=0)
    cfg = {"output": str(out), "seed": 0,
           "data": {"synthetic": {"system": "molecules", "hessian": True, "n_train": args.n_train,
                                  "n_valid": 20, "n_test": 0, "seed": 0}},
           "model": model,
           "training": {"epochs": args.epochs, "batch_size": 4, "lr": 0.01, "energy_weight": 1.0,
                        "forces_weight": 10.0, "hessian_weight": 1.0, "ema": False,
                        "time_limit": args.time_limit, "progress": False}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_config.yaml").write_text(yaml.safe_dump(cfg))
    if not args.skip_train:
        assert main(["train", str(out / "bench_config.yaml")]) == 0
    calc = MLPotCalculator(str(out / "model.pt"), device="cpu")
    h_err, f_err = [], []
    print("| molecule | Hessian MAE (eV/Å²) | frequency MAE (cm⁻¹) | EMT frequencies (cm⁻¹) |")
    print("|---|---|---|---|")
    for name in MOLECULES:
        atoms = emt_molecule(name)
        ref = finite_difference_hessian(atoms, EMT())
        pred = calc.get_hessian(atoms, method="direct")
        fr = signed(harmonic_modes(atoms, ref).frequencies_cm)
        fp = signed(harmonic_modes(atoms, pred).frequencies_cm)
        h_err.append(float(np.abs(pred - ref).mean()))
        f_err.append(float(np.abs(np.sort(fp) - np.sort(fr)).mean()))
        print(f"| {name} | {h_err[-1]:.3f} | {f_err[-1]:.0f} | {', '.join(f'{x:.0f}' for x in np.sort(fr))} |")
    print(f"| **mean** | {np.mean(h_err):.3f} | {np.mean(f_err):.0f} | |")


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 250, 500])
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--autograd-full-max", type=int, default=50,
                   help="above this N the autograd Hessian is estimated: the force pass with create_graph plus "
                        "3N x the median time of --autograd-rows measured rows (marked 'est.')")
    s.add_argument("--autograd-rows", type=int, default=5)
    a = sub.add_parser("accuracy")
    a.add_argument("--n-train", type=int, default=120)
    a.add_argument("--epochs", type=int, default=40)
    a.add_argument("--time-limit", type=float, default=None, help="minutes")
    a.add_argument("--out", default="runs/hip_bench")
    a.add_argument("--skip-train", action="store_true", help="evaluate the model already in --out")
    args = p.parse_args(argv)
    speed(args) if args.what == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
