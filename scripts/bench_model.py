"""Model force-call time against mace-torch. See mlpot/bench/model.py for options."""
from mlpot.bench.model import main

if __name__ == "__main__":
    main()
