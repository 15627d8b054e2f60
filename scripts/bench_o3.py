"""Scaling of CG / Gaunt / SO(2) edge products with L. See mlpot/bench/o3.py for options."""
from mlpot.bench.o3 import main

if __name__ == "__main__":
    main()
