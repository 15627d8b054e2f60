"""`mlpot export-lammps`: write a model for LAMMPS `pair_style mliap unified OUT 0`."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("model", help="mlpot model file")
    p.add_argument("output", help="output file: *.pt (torch.save) or any other name (pickle)")
    p.add_argument("--device", default="cpu", help="device LAMMPS runs the model on (cpu, cuda)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--mode", default="auto", choices=["auto", "fold", "exchange", "local"],
                   help="graph from LAMMPS pairs: exchange (ghost features refreshed from their owners "
                        "between layers through LAMMPS's forward/reverse_exchange: any number of layers "
                        "and MPI ranks, needs the ML-IAP Kokkos build of LAMMPS develop from 2025 on), "
                        "fold (ghosts folded into owners through jtags: one MPI rank), local (one-layer "
                        "models), or auto (exchange where LAMMPS offers it, else fold, else local; "
                        "else an error naming the LAMMPS needed)")


def run(args) -> int:
    from mlpot.fileio import check_not_input
    from mlpot.lammps import export_mliap
    from mlpot.lammps.mliap import message_passing_layers, supports_layer_hook
    from mlpot.models.io import load_model

    check_not_input(args.output, args.model)
    model = load_model(args.model, device="cpu")
    export_mliap(model, args.output, device=args.device, dtype=args.dtype, mode=args.mode)
    layers = message_passing_layers(model)
    from ase.data import chemical_symbols

    elements = " ".join(chemical_symbols[z] for z in model.atomic_numbers)
    print(f"wrote {args.output} ({type(model).__name__}, r_max={model.r_max} Å, elements {elements}, "
          f"{layers or '?'} message-passing layer(s), mode {args.mode})")
    if layers != 1 and not supports_layer_hook(model):
        print("  note: this model has no between_layers hook: on several MPI ranks it cannot run; "
              "use one rank (mode fold, a LAMMPS with jtags)")
    print("LAMMPS input (CPU):")
    print("  units metal\n  atom_style atomic\n  newton on")
    print(f"  pair_style mliap unified {args.output} 0")
    print(f"  pair_coeff * * {elements}")
    print("Kokkos/GPU: the same lines, run with  lmp -k on g NGPU -sf kk -pk kokkos newton on neigh half")
    if args.output.endswith((".pt", ".pth")):
        print("  (torch >= 2.6 loads .pt with weights_only=True: set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, "
              "or export to a non-.pt name, read with pickle)")
    return 0
