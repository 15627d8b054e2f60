"""The model registry: model name -> class, the one place configs and model files resolve names.

``register_model(name)`` decorates a :class:`~mlpot.models.base.PotentialModel` subclass;
:func:`get_model_class` finds it again, importing the module of a built-in model on first use
(so that ``import mlpot.models`` stays light); :func:`build_model` constructs it from the
keyword hyperparameters of a config's ``model:`` section.

This module imports no model code, so that both the base class and the model-file reader
(:mod:`mlpot.models.io`) can depend on it without depending on each other.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mlpot.errors import ConfigError

if TYPE_CHECKING:
    from mlpot.models.base import PotentialModel

__all__ = ["MODEL_REGISTRY", "build_model", "get_model_class", "register_model"]

MODEL_REGISTRY: dict[str, type[PotentialModel]] = {}

# Models that live in modules not imported by default: name -> module.
_LAZY_MODELS = {
    "MACE": "mlpot.models.mace",
    "ScaleShiftMACE": "mlpot.models.mace",
    "ESCN": "mlpot.models.escn",
    "TensorNet": "mlpot.models.tensornet",
    "EquiformerV2": "mlpot.models.equiformer_v2",
    "Facet": "mlpot.models.facet",
}


def register_model(name: str):
    """Class decorator: make a model buildable by ``name`` from configs and model files."""

    def wrap(cls):
        MODEL_REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return wrap


def get_model_class(name: str) -> type[PotentialModel]:
    """The class registered as ``name``; :class:`ConfigError` listing the known names otherwise."""
    if name not in MODEL_REGISTRY and name in _LAZY_MODELS:
        importlib.import_module(_LAZY_MODELS[name])
    if name not in MODEL_REGISTRY:
        known = sorted(set(MODEL_REGISTRY) | set(_LAZY_MODELS))
        raise ConfigError(f"unknown model name {name!r}; known models: {', '.join(known)}")
    return MODEL_REGISTRY[name]


def build_model(name: str, **config) -> PotentialModel:
    """Build a model by its registered name from keyword hyperparameters."""
    return get_model_class(name)(**config)
