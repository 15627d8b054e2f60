"""Model force-call time against mace-torch. See mlpot/bench/model.py for options.

``python scripts/bench_model.py cuda ...``: MACE per-step time and peak memory on a GPU, fcc Cu
from 1k atoms to the largest that fits (mlpot/bench/model_cuda.py; needs no ASE).
"""
import sys

from mlpot.threads import bounded_openmp_spin

bounded_openmp_spin()  # before torch loads, as the `mlpot` command does (mlpot/threads.py)

from mlpot.bench.model import main  # noqa: E402
from mlpot.runtime import freeze_gc, tune_malloc  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:2] == ["cuda"]:  # the GPU scaling benchmark (scripts/gpu_check.sh step 4)
        from mlpot.bench.model_cuda import main as main_cuda

        main_cuda(sys.argv[2:])
        sys.exit(0)
    tune_malloc()  # the allocator setting the `mlpot` command applies (process-wide: entry points only)
    freeze_gc()  # as the `mlpot` command (the mace-torch worker freezes its own startup objects too)
    main()
