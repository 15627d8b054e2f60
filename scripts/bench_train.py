"""Learning speed of the MACE tensor-product variants on rMD17. See mlpot/bench/train.py for options."""
from mlpot.bench.train import main

if __name__ == "__main__":
    main()
