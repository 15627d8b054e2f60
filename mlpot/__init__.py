"""mlpot: E(3)-equivariant machine-learning interatomic potentials.

    >>> import mlpot
    >>> model = mlpot.load_model("model.pt")
    >>> out = model.predict(list_of_atoms)      # energies, forces, stress
"""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, device=None, dtype=None):
    """Load an mlpot model file (see :mod:`mlpot.models.io`)."""
    from mlpot.models.io import load_model as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["__version__", "load_model"]
