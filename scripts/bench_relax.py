"""Batched FIRE against the per-structure ASE loop (structures/s). See mlpot/bench/relax.py."""
from mlpot.bench.relax import main

if __name__ == "__main__":
    main()
