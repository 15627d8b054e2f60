"""Generated Triton sources: where they are cached and how they are imported.

Triton reads a kernel's source with ``inspect``, so a kernel generated as text must live in a file.
:func:`load_generated` writes the text (atomically, only when it differs) to
``$MLPOT_CACHE/kernels/<stem>.py`` (default ``~/.cache/mlpot/kernels``) and imports it;
:func:`import_generated` imports a file written before (``mlpot.bench.aot`` finds a generated
kernel by its name in a fresh process through the owning module's ``__getattr__``).
Used by :mod:`mlpot.kernels.mp_codegen`, :mod:`mlpot.kernels.spherical_harmonics` and
:mod:`mlpot.kernels.symmetric_contraction`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mlpot.errors import ConfigError
from mlpot.fileio import atomic_write_text

HEADER = "import triton.language as tl\n\n\n"


def cache_dir() -> Path:
    """Where generated kernel sources live: ``$MLPOT_CACHE/kernels`` (default ``~/.cache/mlpot``)."""
    return Path(os.environ.get("MLPOT_CACHE", Path.home() / ".cache" / "mlpot")) / "kernels"


def import_generated(owner: str, stem: str, kernel_names, loaded: dict):
    """Import ``<cache>/<stem>.py`` once (``loaded``: the owner's stem -> module cache); its kernels
    ``kernel_names`` get ``__module__ = owner`` so that they are found again through ``owner``'s
    ``__getattr__``."""
    if stem not in loaded:
        path = cache_dir() / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(f"{owner}._generated_{stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in kernel_names:
            getattr(mod, name).__module__ = owner
        loaded[stem] = mod
    return loaded[stem]


def load_generated(owner: str, stem: str, src: str, kernel_names, loaded: dict):
    """Write ``src`` to ``<cache>/<stem>.py`` when the file differs, then :func:`import_generated`."""
    if stem not in loaded:
        path = cache_dir() / f"{stem}.py"
        try:
            current = path.read_text()
        except OSError:
            current = None
        if current != src:
            try:
                atomic_write_text(path, src)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (generated Triton kernels are cached there; set MLPOT_CACHE to a "
                                  "writable folder)") from None
    return import_generated(owner, stem, kernel_names, loaded)


class Consts:
    """Distinct coefficient magnitudes as named scalar constants of the kernel's dtype ``DT``
    (``tl.full([], v, DT)``: a bare Python float literal would be typed fp32 by Triton)."""

    def __init__(self):
        self.names: dict[float, str] = {}

    def __call__(self, value: float) -> str:
        """The constant's name, negated for a negative value (one constant per magnitude: fewer
        fp64 constants held in registers)."""
        mag = abs(value)
        if mag not in self.names:
            self.names[mag] = f"k{len(self.names)}"
        return self.names[mag] if value >= 0 else f"-{self.names[mag]}"

    def lines(self, indent: str) -> list[str]:
        return [f"{indent}{n} = tl.full([], {v!r}, DT)" for v, n in self.names.items()]
