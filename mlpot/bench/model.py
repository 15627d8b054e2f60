r"""Force-call time of whole models through the ASE calculator, side by side with mace-torch.

What is timed: one ``atoms.get_forces()`` on an ASE calculator, i.e. neighbor list + graph +
model + autograd forces (``mlpot.calculators.MLPotCalculator`` for mlpot, or ``model.predict``
when the calculator is missing; ``mace.calculators.MACECalculator`` for mace-torch). Before
every call the positions are rattled by 1e-3 Å so no result is cached. One untimed warm-up call,
then the median of ``--repeats`` calls.

Systems: ``aspirin`` (21 atoms, first frame of rMD17 aspirin from the shared data folder, else
a stand-in molecule of the same composition), ``si64`` (diamond Si, 2x2x2 conventional cells,
64 atoms), ``cu864`` (fcc Cu, 6x6x6 conventional cells, 864 atoms).

Models (random weights, same hyperparameters on both sides): MACE with hidden irreps
``128x0e + 128x1o``, ``max_ell 3``, correlation 3, 2 interactions, ``r_max 5``, 8 Bessel
functions, radial MLP ``[64, 64, 64]``; the Gaunt / SO(2) MACE variants; and an eSCN
(``lmax 6``, ``mmax 2``, 2 layers; channels given in the table). mace-torch runs in its own
virtual environment (``--mace-python``, default ``.venv-mace/bin/python`` under the project
root) as a subprocess on the same structures, in the same run; the ratio
``mlpot / mace-torch`` is printed for each MACE row.

    python scripts/bench_model.py --systems aspirin,si64 --dtypes float64 --repeats 3
    mlpot bench model --profile si64          # which ops dominate an mlpot force call

``--imported`` (issue 14, item 7) times an *imported* model against mace-torch with the same
weights: mace-torch builds and exports the model, mlpot imports it, and the two force calls
alternate round by round in one run, for every dtype, thread count (``--threads 1,2``) and
number of competing CPU-bound processes (``--busy 0,1``); systems aspirin, si64, cu256, cu864.
``--imported --profile SYSTEM`` prints the torch.profiler table of the imported model's call::

    python scripts/bench_model.py --imported --systems aspirin,si64,cu256 --repeats 5
    python scripts/bench_model.py --imported --profile si64 --dtypes float64 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("aspirin", "si64", "cu864")

MACE_HYPER = dict(
    r_max=5.0,
    num_bessel=8,
    num_polynomial_cutoff=5,
    max_ell=3,
    num_interactions=2,
    hidden_irreps="128x0e + 128x1o",
    MLP_irreps="16x0e",
    correlation=3,
    radial_MLP=[64, 64, 64],
    avg_num_neighbors=20.0,
)

ESCN_HYPER = dict(
    r_max=5.0, num_layers=2, lmax=6, mmax=2, sphere_channels=32, hidden_channels=64, edge_channels=32,
    num_bessel=8, avg_num_neighbors=20.0,
)

# TensorNet as in its paper's rMD17 setup (128 channels, 2 layers, 32 radial functions), same cutoff
TENSORNET_HYPER = dict(r_max=5.0, num_channels=128, num_layers=2, num_rbf=32, readout_hidden=128,
                       avg_num_neighbors=20.0)

# mlpot model variants: (registered name, extra config); MACE keys follow mlpot.models.mace
MODEL_VARIANTS = {
    "mace": ("MACE", {}),
    "mace_gaunt_tp": ("MACE", {"interaction_tp": "gaunt"}),
    "mace_gaunt_product": ("MACE", {"product": "gaunt"}),
    "mace_so2_tp": ("MACE", {"interaction_tp": "so2"}),
    "escn": ("ESCN", {}),
    "tensornet": ("TensorNet", {}),
}


def default_mace_python() -> str:
    """mace-torch's interpreter: ``.venv-mace`` in the project root, else beside the project
    (where ``shared/`` lives; a git worktree), else the first path (reported as missing)."""
    for base in (ROOT, ROOT.parent):
        p = base / ".venv-mace" / "bin" / "python"
        if p.exists():
            return str(p)
    return str(ROOT / ".venv-mace" / "bin" / "python")


def shared_data() -> Path:
    return Path(os.environ.get("MLPOT_SHARED", ROOT.parent / "shared")) / "data"


def make_system(name: str):
    """The benchmark structures (ASE Atoms), deterministic."""
    from ase import Atoms
    from ase.build import bulk

    if name == "aspirin":
        path = shared_data() / "rmd17" / "rmd17_aspirin_train_01.npz"
        if path.exists():
            raw = np.load(path)
            return Atoms(numbers=raw["nuclear_charges"], positions=raw["coords"][0]), "rMD17 aspirin frame 0"
        from mlpot.testing.model_checks import random_molecule

        atoms = random_molecule([6] * 9 + [1] * 8 + [8] * 4, n=21, seed=0, radius=3.5, min_dist=1.0)
        atoms.numbers[:] = [6] * 9 + [1] * 8 + [8] * 4
        return atoms, "stand-in C9H8O4 (rMD17 not found)"
    if name == "si64":
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.01, seed=0)
        return atoms, "diamond Si 2x2x2 cubic"
    if name == "cu864":
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((6, 6, 6))
        atoms.rattle(0.01, seed=0)
        return atoms, "fcc Cu 6x6x6 cubic"
    raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def mlpot_config(variant: str, species: list[int]) -> tuple[str, dict]:
    name, extra = MODEL_VARIANTS[variant]
    if name == "ESCN":
        cfg = dict(ESCN_HYPER, atomic_numbers=species, seed=0)
    elif name == "TensorNet":
        cfg = dict(TENSORNET_HYPER, atomic_numbers=species, seed=0)
    else:
        cfg = dict(MACE_HYPER, atomic_numbers=species)
    cfg.update(extra)
    return name, cfg


def _time_calls(atoms, calc, repeats: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    base = atoms.get_positions()
    atoms.get_forces()  # warm-up (and first-call setup)
    times = []
    for _ in range(repeats):
        atoms.set_positions(base + 1e-3 * rng.standard_normal(base.shape))
        t0 = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mlpot_calculator(model, dtype: str):
    from mlpot.calculators import MLPotCalculator

    return MLPotCalculator(model, device="cpu", dtype=dtype), "MLPotCalculator"


def build_mlpot_model(variant: str, species: list[int], dtype: str):
    import torch

    from mlpot.models import build_model
    from mlpot.testing.model_checks import randomize_parameters

    name, cfg = mlpot_config(variant, species)
    torch.manual_seed(0)
    model = build_model(name, **cfg)
    randomize_parameters(model, seed=0, scale=0.05)
    return model.to(torch.float64 if dtype == "float64" else torch.float32).eval()


def run_mlpot(variant: str, atoms, dtype: str, repeats: int) -> tuple[float, str]:
    species = sorted(set(int(z) for z in atoms.numbers))
    model = build_mlpot_model(variant, species, dtype)
    calc, how = _mlpot_calculator(model, dtype)
    return _time_calls(atoms, calc, repeats), how


# Runs inside the mace-torch environment: reads a JSON job on stdin, prints JSON results.
_MACE_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np, torch
from ase.io import read
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator

job = json.loads(sys.stdin.read())
h = job["hyper"]
out = []
for sysname, path in job["systems"]:
    atoms0 = read(path)
    species = sorted(set(int(z) for z in atoms0.numbers))
    for dtype in job["dtypes"]:
        torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
        torch.manual_seed(0)
        model = modules.ScaleShiftMACE(
            r_max=h["r_max"], num_bessel=h["num_bessel"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
            max_ell=h["max_ell"], interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=h["num_interactions"], num_elements=len(species),
            hidden_irreps=o3.Irreps(h["hidden_irreps"]), MLP_irreps=o3.Irreps(h["MLP_irreps"]),
            atomic_energies=np.zeros(len(species)), avg_num_neighbors=h["avg_num_neighbors"],
            atomic_numbers=species, correlation=h["correlation"], gate=torch.nn.functional.silu,
            radial_MLP=h["radial_MLP"], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        )
        model = model.to(torch.float64 if dtype == "float64" else torch.float32)
        calc = MACECalculator(models=model, device="cpu", default_dtype=dtype)
        atoms = atoms0.copy(); atoms.calc = calc
        rng = np.random.default_rng(0); base = atoms.get_positions()
        atoms.get_forces()
        times = []
        for _ in range(job["repeats"]):
            atoms.set_positions(base + 1e-3 * rng.standard_normal(base.shape))
            t0 = time.perf_counter(); atoms.get_forces(); times.append(time.perf_counter() - t0)
        out.append({"system": sysname, "dtype": dtype, "seconds": statistics.median(times)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def run_mace_torch(python: str, systems: dict, dtypes: list[str], repeats: int, timeout: float) -> dict:
    """Time mace-torch in its own environment; returns ``{(system, dtype): seconds}``."""
    from ase.io import write

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, atoms in systems.items():
            p = Path(tmp) / f"{name}.extxyz"
            write(p, atoms, format="extxyz")
            paths.append((name, str(p)))
        job = json.dumps({"hyper": MACE_HYPER, "systems": paths, "dtypes": dtypes, "repeats": repeats})
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        proc = subprocess.run(
            [python, "-c", _MACE_SCRIPT], input=job, capture_output=True, text=True, env=env, timeout=timeout
        )
    if proc.returncode != 0:
        raise RuntimeError(f"mace-torch run failed:\n{proc.stderr[-3000:]}")
    return {(r["system"], r["dtype"]): r["seconds"] for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def profile(variant: str, system: str, dtype: str, top: int = 15) -> str:
    """Top ops by self CPU time in one mlpot force call (torch.profiler)."""
    import torch

    atoms, _ = make_system(system)
    species = sorted(set(int(z) for z in atoms.numbers))
    model = build_mlpot_model(variant, species, dtype)
    calc, _ = _mlpot_calculator(model, dtype)
    atoms.calc = calc
    atoms.get_forces()
    atoms.positions += 1e-3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        atoms.get_forces()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None) -> list[dict]:
    import sys

    if "--imported" in (sys.argv[1:] if argv is None else argv):  # issue 14: imported model, side by side
        return side_by_side_main(argv)
    parser = argparse.ArgumentParser(prog="mlpot bench model", description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="aspirin,si64,cu864")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--models", default="mace,mace_gaunt_tp,mace_gaunt_product,mace_so2_tp,escn",
                        help=f"comma list from {', '.join(MODEL_VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mace-python", default=str(ROOT / ".venv-mace" / "bin" / "python"))
    parser.add_argument("--no-mace-torch", action="store_true", help="skip the mace-torch side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: default)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="limit for the mace-torch subprocess (s)")
    parser.add_argument("--profile", metavar="SYSTEM", help="print the op profile of one mlpot force call")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    variants = [m.strip() for m in args.models.split(",") if m.strip()]
    for v in variants:
        if v not in MODEL_VARIANTS:
            raise SystemExit(f"unknown model {v!r}; choose from {', '.join(MODEL_VARIANTS)}")
    if args.profile:
        for dtype in dtypes:
            print(f"# profile: {variants[0]} on {args.profile}, {dtype}")
            print(profile(variants[0], args.profile, dtype))
        return []

    structures = {}
    for s in systems:
        structures[s], desc = make_system(s)
        print(f"# {s}: {len(structures[s])} atoms, {desc}", flush=True)
    mace_times: dict = {}
    if not args.no_mace_torch and any(MODEL_VARIANTS[v][0] == "MACE" for v in variants):
        if Path(args.mace_python).exists():
            print("# running mace-torch ...", flush=True)
            mace_times = run_mace_torch(args.mace_python, structures, dtypes, args.repeats, args.timeout)
        else:
            print(f"# mace-torch python not found at {args.mace_python}; skipping the comparison")

    rows = []
    print(f"{'system':8s} {'dtype':8s} {'model':20s} {'mlpot s':>9s} {'mace-torch s':>13s} {'ratio':>6s}")
    for s in systems:
        for dtype in dtypes:
            ref = mace_times.get((s, dtype))
            for v in variants:
                try:
                    t, how = run_mlpot(v, structures[s], dtype, args.repeats)
                except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the table
                    print(f"{s:8s} {dtype:8s} {v:20s} failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
                ratio = t / ref if ref and MODEL_VARIANTS[v][0] == "MACE" else None
                rows.append({"system": s, "atoms": len(structures[s]), "dtype": dtype, "model": v,
                             "mlpot_s": t, "mace_torch_s": ref, "ratio": ratio, "via": how})
                print(
                    f"{s:8s} {dtype:8s} {v:20s} {t:9.4f} {ref if ref else float('nan'):13.4f} "
                    f"{ratio if ratio else float('nan'):6.2f}",
                    flush=True,
                )
    if args.json:
        from mlpot.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# Imported model, side by side (issue 14, item 7): the same weights on both sides, the calls
# interleaved round by round, threads and a competing CPU-bound process as table columns.
# ---------------------------------------------------------------------------------------------
SIDE_BY_SIDE_SYSTEMS = ("aspirin", "si64", "cu256", "cu864")

# The mace-torch worker: a long-lived subprocess in mace-torch's environment. It reads one JSON
# command per line on stdin and answers one JSON line on stdout:
#   {"cmd": "build", "species": [...], "seed": 0, "export_dir": DIR, "hyper": {...}}
#       builds a ScaleShiftMACE with random weights (torch.manual_seed(seed), float64) and writes
#       it with scripts/export_mace.py's export() so mlpot imports the very same weights;
#   {"cmd": "call", "key": K, "dtype": D, "threads": T, "numbers": [...], "positions": [...],
#    "cell": [...], "pbc": [...], "calls": k}  ->  {"seconds": [s, ...], "energy": e}
#       k (default 1) timed atoms.get_forces() back to back through MACECalculator (its calculator
#       per (key, dtype) is made on first use, outside the timing); call c on the positions moved
#       by c * 1e-4 A along x; the energy of the given positions.
_MACE_WORKER = r"""
import copy, json, os, sys, time
reply, sys.stdout = sys.stdout, sys.stderr  # only protocol lines on stdout; mace-torch's prints go to stderr
if os.environ.get("MLPOT_BENCH_MALLOPT"):  # --mace-tuned-malloc: mlpot's tune_malloc settings, same call
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    for pair in os.environ["MLPOT_BENCH_MALLOPT"].split(","):
        param, value = (int(v) for v in pair.split(":"))
        if libc.mallopt(param, value) != 1:
            raise SystemExit(f"mallopt({param}, {value}) refused")
import numpy as np, torch
from ase import Atoms
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator

sys.path.insert(0, sys.argv[1])
from export_mace import export
import atexit, gc
gc.freeze(); atexit.register(gc.unfreeze)  # as mlpot's side (mlpot.runtime.freeze_gc): no full collection inside a timed call

masters, calcs = {}, {}
for line in sys.stdin:
    job = json.loads(line)
    if job["cmd"] == "build":
        h, species = job["hyper"], job["species"]
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(job["seed"])
        cls = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=h["r_max"], num_bessel=h["num_bessel"], num_polynomial_cutoff=h["num_polynomial_cutoff"],
            max_ell=h["max_ell"], interaction_cls=cls, interaction_cls_first=cls,
            num_interactions=h["num_interactions"], num_elements=len(species),
            hidden_irreps=o3.Irreps(h["hidden_irreps"]), MLP_irreps=o3.Irreps(h["MLP_irreps"]),
            atomic_energies=np.zeros(len(species)), avg_num_neighbors=h["avg_num_neighbors"],
            atomic_numbers=species, correlation=h["correlation"], gate=torch.nn.functional.silu,
            radial_MLP=h["radial_MLP"], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        ).double()
        export(model, job["export_dir"])
        masters[job["key"]] = model
        print(json.dumps({"ok": True}), file=reply, flush=True)
    elif job["cmd"] == "call":
        torch.set_num_threads(job["threads"])
        k = (job["key"], job["dtype"])
        if k not in calcs:
            calcs[k] = MACECalculator(models=copy.deepcopy(masters[job["key"]]), device="cpu",
                                      default_dtype=job["dtype"])
        atoms = Atoms(numbers=job["numbers"], positions=job["positions"], cell=job["cell"], pbc=job["pbc"])
        atoms.calc = calcs[k]
        times = []
        for c in range(job.get("calls", 1)):  # back to back, each on the structure moved by c * 1e-4 A along x
            atoms.positions = np.asarray(job["positions"]) + [c * 1e-4, 0.0, 0.0]
            t0 = time.perf_counter()
            atoms.get_forces()
            times.append(time.perf_counter() - t0)
        atoms.positions = np.asarray(job["positions"])
        print(json.dumps({"seconds": times, "energy": float(atoms.get_potential_energy())}), file=reply, flush=True)
    else:
        print(json.dumps({"error": "unknown command " + str(job["cmd"])}), file=reply, flush=True)
"""


def omp_setting(env) -> str:
    """The OpenMP wait setting of an environment, as text."""
    return ", ".join(f"{k}={env[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in env) or "default"


def mace_env(passive_waits: bool = False, tuned_malloc: bool = False) -> dict:
    """The environment of the mace-torch worker: the one the benchmark was started with (mlpot's
    own entry-point default removed), with ``OMP_WAIT_POLICY=PASSIVE`` on request and mlpot's
    allocator settings on request."""
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    env.pop("MLPOT_BENCH_MALLOPT", None)
    if tuned_malloc:
        from mlpot.runtime import MALLOC_OPTIONS

        env["MLPOT_BENCH_MALLOPT"] = ",".join(f"{p}:{v}" for p, v in MALLOC_OPTIONS)
    if env.pop("MLPOT_OMP_WAIT_SET", None):  # mlpot's entry-point default (mlpot/threads.py), not the user's
        env.pop("GOMP_SPINCOUNT", None)
    if passive_waits:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.pop("GOMP_SPINCOUNT", None)  # GNU OpenMP lets a spin count override PASSIVE
    return env


class MaceTorchWorker:
    """The mace-torch side of :func:`side_by_side`: one subprocess for the whole run."""

    def __init__(self, python: str, passive_waits: bool = False, tuned_malloc: bool = False):
        env = mace_env(passive_waits, tuned_malloc)
        self.malloc = "tuned" if tuned_malloc else "glibc default"
        self.omp_wait_policy = omp_setting(env)
        self.proc = subprocess.Popen(
            [python, "-c", _MACE_WORKER, str(ROOT / "scripts")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )

    def ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the mace-torch worker died (exit code {self.proc.poll()})")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"mace-torch worker: unexpected reply {line[:300]!r}") from None
        if "error" in reply:
            raise RuntimeError(f"mace-torch worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BusyProcess:
    """``n`` CPU-bound child processes (a pure-Python spin loop) for the time of a ``with`` block:
    the "second CPU-bound process running" condition. Each child is ended by its own pid."""

    def __init__(self, n: int):
        self.n = int(n)
        self.procs: list = []

    def __enter__(self):
        import sys

        self.procs = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(self.n)]
        time.sleep(0.5 if self.n else 0.0)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()
        return False


def make_side_by_side_system(name: str):
    """:func:`make_system` plus fcc Cu 4x4x4 (256 atoms)."""
    if name == "cu256":
        from ase.build import bulk

        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
        atoms.rattle(0.01, seed=0)
        return atoms, "fcc Cu 4x4x4 cubic"
    return make_system(name)


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def side_by_side(systems, dtypes, threads, loads, repeats: int, mace_python: str, log=print,
                 mace_passive_waits: bool = False, mace_tuned_malloc: bool = False, calls: int = 1) -> list[dict]:
    """Force-call time of an imported mace-torch model against mace-torch itself.

    For every system the mace-torch worker builds a random-weight ``ScaleShiftMACE``
    (:data:`MACE_HYPER`, seed 0) and exports it; mlpot imports the export
    (:func:`mlpot.models.mace_import.import_mace`), so both sides hold the same weights (the
    first call's energies are compared and reported). Then for every dtype, thread count and
    number of competing busy processes: one untimed call on each side, and ``repeats`` rounds
    of one call each on the same rattled positions, the order alternating per round (mlpot
    first in even rounds). Reported: median, min and max of each side's calls, the ratio of
    the medians, and the median of the per-round ratios (robust when the load drifts).
    """
    import copy

    import torch

    from mlpot.calculators import MLPotCalculator
    from mlpot.models.mace_import import import_mace

    worker = MaceTorchWorker(mace_python, passive_waits=mace_passive_waits, tuned_malloc=mace_tuned_malloc)
    log(f"# OpenMP wait: mlpot {omp_setting(os.environ)}, mace-torch {worker.omp_wait_policy}; "
        f"mace-torch allocator: {worker.malloc}")
    rows = []
    try:
        for s in systems:
            atoms, desc = make_side_by_side_system(s)
            species = sorted(set(int(z) for z in atoms.numbers))
            with tempfile.TemporaryDirectory() as tmp:
                worker.ask({"cmd": "build", "key": s, "species": species, "seed": 0, "export_dir": tmp,
                            "hyper": MACE_HYPER})
                master = import_mace(tmp)
            log(f"# {s}: {len(atoms)} atoms, {desc}; imported model with {sum(p.numel() for p in master.parameters())} "
                "parameters")
            rng = np.random.default_rng(0)
            base = atoms.get_positions()
            for dtype in dtypes:
                calc = MLPotCalculator(copy.deepcopy(master), device="cpu", dtype=dtype)
                for nthreads in threads:
                    for i, load in enumerate(loads):
                        with BusyProcess(load):
                            rows.append(_one_condition(atoms, base, rng, s, dtype, nthreads, load, repeats, calc,
                                                       worker, torch, warm_up=i == 0, calls=calls))
                        if i:
                            rows[-1]["energy_diff_per_atom"] = rows[-2]["energy_diff_per_atom"]
                            rows[-1]["energy"] = rows[-2]["energy"]
                        log(_format_side_row(rows[-1]))
    finally:
        worker.close()
    return rows


def imported_model(system: str, mace_python: str):
    """``(atoms, mlpot model)``: mace-torch's random-weight model for ``system``, imported."""
    from mlpot.models.mace_import import import_mace

    atoms, _ = make_side_by_side_system(system)
    worker = MaceTorchWorker(mace_python)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            worker.ask({"cmd": "build", "key": system, "species": sorted(set(int(z) for z in atoms.numbers)),
                        "seed": 0, "export_dir": tmp, "hyper": MACE_HYPER})
            model = import_mace(tmp)
    finally:
        worker.close()
    return atoms, model


def profile_imported(system: str, dtype: str, threads: int, mace_python: str, top: int = 25) -> str:
    """Top ops by self CPU time in one force call of the imported model (after two warm-up calls)."""
    import torch

    from mlpot.calculators import MLPotCalculator

    torch.set_num_threads(threads)
    atoms, model = imported_model(system, mace_python)
    atoms.calc = MLPotCalculator(model, device="cpu", dtype=dtype)
    for _ in range(2):
        atoms.positions += 1e-3
        atoms.get_forces()
    atoms.positions += 1e-3
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        atoms.get_forces()
    wall = time.perf_counter() - t0
    head = f"# profile: imported MACE on {system} ({len(atoms)} atoms), {dtype}, {threads} thread(s); wall {wall:.3f} s\n"
    return head + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def _round_time(times: list[float]) -> float:
    """One round's time: its only call, or the median of the back-to-back calls after the first."""
    return times[0] if len(times) == 1 else statistics.median(times[1:])


def _one_condition(atoms, base, rng, s, dtype, nthreads, load, repeats, calc, worker, torch, warm_up=True,
                   calls: int = 1) -> dict:
    torch.set_num_threads(nthreads)
    job = {"cmd": "call", "key": s, "dtype": dtype, "threads": nthreads, "numbers": atoms.numbers.tolist(),
           "cell": atoms.cell.array.tolist(), "pbc": atoms.pbc.tolist()}
    work = atoms.copy()
    work.calc = calc

    def ours(pos, k=calls):
        times = []
        for c in range(k):  # the worker's protocol: call c on the positions moved by c * 1e-4 A along x
            work.set_positions(pos + [c * 1e-4, 0.0, 0.0])
            t0 = time.perf_counter()
            work.get_forces()
            times.append(time.perf_counter() - t0)
        work.set_positions(pos)
        return _round_time(times), float(work.get_potential_energy())

    def theirs(pos, k=calls):
        r = worker.ask(dict(job, positions=pos.tolist(), calls=k))
        return _round_time(r["seconds"]), r["energy"]

    e_ours = e_theirs = float("nan")
    if warm_up:  # untimed first call on each side (new thread count), and the energy check on identical positions
        _, e_ours = ours(base, 1)
        _, e_theirs = theirs(base, 1)
    t_ours, t_theirs = [], []
    for r in range(repeats):
        pos = base + 1e-3 * rng.standard_normal(base.shape)
        if r % 2 == 0:
            t_ours.append(ours(pos)[0])
            t_theirs.append(theirs(pos)[0])
        else:
            t_theirs.append(theirs(pos)[0])
            t_ours.append(ours(pos)[0])
    m_ours, m_theirs = _spread(t_ours), _spread(t_theirs)
    return {
        "system": s, "atoms": len(atoms), "dtype": dtype, "threads": nthreads, "busy_processes": load,
        "repeats": repeats, "calls_per_round": calls, "mlpot_s": m_ours, "mace_torch_s": m_theirs, "ratio": m_ours[0] / m_theirs[0],
        "paired_ratio": statistics.median(a / b for a, b in zip(t_ours, t_theirs)),
        "energy_diff_per_atom": abs(e_ours - e_theirs) / len(atoms), "energy": e_theirs,
    }


def _format_side_row(r: dict) -> str:
    def cell(m):
        return f"{m[0]:.4g} ({m[1]:.4g}-{m[2]:.4g})"

    return (f"| {r['system']} ({r['atoms']}) | {r['dtype']} | {r['threads']} | {r['busy_processes']} | "
            f"{cell(r['mlpot_s'])} | {cell(r['mace_torch_s'])} | {r['ratio']:.2f} | {r['paired_ratio']:.2f} | "
            f"{r['energy_diff_per_atom']:.1e} (E {r['energy']:.4g}) |")


TABLE_HEAD = ("| system (atoms) | dtype | threads | busy procs | mlpot s | mace-torch s | ratio of medians "
              "| median paired ratio | abs dE/atom (eV) |\n| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")


def load_summary(rows: list[dict]) -> list[str]:
    """Markdown lines: each side's slowdown with competing processes (median loaded / median idle)."""
    idle = {(r["system"], r["dtype"], r["threads"]): r for r in rows if r["busy_processes"] == 0}
    out = ["| system | dtype | threads | busy procs | mlpot slowdown | mace-torch slowdown | ratio idle -> loaded |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        base = idle.get((r["system"], r["dtype"], r["threads"]))
        if r["busy_processes"] == 0 or base is None:
            continue
        out.append(f"| {r['system']} | {r['dtype']} | {r['threads']} | {r['busy_processes']} | "
                   f"{r['mlpot_s'][0] / base['mlpot_s'][0]:.2f}x | {r['mace_torch_s'][0] / base['mace_torch_s'][0]:.2f}x | "
                   f"{base['ratio']:.2f} -> {r['ratio']:.2f} |")
    return out


def _malloc_tuned() -> bool:
    import mlpot.runtime as runtime

    return bool(runtime._MALLOC_TUNED)


def side_by_side_main(argv=None) -> list[dict]:
    """The issue-14 matrix in one command: every system x dtype x thread count x load, side by side.

    Defaults give the whole matrix (aspirin, Si64, Cu256, Cu864; float64, float32; 1 and 2
    threads; idle and one competing CPU-bound process) with 3 interleaved rounds per row, sized
    to finish in about 12 minutes on an idle 2-core CPU; ``--markdown PATH`` writes the tables.
    """
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="mlpot bench model --imported",
        description="force call of an imported mace-torch model against mace-torch, side by side")
    parser.add_argument("--imported", action="store_true", required=True)
    parser.add_argument("--systems", default=",".join(SIDE_BY_SIDE_SYSTEMS))
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts (both sides)")
    parser.add_argument("--busy", default="0,1", help="comma list: competing CPU-bound processes started")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (median, min-max)")
    parser.add_argument("--mace-python", default=default_mace_python())
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables (markdown) to PATH")
    parser.add_argument("--mace-passive-waits", action="store_true",
                        help="run mace-torch with OMP_WAIT_POLICY=PASSIVE (default: the environment the "
                        "benchmark was started with; mlpot's entry points bound the spin, mlpot/threads.py)")
    parser.add_argument("--calls-per-round", type=int, default=1, metavar="K",
                        help="each side makes K force calls back to back per round; a round's time is the median "
                        "of calls 2..K (steady state, as in MD), K=1: the single call right after the other side's")
    parser.add_argument("--mace-tuned-malloc", action="store_true",
                        help="give mace-torch's process mlpot's allocator settings too (mlpot.runtime.tune_malloc, "
                        "which this benchmark applies to its own process as the mlpot command does)")
    parser.add_argument("--profile", metavar="SYSTEM", help="torch.profiler table of one imported-model force call "
                        "(first dtype and thread count of the lists)")
    args = parser.parse_args(argv)
    if not Path(args.mace_python).exists():
        raise SystemExit(f"mace-torch python not found at {args.mace_python} (--mace-python)")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.calls_per_round < 1:
        raise SystemExit(f"--calls-per-round must be at least 1, got {args.calls_per_round}")
    if args.profile:
        print(profile_imported(args.profile, args.dtypes.split(",")[0], int(args.threads.split(",")[0]),
                               args.mace_python))
        return []
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SIDE_BY_SIDE_SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {', '.join(SIDE_BY_SIDE_SYSTEMS)}")
    import torch

    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MLPOT_CALL_THREADS") if k in os.environ}
    env["OpenMP wait"] = (f"mlpot {omp_setting(os.environ)}, "
                          f"mace-torch {omp_setting(mace_env(args.mace_passive_waits))}")
    env["malloc"] = f"mlpot {'tuned' if _malloc_tuned() else 'glibc default'}, mace-torch " + (
        "tuned" if args.mace_tuned_malloc else "glibc default")
    head = (f"# {os.cpu_count()} CPUs; torch {torch.__version__}; env {env}; load average at start "
            f"{os.getloadavg()[0]:.1f}; {args.repeats} interleaved rounds per row, {args.calls_per_round} call(s) per side "
            "per round; times: median (min-max) s")
    print(head)
    print(TABLE_HEAD)
    rows = side_by_side(systems, [d for d in args.dtypes.split(",") if d],
                        [int(t) for t in args.threads.split(",") if t], [int(b) for b in args.busy.split(",") if b],
                        args.repeats, args.mace_python, log=lambda m: print(m, flush=True),
                        mace_passive_waits=args.mace_passive_waits, mace_tuned_malloc=args.mace_tuned_malloc,
                        calls=args.calls_per_round)
    summary = load_summary(rows)
    total = time.perf_counter() - t_start
    tail = f"# load average at end {os.getloadavg()[0]:.1f}; total time {total:.0f} s"
    print("\n".join(["", "# slowdown with competing processes (loaded / idle, medians)"] + summary + [tail]))
    if args.json:
        from mlpot.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    if args.markdown:
        from mlpot.fileio import atomic_write_text

        lines = [head, "", TABLE_HEAD] + [_format_side_row(r) for r in rows] + ["", *summary, "", tail]
        atomic_write_text(args.markdown, "\n".join(lines) + "\n")
    return rows
