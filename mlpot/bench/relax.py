r"""Relaxation throughput: batched FIRE (all structures in one graph) against the per-structure
ASE FIRE loop, in structures/s.

Structures: ``--count`` fcc Cu cells (conventional cell repeated 1x1x1 to 2x2x2, so 4 to 32
atoms), lattice constant drawn in [3.55, 3.70] Å, positions rattled by 0.1 Å (seed 0). Both
sides relax positions only to ``--fmax`` with the same FIRE parameters (ASE's defaults), at
most ``--steps`` steps, with the same model (random weights, ``--variant`` of
:mod:`mlpot.bench.model`, hidden irreps shrunk by ``--channels``), so both take the same number
of steps per structure. Reported: wall time, structures/s, mean steps, and for batched FIRE the
number of model calls.

    python scripts/bench_relax.py --count 32 --fmax 0.05
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def make_structures(count: int, seed: int = 0):
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        rep = tuple(int(x) for x in rng.integers(1, 3, size=3))
        a = bulk("Cu", "fcc", a=float(rng.uniform(3.55, 3.70)), cubic=True) * rep
        a.rattle(stdev=0.1, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def build_model(variant: str, dtype: str, channels: int | None):
    import torch

    from mlpot.bench.model import mlpot_config
    from mlpot.models import build_model as _build
    from mlpot.testing.model_checks import randomize_parameters

    name, cfg = mlpot_config(variant, [29])
    if channels and "hidden_irreps" in cfg:
        cfg["hidden_irreps"] = f"{channels}x0e + {channels}x1o"
    torch.manual_seed(0)
    model = _build(name, **cfg)
    randomize_parameters(model, seed=0, scale=0.05)
    return model.to(torch.float64 if dtype == "float64" else torch.float32).eval()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench_relax", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variant", default="mace")
    p.add_argument("--channels", type=int, default=32, help="hidden irreps NxOe + Nx1o (smaller = faster)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--max-atoms", type=int, default=4096)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from mlpot.calculators import MLPotCalculator
    from mlpot.sim.batched_fire import batched_fire_relax
    from mlpot.sim.relax import relax_atoms

    model = build_model(args.variant, args.dtype, args.channels)
    structs = make_structures(args.count)
    natoms = sum(len(a) for a in structs)

    calc = MLPotCalculator(model, device="cpu", dtype=args.dtype, skin=0.5)
    t0 = time.perf_counter()
    loop = [relax_atoms(a.copy(), calc, fmax=args.fmax, steps=args.steps, optimizer="FIRE") for a in structs]
    t_loop = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = batched_fire_relax(model, structs, fmax=args.fmax, steps=args.steps, max_atoms=args.max_atoms)
    t_batch = time.perf_counter() - t0

    rows = [
        {"method": "ASE FIRE, one structure at a time", "seconds": t_loop, "structures_per_s": args.count / t_loop,
         "mean_steps": float(np.mean([r.steps for r in loop])), "converged": int(sum(r.converged for r in loop)),
         "model_calls": int(sum(r.steps + 1 for r in loop))},
        {"method": "batched FIRE (mlpot.sim.batched_fire)", "seconds": t_batch,
         "structures_per_s": args.count / t_batch, "mean_steps": float(res.steps.mean()),
         "converged": int(res.converged.sum()), "model_calls": res.model_calls},
    ]
    print(f"{args.count} Cu structures ({natoms} atoms), {args.variant} ({args.channels} channels, {args.dtype}), "
          f"fmax {args.fmax} eV/Å", file=sys.stderr)
    print("| method | wall (s) | structures/s | mean steps | converged | model calls |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.2f} | {r['structures_per_s']:.2f} | {r['mean_steps']:.1f} | "
              f"{r['converged']}/{args.count} | {r['model_calls']} |")
    if args.json:

        from mlpot.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
