"""Triton kernel microbenchmarks; see ``mlpot.bench.kernels`` (``python scripts/bench_kernels.py --help``)."""
import sys

from mlpot.bench.kernels import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
