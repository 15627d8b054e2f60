"""Cost MODEL of the Triton kernels at MACE sizes (bytes, FLOPs, H100/H200 floors): see
mlpot/bench/kernel_cost.py.  ``python scripts/kernel_cost.py [--dtype fp64] [--json out.json]``"""
import sys

from mlpot.bench.kernel_cost import main

if __name__ == "__main__":
    main(sys.argv[1:])
