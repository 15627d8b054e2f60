"""The single switch between the pure-torch reference ops and the Triton fast paths.

``resolve_backend(name, device)`` turns a config value (``"reference" | "triton" | "auto"``) into
the backend an op actually runs:

* ``reference`` is always available (CPU or GPU, any dtype): plain differentiable torch.
* ``triton`` needs ``triton`` importable and either a CUDA device or the environment variable
  ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: slow, used by the tests). Anything else is a
  :class:`mlpot.errors.ConfigError` that says what is missing.
* ``auto`` picks ``triton`` on a CUDA device when triton imports, else ``reference``; it never
  picks the interpreter.

Models keep ``backend`` in their config and pass it down to every equivariant op.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

import torch

from mlpot.errors import ConfigError

BACKENDS = ("reference", "triton", "auto")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when ``import triton`` works in this environment (says nothing about a GPU)."""
    return _triton_import_error() is None


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def resolve_backend(name: str, device=None) -> str:
    """Return ``"reference"`` or ``"triton"`` for the requested backend ``name`` on ``device``.

    ``device`` may be a ``torch.device``, a string, a tensor (its device is used) or None (CPU).
    """
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if key == "reference":
        return "reference"
    dev = _device_type(device)
    if key == "auto":
        return "triton" if (dev == "cuda" and triton_available()) else "reference"
    # explicit triton
    err = _triton_import_error()
    if err is not None:
        raise ConfigError(
            f"backend 'triton' requested but triton cannot be imported ({err}); "
            "install the GPU extras (pip install 'mlpot[gpu]') or use backend 'reference'"
        )
    if dev == "cuda" or triton_interpret():
        return "triton"
    raise ConfigError(
        f"backend 'triton' needs a CUDA device (got device {dev!r}); set TRITON_INTERPRET=1 "
        "to run the kernels on the CPU interpreter (slow, for testing) or use backend 'reference'"
    )


def _ensure_kernels_package() -> None:
    """Make ``import mlpot.kernels`` work in a source checkout whose install does not map it.

    The wheel maps the top-level ``kernels/`` folder to ``mlpot.kernels`` (setuptools
    ``package-dir``); an editable install made before that folder was listed may lack the mapping.
    In that case the folder next to the ``mlpot`` package is registered under the same name.
    """
    if "mlpot.kernels" in sys.modules:
        return
    try:
        if importlib.util.find_spec("mlpot.kernels") is not None:
            return
    except ModuleNotFoundError:
        pass
    import mlpot

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(mlpot.__file__))), "kernels")
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("mlpot.kernels", init, submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mlpot.kernels"] = module
    spec.loader.exec_module(module)
    mlpot.kernels = module


def kernels_module(name: str):
    """Import ``mlpot.kernels.<name>`` (the Triton kernels and their launchers)."""
    _ensure_kernels_package()
    return importlib.import_module(f"mlpot.kernels.{name}")


__all__ = ["BACKENDS", "kernels_module", "resolve_backend", "triton_available", "triton_interpret"]
