"""Exceptions that carry a message for the user.

Every error raised for bad input (a file, a frame, a config key) derives from
:class:`MlpotError`, so the CLI prints one clear line instead of a traceback. The classes
also derive from the matching builtin (``ValueError``, ``KeyError``, ...), so callers that
catch builtins keep working.
"""
from __future__ import annotations


class MlpotError(Exception):
    """Base class: the message names the problem and where (file, frame, key)."""


class DataError(MlpotError, ValueError):
    """Bad input data: NaN positions, unknown element, missing key, singular cell, ..."""


class ConfigError(MlpotError, ValueError):
    """Bad config: unknown key, wrong type, missing file."""


class ModelFileError(MlpotError, ValueError):
    """A model file that cannot be read: unknown format version, missing fields."""


class UnknownElementError(DataError):
    """An element the model was not trained on."""


class NonFiniteError(MlpotError, ArithmeticError):
    """A NaN or infinity where a number must be finite: a training loss or gradient, a model's
    energy or forces during a relaxation or MD run. The loop stops at the first one."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (MlpotError, OSError))
