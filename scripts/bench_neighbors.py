"""Neighbor-list throughput against ASE, matscipy and vesin. See mlpot/bench/neighbors.py for options."""
from mlpot.bench.neighbors import main

if __name__ == "__main__":
    main()
