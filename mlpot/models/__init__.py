"""Models: MACE, eSCN-style, and their Gaunt / SO(2) variants, on one base class."""
from mlpot.models.base import PotentialModel, ZBLRepulsion
from mlpot.models.io import FORMAT_VERSION, load_model, save_model
from mlpot.models.registry import MODEL_REGISTRY, build_model, get_model_class, register_model


def __getattr__(name):
    if name in ("MACE", "ScaleShiftMACE"):
        from mlpot.models import mace

        return getattr(mace, name)
    if name == "ESCN":
        from mlpot.models.escn import ESCN

        return ESCN
    raise AttributeError(name)


__all__ = [
    "MODEL_REGISTRY",
    "PotentialModel",
    "ZBLRepulsion",
    "build_model",
    "get_model_class",
    "register_model",
    "FORMAT_VERSION",
    "load_model",
    "save_model",
    "MACE",
    "ESCN",
]
