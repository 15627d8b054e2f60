"""Model force-call time against mace-torch. See mlpot/bench/model.py for options."""
from mlpot.bench.model import main
from mlpot.models.mace import tune_malloc

if __name__ == "__main__":
    tune_malloc()  # the allocator setting the `mlpot` command applies (process-wide: entry points only)
    main()
