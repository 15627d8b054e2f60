"""Neighbor-list throughput: mlpot (torch cell list and default dispatch) vs ASE, matscipy, vesin.

System: fcc Cu supercells (a = 3.61 Å, cubic 4-atom cell repeated n x n x n, atoms rattled by
0.01 Å), fully periodic, cutoff 5 Å (full list). Reported: best-of-``--repeat`` wall time and
atoms per second; every method's pair count is checked against the first method's.

    python scripts/bench_neighbors.py                      # 256 ... ~100k atoms on CPU
    python scripts/bench_neighbors.py --sizes 4 10 --device cuda
    python scripts/bench_neighbors.py --max-ase-atoms 10000 --markdown
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

DEFAULT_REPS = (4, 7, 10, 15, 20, 30)  # 256, 1372, 4000, 13500, 32000, 108000 atoms


def _system(n: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((n, n, n))
    atoms.rattle(0.01, seed=0)
    return atoms


def _methods(device: str):
    from mlpot.data.neighbors import neighbor_list

    def ours_torch(atoms, rc):
        pos = torch.as_tensor(atoms.positions, device=device)
        cell = torch.as_tensor(atoms.cell.array, device=device)
        out = neighbor_list(pos, rc, cell, atoms.pbc, backend="torch")
        if device == "cuda":
            torch.cuda.synchronize()
        return len(out[0])

    def ours_dispatch(atoms, rc):
        out = neighbor_list(atoms.positions, rc, atoms.cell.array, atoms.pbc)
        return len(out[0])

    def ase_nl(atoms, rc):
        from ase.neighborlist import neighbor_list as f

        return len(f("ijS", atoms, rc)[0])

    def matscipy_nl(atoms, rc):
        from matscipy.neighbours import neighbour_list as f

        return len(f("ijS", atoms, rc)[0])

    def vesin_nl(atoms, rc):
        from vesin import NeighborList

        i, _, _ = NeighborList(cutoff=rc, full_list=True).compute(
            atoms.positions, atoms.cell.array, True, quantities="ijS"
        )
        return len(i)

    methods = {f"mlpot torch ({device})": ours_torch}
    if device == "cpu":
        methods["mlpot dispatch (cpu)"] = ours_dispatch
        methods["vesin"] = vesin_nl
        methods["matscipy"] = matscipy_nl
        methods["ase"] = ase_nl
    return methods


def _time(fn, atoms, rc, repeat):
    n = fn(atoms, rc)  # warm-up (and the pair count)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(atoms, rc)
        best = min(best, time.perf_counter() - t0)
    return best, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_REPS), help="supercell repeats n (4 n^3 atoms)")
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-ase-atoms", type=int, default=15000, help="skip ASE above this many atoms (slow)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but not available")
    methods = _methods(args.device)
    rows = []
    for n in args.sizes:
        atoms = _system(n)
        row = {"atoms": len(atoms)}
        ref = None
        for name, fn in methods.items():
            if name == "ase" and len(atoms) > args.max_ase_atoms:
                row[name] = None
                continue
            t, pairs = _time(fn, atoms, args.cutoff, args.repeat)
            if ref is None:
                ref = pairs
            elif pairs != ref:
                raise RuntimeError(f"{name}: {pairs} pairs, expected {ref} ({len(atoms)} atoms)")
            row[name] = t
        row["pairs"] = ref
        rows.append(row)
        print(
            f"{len(atoms):>7} atoms  {ref:>9} pairs  "
            + "  ".join(f"{k}: {'skipped' if v is None else f'{v * 1e3:.1f} ms'}" for k, v in row.items() if k not in ("atoms", "pairs")),
            flush=True,
        )
    names = list(methods)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, torch threads {torch.get_num_threads()}, "
          f"cutoff {args.cutoff} Å, best of {args.repeat}")
    header = "| atoms | pairs | " + " | ".join(f"{n} (Matoms/s)" for n in names) + " |"
    if args.markdown:
        print(header)
        print("|" + "---|" * (len(names) + 2))
    for row in rows:
        cells = []
        for n in names:
            v = row.get(n)
            cells.append("skipped" if v is None else f"{row['atoms'] / v / 1e6:.3f} ({v * 1e3:.1f} ms)")
        line = f"| {row['atoms']} | {row['pairs']} | " + " | ".join(cells) + " |"
        print(line if args.markdown else line.replace("|", " "))
    return rows


if __name__ == "__main__":
    main()
