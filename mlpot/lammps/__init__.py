"""LAMMPS coupling: an mlpot model as a ``pair_style mliap unified`` Python model."""
from mlpot.lammps.mliap import MLPotMLIAP, message_passing_layers


def export_mliap(model, path, device: str = "cpu", dtype: str | None = "float64", mode: str = "auto") -> None:
    """Write ``model`` (a PotentialModel or a model-file path) for ``pair_style mliap unified``.

    A name ending in ``.pt``/``.pth`` is written with ``torch.save`` (LAMMPS reads it with
    ``torch.load``), any other name with ``pickle`` (LAMMPS reads it with ``pickle.load``).
    The write is atomic.
    """
    import pickle
    from pathlib import Path

    from mlpot.models.io import atomic_torch_save
    from mlpot.sim.structio import atomic_output

    if not hasattr(model, "compute_node_energies"):
        from mlpot.models.io import load_model

        model = load_model(model, device="cpu")
    obj = MLPotMLIAP(model, device=device, dtype=dtype, mode=mode)
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        atomic_torch_save(obj, path)
    else:
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            pickle.dump(obj, fh)


def load_mliap(path):
    """Read a file written by :func:`export_mliap` the way LAMMPS does."""
    import pickle
    from pathlib import Path

    import torch

    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        return torch.load(path, weights_only=False)
    with open(path, "rb") as fh:
        return pickle.load(fh)


__all__ = ["MLPotMLIAP", "export_mliap", "load_mliap", "message_passing_layers"]
