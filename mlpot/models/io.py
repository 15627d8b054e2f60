"""Model files: one file holds everything needed to rebuild and run a model.

Layout (a ``torch.save`` dict, loadable with ``weights_only=True``)::

    format            "mlpot-model"
    format_version    FORMAT_VERSION (int)
    mlpot_version     the package version that wrote it
    model_name        registered model class name ("MACE", "ESCN", ...)
    config            constructor keyword arguments (JSON-like)
    state_dict        weights and persistent buffers
    species           atomic numbers, in one-hot order
    e0s               {Z: eV}
    r_max             cutoff (Å)
    dtype             the dtype the model was trained in
    metadata          free-form (training info, provenance)

Writes are atomic (:mod:`mlpot.fileio`): a temporary file in the same folder, then a rename.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from mlpot.errors import ModelFileError
from mlpot.models.registry import get_model_class

FORMAT = "mlpot-model"
FORMAT_VERSION = 1

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    from mlpot.fileio import atomic_open

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def _dtype_name(model) -> str:
    p = next(model.parameters(), None)
    if p is None:
        return getattr(model, "trained_dtype", "float64")
    return str(p.dtype).replace("torch.", "")


def save_model(model, path, metadata: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically; a model with NaN/inf weights is refused."""
    bad = non_finite_weights(model.state_dict())
    if bad:
        raise ModelFileError(f"refusing to write {path}: non-finite (NaN/inf) weights in {', '.join(bad[:5])}")
    config = dict(model.config)
    config["dtype"] = getattr(model, "trained_dtype", _dtype_name(model))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mlpot_version": __import__("mlpot").__version__,
        "model_name": model.model_name,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "species": list(model.atomic_numbers),
        "e0s": {int(k): float(v) for k, v in model.e0s.items()},
        "r_max": float(model.r_max),
        "dtype": config["dtype"],
        "metadata": dict(metadata or getattr(model, "metadata", {}) or {}),
    }
    atomic_torch_save(payload, path)


def load_error_text(exc: BaseException) -> str:
    """One short line for a failed ``torch.load``: the refused global of a ``weights_only``
    load (a file that would run code), else the exception's first line."""
    text = str(exc)
    refused = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln]
    if refused:
        return "disallowed content: " + refused[0].split(" was not")[0].split(" whose module")[0]
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_model_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise ModelFileError(f"{path}: not a readable mlpot model file ({load_error_text(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an mlpot model file (no '{FORMAT}' header)")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path}: invalid model file format version {version!r} (expected 1..{FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version} is newer than this mlpot supports "
            f"({FORMAT_VERSION}); upgrade mlpot to read it"
        )
    for key in ("model_name", "config", "state_dict"):
        if key not in payload:
            raise ModelFileError(f"{path}: model file lacks the {key!r} entry")
    if not isinstance(payload["config"], dict) or not isinstance(payload["state_dict"], dict):
        raise ModelFileError(f"{path}: model file entries 'config' and 'state_dict' must be mappings")
    bad = non_finite_weights(payload["state_dict"])
    if bad:
        raise ModelFileError(f"{path}: non-finite (NaN/inf) weights in {', '.join(bad[:5])}")
    r_max = payload.get("r_max", payload["config"].get("r_max"))
    if r_max is not None and not (isinstance(r_max, (int, float)) and math.isfinite(r_max) and r_max > 0):
        raise ModelFileError(f"{path}: invalid cutoff r_max {r_max!r}")
    e0s = payload.get("e0s") or {}
    if isinstance(e0s, dict) and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in e0s.values()):
        raise ModelFileError(f"{path}: non-finite E0s {e0s}")
    return payload


def non_finite_weights(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_model(path, device=None, dtype=None):
    """Rebuild a model from its file.

    device: None/"auto" (CUDA when available), "cpu", "cuda", or a torch.device.
    dtype: None (the dtype it was trained in), "float32"/"float64" or a torch dtype.
    """
    payload = read_model_file(path)
    cls = get_model_class(payload["model_name"])
    model = cls(**payload["config"])
    try:
        missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelFileError(f"{path}: weights do not match the architecture ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the architecture (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    model.metadata = payload.get("metadata", {})
    if dtype is None:
        dtype = payload.get("dtype", "float64")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelFileError(f"unknown dtype {dtype!r}; use float32 or float64")
        dtype = _DTYPES[dtype]
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=torch.device(device), dtype=dtype)
    model.eval()
    return model
