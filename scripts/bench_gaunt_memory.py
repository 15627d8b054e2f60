"""Peak memory of a MACE Gaunt-TP force call against the edge-chunk size.

    python scripts/bench_gaunt_memory.py [--system si64] [--chunks 20 22 24 26] [--dtype float64]

The Gaunt interaction processes edges in chunks of ``GauntMessageTP.max_chunk_values`` grid
values (default 2^24). For each ``--chunks`` exponent k (chunk = 2^k values), a fresh Python
process builds the benchmark MACE with ``interaction_tp: gaunt`` (hyperparameters of
``mlpot bench model``, random weights), runs one force call on ``--system`` (``si64``,
``aspirin`` or ``cu864``; cu864 needs several GB) and reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the call time, so every number comes from
its own process. Also prints the baseline: the same process without the force call.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from mlpot.bench.model import make_system, mlpot_config
from mlpot.calculators import MLPotCalculator
from mlpot.models import build_model
from mlpot.o3.gaunt import GauntMessageTP
system, dtype, k, call = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(1)
atoms, _ = make_system(system)
name, cfg = mlpot_config("mace_gaunt_tp", sorted(set(int(z) for z in atoms.numbers)))
GauntMessageTP.max_chunk_values = 2 ** k
torch.manual_seed(0)
model = build_model(name, **cfg)
atoms.calc = MLPotCalculator(model, device="cpu", dtype=dtype)
t = 0.0
if call:
    t0 = time.perf_counter(); atoms.get_forces(); t = time.perf_counter() - t0
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "time_s": t}))
"""


def run(system, dtype, k, call) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, system, dtype, str(k), "1" if call else "0"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default="si64")
    ap.add_argument("--chunks", type=int, nargs="+", default=[20, 22, 24, 26])
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args()
    base = run(args.system, args.dtype, args.chunks[0], False)
    print(f"{args.system}, {args.dtype}, 1 thread; process without a force call: {base['peak_mb']:.0f} MB")
    print("| chunk (grid values) | peak RSS (MB) | force call (s) |")
    print("| --- | ---: | ---: |")
    for k in args.chunks:
        r = run(args.system, args.dtype, k, True)
        print(f"| 2^{k} | {r['peak_mb']:.0f} | {r['time_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
