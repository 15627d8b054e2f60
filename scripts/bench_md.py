"""MD throughput (atoms·steps/s, ns/day) against mace-torch. See mlpot/bench/md.py for options."""
from mlpot.bench.md import main
from mlpot.models.mace import tune_malloc

if __name__ == "__main__":
    tune_malloc()  # the allocator setting of `mlpot` and scripts/bench_model.py (process-wide: entry points only)
    main()
