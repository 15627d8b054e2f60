"""Models: MACE, eSCN-style, and their Gaunt / SO(2) variants, on one base class."""
from mlpot.models.base import PotentialModel, ZBLRepulsion
from mlpot.models.io import FORMAT_VERSION, load_model, save_model
from mlpot.models.registry import MODEL_REGISTRY, build_model, get_model_class, register_model


def __getattr__(name):
    """``mlpot.models.MACE`` etc.: the model classes, looked up in the one model registry."""
    from mlpot.models.registry import _LAZY_MODELS

    if name in _LAZY_MODELS:
        return get_model_class(name)
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
