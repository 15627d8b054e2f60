"""MD throughput (atoms·steps/s, ns/day) against mace-torch. See mlpot/bench/md.py for options."""
from mlpot.bench.md import main

if __name__ == "__main__":
    main()
