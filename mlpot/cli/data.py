"""``mlpot data``: dataset tools.

    mlpot data convert IN OUT.lmdb [--output-format lmdb|h5] [--format F] [--energy-key K] [--forces-key K]
                   [--stress-key K] [--energy-unit U] [--cutoff R] [--shard-size M --workers W] [--progress]
    mlpot data stats FILE [--r-max 5.0] [--e0s auto|fit|isolated] [--json OUT.json]

``convert`` streams any readable file (extxyz, ASE formats, rMD17 npz, mlearn JSON) into a
lazy dataset file (optionally with neighbor lists for ``--cutoff``): LMDB by default (faster
random access, :mod:`mlpot.data.lmdb_store`), HDF5 for an ``.h5`` name or
``--output-format h5``; with ``--shard-size`` it writes shards of M frames, ``--workers`` of
them in parallel, which ``data.train: [OUT-00000.lmdb, ...]`` trains on lazily
(:mod:`mlpot.train.lazy_data`). ``stats`` prints
E0s, average number of neighbours, mean/std interaction energy per atom and force RMS (the
definitions of mace-torch) and can save them as JSON.
"""
from __future__ import annotations

import argparse
import math
import sys


def _reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None, help="input format (default: from the suffix)")
    p.add_argument("--energy-key", default=None, help="info key of the energy (default: REF_energy, energy)")
    p.add_argument("--forces-key", default=None, help="arrays key of the forces (default: REF_forces, forces)")
    p.add_argument("--stress-key", default=None, help="info key of the stress (default: REF_stress, stress)")
    p.add_argument("--energy-unit", default=None, help="eV (default), meV, kcal/mol (npz default), kJ/mol, Hartree")
    p.add_argument("--length-unit", default=None, help="Å (default), Bohr, nm")
    p.add_argument("--stress-unit", default=None, help="eV/Å^3 (default), GPa, kbar")
    p.add_argument("--no-require-energy", action="store_true", help="accept frames without an energy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    c = sub.add_parser("convert", help="convert a dataset file to a lazy dataset file (LMDB or HDF5)")
    c.add_argument("input")
    c.add_argument("output", help="output file: NAME.lmdb (LMDB, the default) or NAME.h5 (HDF5)")
    c.add_argument("--output-format", choices=("lmdb", "h5"), default=None,
                   help="lmdb (faster random access) or h5 (smaller files); must agree with the name")
    c.add_argument("--cutoff", type=float, default=None, help="also store neighbor lists for this cutoff (Å)")
    c.add_argument("--shard-size", type=int, default=None, metavar="M",
                   help="write shards OUT-00000.lmdb, OUT-00001.lmdb, ... of M frames each (for data.train: [list])")
    c.add_argument("--workers", type=int, default=1, help="shards written in parallel processes (default 1)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    _reader_args(c)
    s = sub.add_parser("stats", help="dataset statistics (E0s, avg. neighbours, energy/force scales)")
    s.add_argument("input")
    s.add_argument("--r-max", type=float, default=5.0, help="cutoff for the neighbour count (Å)")
    s.add_argument("--e0s", default="auto", help="auto (isolated atoms if present, else fit), fit, isolated")
    s.add_argument("--json", default=None, help="save the statistics to this JSON file")
    _reader_args(s)


def _read_kwargs(args) -> dict:
    return dict(
        format=args.format,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        energy_unit=args.energy_unit,
        length_unit=args.length_unit,
        stress_unit=args.stress_unit,
        require=() if args.no_require_energy else ("energy",),
    )


def run(args) -> int:
    from mlpot.data.readers import iread
    from mlpot.errors import ConfigError
    from mlpot.fileio import check_not_input

    cmd = getattr(args, "data_command", None)
    if cmd == "convert":
        from mlpot.data.store import output_path, shard_path, write_dataset, write_shards

        check_not_input(args.output, args.input)
        output = output_path(args.output, args.output_format)
        if args.cutoff is not None and not (args.cutoff > 0 and math.isfinite(args.cutoff)):
            raise ConfigError(f"--cutoff must be a finite number > 0, got {args.cutoff}")
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        if args.shard_size is not None:
            if args.shard_size < 1:
                raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
            check_not_input(shard_path(output, 0), args.input)
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            shards = write_shards(iread(args.input, **_read_kwargs(args)), output, args.shard_size,
                                  cutoff=args.cutoff, workers=args.workers, progress=progress)
            total = sum(n for _, n in shards)
            print(f"wrote {total} frames to {len(shards)} shards; in a training config:")
            print("data:\n  train:\n" + "".join(f"    - {p}\n" for p, _ in shards), end="")
            return 0
        n = write_dataset(iread(args.input, **_read_kwargs(args)), output, cutoff=args.cutoff)
        print(f"wrote {n} frames to {output}")
        return 0
    if cmd == "stats":
        from ase.data import chemical_symbols

        if args.json:
            check_not_input(args.json, args.input)
        if not (args.r_max > 0 and math.isfinite(args.r_max)):
            raise ConfigError(f"--r-max must be a finite number > 0, got {args.r_max}")
        from mlpot.data.statistics import compute_statistics
        from mlpot.data.store import dataset_format

        if dataset_format(args.input) is not None:
            from mlpot.data.dataset import LazyDataset

            data = LazyDataset(args.input, cutoff=args.r_max)
        else:
            data = list(iread(args.input, **_read_kwargs(args)))
        if len(data) == 0:
            from mlpot.errors import DataError

            raise DataError(f"{args.input}: no structures in the file")
        st = compute_statistics(data, r_max=args.r_max, e0s=args.e0s)
        values = [st.avg_num_neighbors, st.mean_interaction_energy, st.std_interaction_energy, st.forces_rms,
                  *st.e0s.values()]
        if not all(math.isfinite(v) for v in values):
            from mlpot.errors import DataError

            raise DataError(f"{args.input}: the statistics are not finite (NaN/inf in the data?); nothing saved")
        print(f"file                      {args.input}")
        print(f"configurations            {st.num_configs} ({st.num_atoms} atoms, isolated atoms excluded)")
        print(f"E0s ({st.e0s_source})")
        for z, e in sorted(st.e0s.items()):
            print(f"  {chemical_symbols[z]:<3} (Z={z:<3})            {e:.6f} eV")
        print(f"avg_num_neighbors (r_max={st.r_max:g})  {st.avg_num_neighbors:.4f}")
        print(f"mean interaction E/atom   {st.mean_interaction_energy:.6f} eV")
        print(f"std interaction E/atom    {st.std_interaction_energy:.6f} eV")
        print(f"forces RMS                {st.forces_rms:.6f} eV/Å")
        if args.json:
            st.save(args.json)
            print(f"saved {args.json}")
        return 0
    print("usage: mlpot data {convert,stats} ... (see mlpot data -h)", file=sys.stderr)
    return 2
