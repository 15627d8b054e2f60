"""Random access to on-disk datasets: mlpot's HDF5 format against an LMDB store.

    python scripts/bench_data.py [--frames 20000] [--reads 3000] [--repeats 3] [--atoms 8]

Writes ``--frames`` periodic frames (``--atoms`` atoms each, neighbor lists stored for 4 Å)
once as mlpot HDF5 (:func:`mlpot.data.write_hdf5`, read by :class:`mlpot.data.LazyDataset`)
and once as LMDB (the layout fairchem and nequip use: one key per frame, value = that frame's
arrays packed as raw bytes behind a small JSON header; no pickle), then reads ``--reads``
frames in a random order from each, ``--repeats`` times, interleaved (HDF5, LMDB, HDF5, ...),
both as raw arrays and as model-ready graphs (HDF5: ``LazyDataset[k]``; LMDB: the same
``frame_to_graph`` on the unpacked arrays). Prints frames/s per repeat, the median and the
spread (min-max), the LMDB/HDF5 ratio and both file sizes. The page cache is warm after
writing (what a training epoch after the first sees). Needs ``pip install lmdb``.

    python scripts/bench_data.py --training [--repeats 3] [--epochs 2] [--workers 0]

Training throughput instead: the quickstart config (MACE 16x0e+16x1o on the built-in EMT Cu-Ni
data, 150 training cells) trained ``--epochs`` epochs from the extxyz file in memory and from the
same frames in an HDF5 file (``mlpot data convert --cutoff 5``; lazy, ``--workers`` DataLoader
workers), alternating, ``--repeats`` times each; frames/s = training frames / mean epoch time
from ``log.csv`` (the ``time`` column: training plus validation of the epoch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

KEYS = ("positions", "numbers", "cell", "pbc", "forces", "stress", "edges_i", "edges_j", "shifts")


def pack(fr: dict) -> bytes:
    """Arrays of a frame as ``len(header) | JSON header (name, dtype, shape) | raw buffers``."""
    arrays = {
        "positions": fr["positions"], "numbers": fr["numbers"], "cell": fr["cell"], "pbc": fr["pbc"],
        "forces": fr["forces"], "stress": fr["stress"],
        "edges_i": fr["edges"][0], "edges_j": fr["edges"][1], "shifts": fr["edges"][2],
    }
    head = {"energy": fr["energy"], "config_type": fr["config_type"],
            "arrays": [[k, str(np.asarray(v).dtype), list(np.shape(v))] for k, v in arrays.items()]}
    h = json.dumps(head).encode()
    return struct.pack("<I", len(h)) + h + b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())


def unpack(buf: bytes) -> dict:
    (n,) = struct.unpack_from("<I", buf)
    head = json.loads(buf[4:4 + n])
    out, pos = {"energy": head["energy"], "config_type": head["config_type"]}, 4 + n
    for name, dt, shape in head["arrays"]:
        size = int(np.prod(shape)) * np.dtype(dt).itemsize
        out[name] = np.frombuffer(buf, dtype=dt, count=int(np.prod(shape)), offset=pos).reshape(shape)
        pos += size
    out["edges"] = (out.pop("edges_i"), out.pop("edges_j"), out.pop("shifts"))
    return out


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


def write_lmdb(h5: Path, path: Path, n: int) -> None:
    import lmdb

    from mlpot.data import LazyDataset

    ds = LazyDataset(h5)
    env = lmdb.open(str(path), map_size=1 << 36, subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for k in range(n):
            txn.put(struct.pack(">Q", k), pack(ds.frame(k)))
    env.sync()
    env.close()


def training(args) -> None:
    import csv
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlpot = [sys.executable, "-m", "mlpot.cli.main"]
        base = ["--set", "training.progress=false", f"training.epochs={args.epochs}", "training.time_limit=null",
                f"training.num_workers={args.workers}"]
        subprocess.run(mlpot + ["train", str(repo / "configs/quickstart.yaml"), "--set", f"output={tmp / 'gen'}",
                                "training.epochs=1", "training.progress=false"], check=True, capture_output=True)
        data = tmp / "gen" / "data"
        subprocess.run(mlpot + ["data", "convert", str(data / "train.xyz"), str(tmp / "train.h5"), "--cutoff", "5.0"],
                       check=True, capture_output=True)
        sources = {"in-memory (extxyz)": str(data / "train.xyz"), "lazy (HDF5)": str(tmp / "train.h5")}
        rates = {k: [] for k in sources}
        for r in range(args.repeats):
            for name, train in sources.items():
                out = tmp / f"run{r}-{len(rates[name])}-{name[:4]}"
                subprocess.run(mlpot + ["train", str(repo / "configs/quickstart.yaml"), *base,
                                        f"output={out}", "data.synthetic=null", f"data.train={train}",
                                        f"data.valid={data / 'valid.xyz'}", f"data.test={data / 'test.xyz'}"],
                               check=True, capture_output=True)
                rows = list(csv.DictReader(open(out / "log.csv")))
                n_train = sum(1 for _ in open(data / "train.xyz") if _.strip().isdigit())
                rates[name].append(n_train / statistics.mean(float(x["time"]) for x in rows))
        print(f"quickstart MACE, {args.epochs} epochs, {args.workers} workers, {args.repeats} alternating repeats")
        for name, r in rates.items():
            print(f"{name:20s} median {statistics.median(r):7.1f} frames/s (min {min(r):.1f}, max {max(r):.1f})")
        ratio = [b / a for a, b in zip(*rates.values())]
        print(f"lazy / in-memory: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, max {max(ratio):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--reads", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--atoms", type=int, default=8)
    ap.add_argument("--training", action="store_true", help="training throughput, in memory against lazy")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if args.training:
        return training(args)
    import lmdb

    from mlpot.data import LazyDataset, write_hdf5
    from mlpot.data.graph import frame_to_graph

    with tempfile.TemporaryDirectory() as tmp:
        h5, db = Path(tmp) / "d.h5", Path(tmp) / "d.lmdb"
        write_hdf5(frames(args.frames, args.atoms), h5, cutoff=4.0)
        write_lmdb(h5, db, args.frames)
        order = np.random.default_rng(1).integers(0, args.frames, args.reads)
        ds = LazyDataset(h5, cutoff=4.0)
        env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)
        txn = env.begin()

        def lmdb_graph(k):
            fr = unpack(txn.get(struct.pack(">Q", int(k))))
            return frame_to_graph(fr["positions"], fr["numbers"], fr["cell"], fr["pbc"], 4.0, energy=fr["energy"],
                                  forces=fr["forces"], stress=fr["stress"], edges=fr["edges"])

        cases = {
            "hdf5 arrays": lambda k: ds.frame(int(k)),
            "lmdb arrays": lambda k: unpack(txn.get(struct.pack(">Q", int(k)))),
            "hdf5 graphs": lambda k: ds[int(k)],
            "lmdb graphs": lmdb_graph,
        }
        rates = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                for k in order:
                    fn(k)
                rates[name].append(args.reads / (time.perf_counter() - t0))
        print(f"{args.frames} frames x {args.atoms} atoms, {args.reads} random reads, {args.repeats} repeats")
        print(f"file size: hdf5 {h5.stat().st_size / 2**20:.1f} MiB, lmdb {db.stat().st_size / 2**20:.1f} MiB")
        for name, r in rates.items():
            print(f"{name:12s} median {statistics.median(r):9.0f} frames/s  (min {min(r):.0f}, max {max(r):.0f})")
        for what in ("arrays", "graphs"):
            ratios = [a / b for a, b in zip(rates[f"lmdb {what}"], rates[f"hdf5 {what}"])]
            print(f"lmdb/hdf5 {what}: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
                  f"max {max(ratios):.2f})")
        env.close()
        ds.close()


if __name__ == "__main__":
    main()
