"""`mlpot` command line: one sub-command per module in :mod:`mlpot.cli`.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so that ``mlpot --help`` stays fast and a broken optional
dependency of one command never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mlpot.cli.train", "train a potential from a YAML config"),
    "eval": ("mlpot.cli.evaluate", "evaluate a model file on a dataset (MAE/RMSE per config_type)"),
    "relax": ("mlpot.cli.relax", "relax structures (positions and optionally the cell)"),
    "md": ("mlpot.cli.md", "run molecular dynamics (NVE, NVT, NPT) with ASE integrators"),
    "bench": ("mlpot.cli.bench", "benchmarks: kernels, model, neighbors"),
    "import-mace": ("mlpot.cli.import_mace", "convert an exported mace-torch model into an mlpot model file"),
    "export-lammps": ("mlpot.cli.export_lammps", "write a model for LAMMPS `pair_style mliap unified`"),
    "data": ("mlpot.cli.data", "dataset tools: statistics, conversion to the lazy on-disk format"),
    "hessian": ("mlpot.cli.hessian", "Hessian, harmonic frequencies (cm^-1) and zero-point energy of structures"),
    "phonons": ("mlpot.cli.phonons", "phonon band structure and DOS through phonopy (finite displacements)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlpot",
        description="mlpot: E(3)-equivariant machine-learning interatomic potentials.",
    )
    from mlpot import __version__

    parser.add_argument("--version", action="version", version=f"mlpot {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlpot.threads import bounded_openmp_spin

    bounded_openmp_spin()  # before torch loads: idle OpenMP threads spin briefly, then sleep (mlpot/threads.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    mod = importlib.import_module(args._module)
    from mlpot.runtime import freeze_gc, tune_malloc

    importlib.import_module("mlpot.models.mace")  # torch, e3nn: loaded before the freeze below
    tune_malloc()  # process-wide allocator settings: entry points only (mlpot/runtime.py)
    freeze_gc()  # the imported libraries out of the garbage collector's walks: entry points only
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only with --debug
        from mlpot.errors import is_user_error

        if args.debug:
            raise
        if is_user_error(exc):
            print(f"mlpot {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        elif isinstance(exc, MemoryError):
            print(f"mlpot {args.command}: error: out of memory ({_one_line(exc) or 'MemoryError'}); "
                  "reduce the system, the cutoff or the batch size", file=sys.stderr)
        else:
            print(f"mlpot {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
                  "(run `mlpot --debug ...` for the traceback and report it)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages joined with '; ')."""
    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
