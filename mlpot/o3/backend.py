"""The single switch between the pure-torch reference ops and the Triton fast paths.

``resolve_backend(name, device)`` turns a config value (``"reference" | "triton" | "cpu" | "auto"``)
into the backend an op actually runs:

* ``reference`` is always available (CPU or GPU, any dtype): plain differentiable torch.
* ``triton`` needs ``triton`` importable and either a CUDA device or the environment variable
  ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: slow, used by the tests). Anything else is a
  :class:`mlpot.errors.ConfigError` that says what is missing.
* ``cpu`` (op level) runs the compiled CPU kernels of :mod:`mlpot.kernels.cpu` on CPU tensors: it
  needs a C compiler (built once per machine, on first use); a GPU device or a missing compiler is
  a :class:`mlpot.errors.ConfigError` that says so.
* ``auto`` picks ``triton`` on a CUDA device when triton imports, ``cpu`` on the CPU where an op
  has CPU kernels that support the call (e.g. the symmetric contraction with constant weights, at
  inference) and they build, else ``reference``; it never picks the interpreter.

A model's config holds ``reference``, ``triton`` or ``auto``; ``cpu`` exists only per op (no model
has CPU kernels for every op), so a model reaches it through ``auto``.

Models keep ``backend`` in their config and pass it down to every equivariant op.

The registry
------------
:data:`REGISTRY` maps ``(op, backend)`` to the implementation, named ``"module:attribute"`` and
imported on first use (so importing :mod:`mlpot.o3` imports neither triton nor the kernels).
:func:`check_backend` is what a model calls when it is built: an ``(op, backend)`` pair that is
not registered, or an option the implementation does not support (e.g. an SO(2) plan with
several multiplicities on ``triton``), is a :class:`~mlpot.errors.ConfigError` naming the op and the backend;
nothing falls back silently. :func:`select_backend` is the one dispatch point at call time;
``auto`` picks ``triton`` where it is registered and a CUDA device is in use, else
``reference``, and says once per op, in the log, what it picked.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from mlpot.errors import ConfigError

BACKENDS = ("reference", "triton", "cpu", "auto")
#: the backends an implementation is registered under
IMPLEMENTATIONS = ("reference", "triton", "cpu")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpImplementation:
    """One registry entry: where the implementation lives and the options it supports.

    ``options`` maps an option name to the values this implementation accepts (an option not
    listed is unrestricted).
    """

    op: str
    backend: str
    target: str
    options: dict = field(default_factory=dict)

    def load(self):
        module, _, attr = self.target.partition(":")
        if module.startswith("mlpot.kernels"):
            _ensure_kernels_package()
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


#: what each op computes (the README's backend table lists these)
OPS: dict[str, str] = {
    "edge_embedding": "spherical harmonics of the edge vectors with the Bessel radial basis x envelope",
    "channelwise_tp": "channelwise (uvu) Clebsch-Gordan message passing: gather, product, scatter",
    "symmetric_contraction": "MACE symmetric contraction (product basis)",
    "gaunt_product": "Gaunt S2-grid product (Gaunt message tensor product and Gaunt product basis)",
    "so2_message_passing": "SO(2) message passing in the edge frames (gather, rotate, per-m linear, rotate back, scatter)",
    "so2_linear": "eSCN's shared-weight SO(2) linear map on edge-frame features",
    "spline_radial": "learnable cubic B-spline radial functions (table lookup) times the cutoff envelope",
}

REGISTRY: dict[tuple[str, str], OpImplementation] = {}


def register(op: str, backend: str, target: str, **options) -> None:
    """Register ``target`` (``"module:attribute"``) as the ``backend`` implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"backend {backend!r}: register one of {', '.join(IMPLEMENTATIONS)}")
    REGISTRY[(op, backend)] = OpImplementation(op, backend, target, {k: tuple(v) for k, v in options.items()})


register("edge_embedding", "reference", "mlpot.nn.edge_geometry:reference_edge_embedding")
register("edge_embedding", "triton", "mlpot.kernels.spherical_harmonics:edge_embedding")
register("channelwise_tp", "reference", "mlpot.o3.tensor_product:ChannelwiseTensorProduct.message_passing_channel_last")
register("channelwise_tp", "triton", "mlpot.kernels.channelwise_tp:FusedChannelwiseTP", layout=("uniform",))
register("channelwise_tp", "cpu", "mlpot.kernels.channelwise_tp_cpu:message_passing_cpu", layout=("uniform",),
         training=(False,))
register("symmetric_contraction", "reference", "mlpot.o3.symmetric_contraction:SymmetricContraction.reference_forward")
register("symmetric_contraction", "triton", "mlpot.kernels.symmetric_contraction:symmetric_contraction")
register("symmetric_contraction", "cpu", "mlpot.kernels.symmetric_contraction_cpu:symmetric_contraction_cpu",
         constant_weights=(True,))
register("gaunt_product", "reference", "mlpot.o3.gaunt:grid_product")
register("gaunt_product", "triton", "mlpot.kernels.gaunt:gaunt_product", method=("grid", "fourier"))
register("so2_message_passing", "reference", "mlpot.o3.so2:so2_message_passing")
register("so2_message_passing", "triton", "mlpot.kernels.so2:so2_message_passing", layout=("uniform",))
register("so2_linear", "reference", "mlpot.o3.so2:so2_linear")
register("so2_linear", "triton", "mlpot.kernels.so2_linear:so2_linear")
register("spline_radial", "reference", "mlpot.nn.spline_radial:SplineRadial")  # no kernel yet


def supported_backends(op: str) -> tuple[str, ...]:
    """The registered backends of ``op`` (``reference`` first)."""
    return tuple(b for b in IMPLEMENTATIONS if (op, b) in REGISTRY)


def check_backend(op: str, backend: str, **options) -> None:
    """Build-time check: ``backend`` (``reference | triton | auto``) can run ``op`` with ``options``.

    Raises :class:`ConfigError` naming the op and the backend when the pair is not registered or
    an option value is not supported by that implementation. ``auto`` always passes (it falls
    back to the reference where no fast path exists, and says so in the log).
    """
    key = str(backend).strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} for op {op!r}: expected one of {', '.join(BACKENDS)}")
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if key == "auto":
        return
    impl = REGISTRY.get((op, key))
    if impl is None:
        raise ConfigError(
            f"op {op!r} has no {key!r} backend (it has: {', '.join(supported_backends(op))})"
        )
    for name, value in options.items():
        allowed = impl.options.get(name)
        if allowed is not None and value not in allowed:
            raise ConfigError(
                f"op {op!r} on backend {key!r} does not support {name}={value!r} "
                f"(supported: {', '.join(map(str, allowed))}); use backend 'reference'"
            )


_AUTO_LOGGED: set = set()


def select_backend(op: str, backend: str, device=None, **options) -> str:
    """Call-time dispatch: ``"reference"``, ``"triton"`` or ``"cpu"`` for ``op`` on ``device``.

    An explicit backend is checked (:func:`check_backend`, then :func:`resolve_backend` for what
    the machine offers); ``auto`` picks ``triton`` when it is registered for ``op`` with these
    options, triton imports and ``device`` is CUDA; ``cpu`` when it is registered for ``op`` with
    these options, ``device`` is the CPU and the CPU kernels build; else ``reference``. It logs its
    pick once per op and device (with the reason when the CPU kernels cannot be built).
    """
    key = str(backend).strip().lower()
    check_backend(op, key, **options)
    if key != "auto":
        return resolve_backend(key, device)
    choice, why = "reference", ""
    dev = _device_type(device)
    fast = "triton" if dev == "cuda" else "cpu" if dev == "cpu" else None
    if fast is not None and (op, fast) in REGISTRY:
        try:
            check_backend(op, fast, **options)
        except ConfigError:
            fast = None
        if fast == "triton":
            choice = resolve_backend("auto", device)
        elif fast == "cpu":
            why = cpu_kernels_error() or ""
            choice = "reference" if why else "cpu"
    tag = (op, choice, dev)
    if tag not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(tag)
        _log.info("backend auto: op %s runs on %s (device %s)%s", op, choice, dev,
                  f"; CPU kernels unavailable: {why}" if why else "")
    return choice


class BackendChoice:
    """Mixin of the modules that run a registry op: ``op`` names it, ``backend`` is the config value.

    :meth:`check_backend` runs at build time (with the options the implementation depends on);
    :meth:`selected_backend` is the call-time dispatch.
    """

    op: str = ""
    backend: str = "reference"

    def check_backend(self, **options) -> None:
        check_backend(self.op, self.backend, **options)
        self._backend_options = options

    def selected_backend(self, device) -> str:
        """``"reference"`` or ``"triton"``: what runs on ``device``."""
        return select_backend(self.op, self.backend, device, **getattr(self, "_backend_options", {}))


def implementation(op: str, backend: str):
    """The registered implementation object of ``(op, backend)`` (imported on first use)."""
    impl = REGISTRY.get((op, backend))
    if impl is None:
        raise ConfigError(f"op {op!r} has no {backend!r} backend (it has: {', '.join(supported_backends(op))})")
    return impl.load()


def backend_table() -> list[tuple[str, tuple[str, ...]]]:
    """``[(op, backends)]`` in :data:`OPS` order: what the README's backend table shows."""
    return [(op, supported_backends(op)) for op in OPS]


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


def cpu_kernels_error() -> str | None:
    """Why the compiled CPU kernels (:mod:`mlpot.kernels.cpu`) cannot run here, or None (builds them
    on the first call)."""
    _ensure_kernels_package()
    from mlpot.kernels.cpu import unavailable_reason

    return unavailable_reason()


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
    """Return ``"reference"``, ``"triton"`` or ``"cpu"`` for the requested backend ``name`` on ``device``
    (``auto`` here is op-agnostic: ``triton`` on CUDA, else ``reference``; :func:`select_backend`
    adds the per-op ``cpu`` choice).

    ``device`` may be a ``torch.device``, a string, a tensor (its device is used) or None (CPU).
    """
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if key == "reference":
        return "reference"
    dev = _device_type(device)
    if key == "cpu":
        if dev != "cpu":
            raise ConfigError(f"backend 'cpu' runs on CPU tensors (got device {dev!r}); use backend 'triton' or 'auto'")
        why = cpu_kernels_error()
        if why is not None:
            raise ConfigError(f"backend 'cpu': the CPU kernels cannot be built here ({why}); use backend 'reference'")
        return "cpu"
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


__all__ = [
    "BACKENDS",
    "OPS",
    "BackendChoice",
    "REGISTRY",
    "backend_table",
    "check_backend",
    "implementation",
    "kernels_module",
    "register",
    "resolve_backend",
    "select_backend",
    "supported_backends",
    "triton_available",
    "triton_interpret",
]
