"""Training benchmarks on rMD17.

    python scripts/bench_train.py [options]             learning speed of the MACE tensor-product
                                                        variants (see mlpot/bench/train.py)
    python scripts/bench_train.py --vs-mace [options]   the same MACE trained by mlpot and by
                                                        mace-torch's mace_run_train, side by side
                                                        (see mlpot/bench/train_vs_mace.py)
"""
import sys

if __name__ == "__main__":
    if "--vs-mace" in sys.argv[1:]:
        from mlpot.bench.train_vs_mace import main
    else:
        from mlpot.bench.train import main
    main()
