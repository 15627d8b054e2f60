"""``mlpot bench kernels|model|neighbors|o3|md|relax|train|aot [args...]``: run one benchmark module.

Each benchmark lives in ``mlpot.bench.<name>`` and exposes ``main(argv)``; everything after the
benchmark name is passed to it unchanged (``mlpot bench kernels --help`` shows its options).
A ``main`` that returns an int sets the exit status (``aot`` fails on a spill or a failed compile).
"""
from __future__ import annotations

import argparse
import importlib

from mlpot.errors import ConfigError

BENCHMARKS = {
    "kernels": "Triton kernels against e3nn / torch references",
    "model": "model force-call time against mace-torch",
    "neighbors": "neighbor-list construction",
    "o3": "equivariant products: scaling with L",
    "md": "molecular-dynamics throughput",
    "relax": "batched FIRE against the per-structure ASE loop",
    "train": "learning speed of MACE variants, ESCN, EquiformerV2 and Facet on rMD17",
    "aot": "ahead-of-time compile of the models' Triton kernels for sm_80/sm_90: registers, spills",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def run(args) -> int:
    name = args.benchmark
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark {name!r} is not available; choose one of {', '.join(sorted(BENCHMARKS))}")
    module = f"mlpot.bench.{name}"
    mod = importlib.import_module(module)
    if not hasattr(mod, "main"):
        raise ConfigError(f"benchmark module {module} has no main(argv)")
    status = mod.main(list(args.bench_args))
    return status if isinstance(status, int) else 0
