"""Reusable test helpers (equivariance, gradients) shared by op and model tests."""
from mlpot.testing.equivariance import (
    D_from_matrix,
    assert_equivariant,
    assert_gradcheck,
    assert_gradgradcheck,
    equivariance_error,
    rand_orthogonal,
    rand_reflection,
    rand_rotation,
)

__all__ = [
    "D_from_matrix",
    "assert_equivariant",
    "assert_gradcheck",
    "assert_gradgradcheck",
    "equivariance_error",
    "rand_orthogonal",
    "rand_reflection",
    "rand_rotation",
]
