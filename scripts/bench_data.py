"""Random access and training throughput of mlpot's on-disk dataset formats: LMDB (the
default, :mod:`mlpot.data.lmdb_store`) against HDF5 (:mod:`mlpot.data.hdf5`).

    python scripts/bench_data.py [--frames 20000] [--reads 3000] [--repeats 3] [--atoms 8]

Writes ``--frames`` periodic frames (``--atoms`` atoms each, neighbor lists stored for 4 Å)
once in each format (:func:`mlpot.data.write_dataset`), then reads ``--reads`` frames in a
random order from each through :class:`mlpot.data.LazyDataset`, ``--repeats`` times,
interleaved (HDF5, LMDB, HDF5, ...), both as checked arrays (``LazyDataset.frame``) and as
model-ready graphs (``LazyDataset[k]``). Prints frames/s per repeat, the median and the spread
(min-max), the LMDB/HDF5 ratio and both file sizes. The page cache is warm after writing (what
a training epoch after the first sees).

    python scripts/bench_data.py --training [--repeats 3] [--epochs 2] [--workers 0] [--set KEY=VALUE ...]

Training throughput instead: the quickstart config (MACE 16x0e+16x1o on the built-in EMT Cu-Ni
data, 150 training cells) trained ``--epochs`` epochs from the extxyz file in memory and from the
same frames converted to HDF5 and to LMDB (``mlpot data convert --cutoff 5``; lazy,
``--workers`` DataLoader workers), alternating, ``--repeats`` times each; frames/s = training
frames / mean epoch time from ``log.csv`` (the ``time`` column: training plus validation of the
epoch). Prints each source's median and spread and the lazy / in-memory ratios (median and
spread over the repeats, each ratio from one side-by-side round). ``--set`` pairs go to every
training run (e.g. a smaller model, where reading frames weighs more in a step).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def frames(n: int, n_atoms: int, seed: int = 0):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    for _ in range(n):
        a = Atoms(numbers=rng.choice([28, 29], n_atoms), positions=rng.uniform(0, 5.0, (n_atoms, 3)),
                  cell=np.eye(3) * 5.0, pbc=True)
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(n_atoms, 3)),
                                       stress=rng.normal(size=6))
        yield a


def training(args) -> None:
    import csv
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlpot = [sys.executable, "-m", "mlpot.cli.main"]
        base = ["--set", "training.progress=false", f"training.epochs={args.epochs}", "training.time_limit=null",
                f"training.num_workers={args.workers}", *args.set]
        subprocess.run(mlpot + ["train", str(repo / "configs/quickstart.yaml"), "--set", f"output={tmp / 'gen'}",
                                "training.epochs=1", "training.progress=false"], check=True, capture_output=True)
        data = tmp / "gen" / "data"
        for fmt in ("h5", "lmdb"):
            subprocess.run(mlpot + ["data", "convert", str(data / "train.xyz"), str(tmp / f"train.{fmt}"), "--cutoff",
                                    "5.0"], check=True, capture_output=True)
        sources = {"in-memory (extxyz)": str(data / "train.xyz"), "lazy (HDF5)": str(tmp / "train.h5"),
                   "lazy (LMDB)": str(tmp / "train.lmdb")}
        rates = {k: [] for k in sources}
        for r in range(args.repeats):
            for name, train in sources.items():
                out = tmp / f"run{r}-{name.split('(')[1][:-1]}"
                subprocess.run(mlpot + ["train", str(repo / "configs/quickstart.yaml"), *base,
                                        f"output={out}", "data.synthetic=null", f"data.train={train}",
                                        f"data.valid={data / 'valid.xyz'}", f"data.test={data / 'test.xyz'}"],
                               check=True, capture_output=True)
                rows = list(csv.DictReader(open(out / "log.csv")))
                n_train = sum(1 for _ in open(data / "train.xyz") if _.strip().isdigit())
                rates[name].append(n_train / statistics.mean(float(x["time"]) for x in rows))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()), flush=True)
        print(f"quickstart MACE{' with ' + ' '.join(args.set) if args.set else ''}, {args.epochs} epochs, "
              f"{args.workers} workers, {args.repeats} alternating repeats")
        for name, r in rates.items():
            print(f"{name:20s} median {statistics.median(r):7.2f} frames/s (min {min(r):.2f}, max {max(r):.2f})")
        mem = rates["in-memory (extxyz)"]
        for name in ("lazy (HDF5)", "lazy (LMDB)"):
            ratio = [b / a for a, b in zip(mem, rates[name])]
            print(f"{name} / in-memory: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, "
                  f"max {max(ratio):.2f})")
        ratio = [b / a for a, b in zip(rates["lazy (HDF5)"], rates["lazy (LMDB)"])]
        print(f"LMDB / HDF5: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, max {max(ratio):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--reads", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--atoms", type=int, default=8)
    ap.add_argument("--training", action="store_true", help="training throughput, in memory against lazy")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of the training runs")
    args = ap.parse_args()
    if args.training:
        return training(args)
    from mlpot.data import LazyDataset, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        paths = {fmt: Path(tmp) / f"d.{fmt}" for fmt in ("h5", "lmdb")}
        for p in paths.values():
            write_dataset(frames(args.frames, args.atoms), p, cutoff=4.0)
        order = np.random.default_rng(1).integers(0, args.frames, args.reads)
        ds = {fmt: LazyDataset(p, cutoff=4.0) for fmt, p in paths.items()}
        cases = {
            "hdf5 arrays": ds["h5"].frame,
            "lmdb arrays": ds["lmdb"].frame,
            "hdf5 graphs": ds["h5"].__getitem__,
            "lmdb graphs": ds["lmdb"].__getitem__,
        }
        rates = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                for k in order:
                    fn(int(k))
                rates[name].append(args.reads / (time.perf_counter() - t0))
        print(f"{args.frames} frames x {args.atoms} atoms, {args.reads} random reads, {args.repeats} repeats")
        print(f"file size: hdf5 {paths['h5'].stat().st_size / 2**20:.1f} MiB, "
              f"lmdb {paths['lmdb'].stat().st_size / 2**20:.1f} MiB")
        for name, r in rates.items():
            print(f"{name:12s} median {statistics.median(r):9.0f} frames/s  (min {min(r):.0f}, max {max(r):.0f})")
        for what in ("arrays", "graphs"):
            ratios = [a / b for a, b in zip(rates[f"lmdb {what}"], rates[f"hdf5 {what}"])]
            print(f"lmdb/hdf5 {what}: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
                  f"max {max(ratios):.2f})")
        for d in ds.values():
            d.close()


if __name__ == "__main__":
    main()
