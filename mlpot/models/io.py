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

Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from mlpot.errors import ModelFileError
from mlpot.models.registry import get_model_class

FORMAT = "mlpot-model"
FORMAT_VERSION = 1

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _dtype_name(model) -> str:
    p = next(model.parameters(), None)
    if p is None:
        return getattr(model, "trained_dtype", "float64")
    return str(p.dtype).replace("torch.", "")


def save_model(model, path, metadata: dict | None = None) -> None:
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


def read_model_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise ModelFileError(f"{path}: not a readable mlpot model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an mlpot model file (no '{FORMAT}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version} is newer than this mlpot supports "
            f"({FORMAT_VERSION}); upgrade mlpot to read it"
        )
    for key in ("model_name", "config", "state_dict"):
        if key not in payload:
            raise ModelFileError(f"{path}: model file lacks the {key!r} entry")
    return payload


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
