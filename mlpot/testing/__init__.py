"""Reusable test helpers (equivariance, gradients) shared by op and model tests.

The names are those of :mod:`mlpot.testing.equivariance`; the physics battery for whole models is
:mod:`mlpot.testing.model_checks`.
"""
from mlpot.testing import equivariance as _equivariance
from mlpot.testing.equivariance import *  # noqa: F403 - the package re-exports the module's API

__all__ = list(_equivariance.__all__)
