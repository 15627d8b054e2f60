r"""Molecular-dynamics throughput: NVE velocity Verlet on fcc Cu, mlpot against mace-torch.

What is timed: ``--steps`` velocity-Verlet steps (1 fs) of ``ase.md.verlet.VelocityVerlet``
with the calculator attached, after ``--warmup`` untimed steps (first-call setup). For mlpot
this is :class:`mlpot.calculators.MLPotCalculator` (Verlet skin ``--skin`` Å, so most steps
reuse the neighbour list); for mace-torch ``mace.calculators.MACECalculator`` (neighbour list
rebuilt every step, its default). Reported: atoms·steps/s and ns/day at 1 fs.

Systems: fcc Cu, a = 3.61 Å, conventional cells ``4x4x4`` (256 atoms), ``6x6x6`` (864 atoms)
and ``12x12x12`` (6912 atoms), Maxwell–Boltzmann velocities at 300 K (seed 0). Models: random weights, the
hyperparameters of :data:`mlpot.bench.model.MACE_HYPER` on both sides (MACE,
``128x0e + 128x1o``, ``max_ell 3``, correlation 3, 2 interactions, ``r_max 5``).
mace-torch runs in its own environment (``--mace-python``, default ``.venv-mace/bin/python``
under the project root) as a subprocess, in the same run.

    python scripts/bench_md.py --sizes 864 --dtypes float32,float64 --steps 3
    mlpot bench md --sizes 864,6912 --steps 2 --no-mace
    python scripts/bench_md.py --sizes 256 --steps 3 --force-calls 3   # s/step beside s/force call

``scripts/bench_md.py`` applies :func:`mlpot.runtime.tune_malloc` (as ``mlpot`` and
``scripts/bench_model.py`` do; before, it did not). ``--force-calls N`` times N plain force calls
in the same process after the MD steps: measured that way an MD step costs one force call (the
integrator's work is O(N) numpy), so the 2.5-5x of the 2026-11-24 MD table against the
force-call table came from comparing separate runs under different load and allocator settings,
not from the MD driver (BENCHMARKS.md, "Imported MACE on CPU").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CELLS = {256: 4, 864: 6, 6912: 12}


def make_cu(n_atoms: int):
    from ase.build import bulk

    if n_atoms not in CELLS:
        raise SystemExit(f"unsupported size {n_atoms}; choose from {sorted(CELLS)}")
    k = CELLS[n_atoms]
    return bulk("Cu", "fcc", a=3.61, cubic=True) * (k, k, k)


def _velocities(atoms):
    import numpy as np
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    Stationary(atoms)


def time_md(atoms, calc, steps: int, warmup: int) -> float:
    """Seconds per step of velocity Verlet (1 fs) after ``warmup`` steps."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = atoms.copy()
    _velocities(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(warmup)
    t0 = time.perf_counter()
    dyn.run(steps)
    return (time.perf_counter() - t0) / steps


def time_force_calls(atoms, calc, calls: int) -> float:
    """Median seconds of ``calls`` plain ``get_forces()`` calls on rattled copies of ``atoms``
    (the force-call benchmark's measure, :func:`mlpot.bench.model._time_calls`), in the same
    process as the MD timing, to reconcile the two tables: an MD step is one force call plus the
    integrator's O(N) work."""
    from mlpot.bench.model import _time_calls

    return _time_calls(atoms, calc, calls)


def run_mlpot(n_atoms: int, dtype: str, steps: int, warmup: int, skin: float, variant: str = "mace",
              force_calls: int = 0):
    """Seconds per MD step; with ``force_calls``, ``(s/step, s/force call)`` in the same process."""
    from mlpot.bench.model import build_mlpot_model
    from mlpot.calculators import MLPotCalculator

    model = build_mlpot_model(variant, [29], dtype)
    calc = MLPotCalculator(model, device="cpu", dtype=dtype, skin=skin)
    s_step = time_md(make_cu(n_atoms), calc, steps, warmup)
    if not force_calls:
        return s_step
    return s_step, time_force_calls(make_cu(n_atoms), calc, force_calls)


_MACE_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator
import atexit, gc
gc.freeze(); atexit.register(gc.unfreeze)  # as mlpot's side (mlpot.runtime.freeze_gc): no full collection inside a timed step

job = json.loads(sys.stdin.read())
h = job["hyper"]
out = []
for n, path in job["systems"]:
    for dtype in job["dtypes"]:
        torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
        torch.manual_seed(0)
        model = modules.ScaleShiftMACE(
            r_max=h["r_max"], num_bessel=h["num_bessel"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
            max_ell=h["max_ell"], interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=h["num_interactions"], num_elements=1,
            hidden_irreps=o3.Irreps(h["hidden_irreps"]), MLP_irreps=o3.Irreps(h["MLP_irreps"]),
            atomic_energies=np.zeros(1), avg_num_neighbors=h["avg_num_neighbors"],
            atomic_numbers=[29], correlation=h["correlation"], gate=torch.nn.functional.silu,
            radial_MLP=h["radial_MLP"], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        ).to(torch.float64 if dtype == "float64" else torch.float32)
        calc = MACECalculator(models=model, device="cpu", default_dtype=dtype)
        atoms = read(path)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
        Stationary(atoms)
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        dyn.run(job["warmup"])
        t0 = time.perf_counter(); dyn.run(job["steps"])
        row = {"atoms": n, "dtype": dtype, "s_per_step": (time.perf_counter() - t0) / job["steps"]}
        calls = []
        base = atoms.get_positions(); rng = np.random.default_rng(1)
        for _ in range(job.get("force_calls", 0)):
            atoms.set_positions(base + 1e-3 * rng.standard_normal(base.shape))
            t0 = time.perf_counter(); atoms.get_forces(); calls.append(time.perf_counter() - t0)
        if calls:
            row["s_per_force_call"] = float(np.median(calls))
        out.append(row)
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def run_mace_torch(python: str, sizes, dtypes, steps, warmup, timeout, force_calls: int = 0) -> dict:
    from ase.io import write

    from mlpot.bench.model import MACE_HYPER

    with tempfile.TemporaryDirectory() as tmp:
        systems = []
        for n in sizes:
            p = Path(tmp) / f"cu{n}.extxyz"
            write(p, make_cu(n), format="extxyz")
            systems.append((n, str(p)))
        job = json.dumps({"hyper": MACE_HYPER, "systems": systems, "dtypes": dtypes, "steps": steps,
                          "warmup": warmup, "force_calls": force_calls})
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        proc = subprocess.run([python, "-c", _MACE_SCRIPT], input=job, capture_output=True, text=True, env=env,
                              timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mace-torch run failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    if force_calls:
        return {(r["atoms"], r["dtype"]): (r["s_per_step"], r["s_per_force_call"]) for r in rows}
    return {(r["atoms"], r["dtype"]): r["s_per_step"] for r in rows}


def _row(impl, n, dtype, s_per_step, steps):
    s_call = None
    if isinstance(s_per_step, tuple):
        s_per_step, s_call = s_per_step
    rate = 1.0 / s_per_step
    return {"impl": impl, "atoms": n, "dtype": dtype, "steps": steps, "s_per_step": s_per_step,
            "atom_steps_per_s": rate * n, "ns_per_day": rate * 1.0 * 86400 * 1e-6, "s_per_force_call": s_call}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="mlpot bench md", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="864,6912", help="comma-separated atom counts (256, 864, 6912)")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skin", type=float, default=0.5, help="mlpot neighbour-list skin (Å)")
    p.add_argument("--variant", default="mace", help="mlpot model variant (see mlpot.bench.model)")
    p.add_argument("--mace-python", default=str(ROOT / ".venv-mace" / "bin" / "python"))
    p.add_argument("--no-mace", action="store_true", help="skip mace-torch")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--force-calls", type=int, default=0,
                   help="also time this many plain force calls in the same process (step / force-call ratio)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    rows = []
    for n in sizes:
        for dt in dtypes:
            rows.append(_row(f"mlpot {args.variant}", n, dt, run_mlpot(n, dt, args.steps, args.warmup, args.skin,
                                                                   args.variant, args.force_calls), args.steps))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = {}
    if not args.no_mace:
        if Path(args.mace_python).exists():
            ref = run_mace_torch(args.mace_python, sizes, dtypes, args.steps, args.warmup, args.timeout,
                                 args.force_calls)
            for (n, dt), s in ref.items():
                rows.append(_row("mace-torch", n, dt, s, args.steps))
        else:
            print(f"mace-torch python not found at {args.mace_python}; skipped", file=sys.stderr)
    print("| implementation | atoms | dtype | steps | s/step | atoms·steps/s | ns/day (1 fs) | s/force call | "
          "step / force call |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        call = r.get("s_per_force_call")
        tail = f"{call:.3f} | {r['s_per_step'] / call:.2f} |" if call else "- | - |"
        print(f"| {r['impl']} | {r['atoms']} | {r['dtype']} | {r['steps']} | {r['s_per_step']:.3f} | "
              f"{r['atom_steps_per_s']:.0f} | {r['ns_per_day']:.4f} | " + tail)
    if args.json:
        from mlpot.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
