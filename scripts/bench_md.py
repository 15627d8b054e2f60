"""MD throughput (atoms·steps/s, ns/day) against mace-torch. See mlpot/bench/md.py for options."""
from mlpot.threads import bounded_openmp_spin

bounded_openmp_spin()  # before torch loads, as the `mlpot` command and scripts/bench_model.py do

from mlpot.bench.md import main  # noqa: E402
from mlpot.runtime import freeze_gc, tune_malloc  # noqa: E402

if __name__ == "__main__":
    tune_malloc()  # the allocator setting of `mlpot` and scripts/bench_model.py (process-wide: entry points only)
    freeze_gc()
    main()
