"""S2-grid transforms of a Gaunt product: Legendre + FFT against dense matrices.

    python scripts/bench_s2_transforms.py [--lmax 2 3 4 6 8 10] [--batch 64000] [--repeats 3] [--threads 2]

For each L, the product of two degree-L coefficient vectors projected back to degree L
(``mlpot.o3.gaunt.grid_product`` on ``product_grid("grid", [L, L], L, impl=...)``), forward and
backward (``sum().backward()``), float64, ``--batch`` products at once. Both implementations are
timed alternately ``--repeats`` times after one warm-up; prints the median seconds, the spread
(min-max) and the median FFT/dense ratio, and the grid size (theta x phi). This is the table that
``mlpot.o3.gaunt.DENSE_GRID_MAX_POINTS`` (dense matrices up to 512 grid points) rests on.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlpot.o3.gaunt import grid_product, product_grid
from mlpot.o3.s2grid import s2_grid_size


def time_pair(grid, L: int, batch: int) -> float:
    D = (L + 1) ** 2
    a = torch.randn(D, batch, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, batch, dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    grid_product(grid, a, b, L).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmax", type=int, nargs="+", default=[2, 3, 4, 6, 8, 10])
    ap.add_argument("--batch", type=int, default=64000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, float64, {args.threads} threads, {args.repeats} alternating repeats (median, min-max)")
    print("| L | grid (theta x phi) | points | Legendre + FFT (s) | dense matrix (s) | FFT / dense |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for L in args.lmax:
        grids = {impl: product_grid("grid", [L, L], L, impl=impl).double() for impl in ("fft", "matrix")}
        for g in grids.values():
            time_pair(g, L, min(args.batch, 1000))  # warm-up (caches, allocator)
        t = {impl: [] for impl in grids}
        for _ in range(args.repeats):
            for impl, g in grids.items():
                t[impl].append(time_pair(g, L, args.batch))
        nt, nphi = s2_grid_size([L, L], L)
        ratio = [f / m for f, m in zip(t["fft"], t["matrix"])]

        def cell(x):
            return f"{statistics.median(x):.3f} ({min(x):.3f}-{max(x):.3f})"

        print(f"| {L} | {nt} x {nphi} | {nt * nphi} | {cell(t['fft'])} | {cell(t['matrix'])} | "
              f"{statistics.median(ratio):.1f} ({min(ratio):.1f}-{max(ratio):.1f}) |", flush=True)


if __name__ == "__main__":
    main()
