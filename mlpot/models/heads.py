"""Heads of a multi-head model: names, the default head, per-head values.

A model with heads ``[h_0, ..., h_{H-1}]`` (mace-torch's ``heads``) shares every layer but keeps,
per head, its own E0s, energy scale/shift and readout channel. Which head an atom is read with
comes from the graph (``graph["head"]``, one index per structure, as mace-torch's
``data["head"]``) or, when the graph has none, from the model's ``active_head``.

The default head is the one mace-torch's ASE calculator picks when given none: the only head of
a one-head model, else the head named ``default`` (any case); a model with several heads and
none of them ``default`` has no default (a head must then be chosen by name).
"""
from __future__ import annotations

from mlpot.errors import ConfigError

__all__ = ["check_heads", "default_head", "head_e0_matrix", "head_e0s_config", "per_head"]


def check_heads(heads) -> list[str]:
    """Head names as a list of distinct non-empty strings (None: one head, ``Default``)."""
    if heads is None:
        return ["Default"]
    if isinstance(heads, str):
        heads = [heads]
    heads = [str(h) for h in heads]
    if not heads or any(not h for h in heads) or len(set(heads)) != len(heads):
        raise ConfigError(f"heads must be distinct non-empty names, got {heads!r}")
    return heads


def default_head(heads: list[str]) -> str | None:
    """mace-torch's default: the only head, else the one named ``default`` (any case), else None."""
    if len(heads) == 1:
        return heads[0]
    named = [h for h in heads if h.lower() == "default"]
    return named[0] if named else None


def per_head(name: str, value, heads: list[str]) -> list[float]:
    """A scalar repeated for every head, or one value per head (list or ``{head: value}``)."""
    if isinstance(value, dict):
        missing = [h for h in heads if h not in value]
        if missing:
            raise ConfigError(f"{name}: no value for head(s) {missing}")
        return [float(value[h]) for h in heads]
    if isinstance(value, (list, tuple)):
        if len(value) != len(heads):
            raise ConfigError(f"{name}: {len(value)} values for {len(heads)} heads {heads}")
        return [float(v) for v in value]
    return [float(value)] * len(heads)


def head_e0s_config(e0s, heads: list[str]):
    """E0s of a multi-head model as JSON: ``{head: [per species] or {Z or symbol: e}}``.

    Accepts None (zeros), one table for all heads, a list of one table per head, or a dict by
    head name."""
    if e0s is None:
        return None
    if isinstance(e0s, dict) and set(map(str, e0s)) <= set(heads) and e0s:
        missing = [h for h in heads if h not in e0s]
        if missing:
            raise ConfigError(f"e0s: no values for head(s) {missing}")
        return {h: _table(e0s[h]) for h in heads}
    if isinstance(e0s, (list, tuple)) and e0s and isinstance(e0s[0], (list, tuple, dict)):
        if len(e0s) != len(heads):
            raise ConfigError(f"e0s: {len(e0s)} tables for {len(heads)} heads {heads}")
        return {h: _table(t) for h, t in zip(heads, e0s)}
    return {h: _table(e0s) for h in heads}


def e0_vector(e0s, atomic_numbers: list[int]) -> list[float]:
    """E0s given as ``{Z or symbol: e}``, a list aligned with ``atomic_numbers``, or None."""
    if e0s is None:
        return [0.0] * len(atomic_numbers)
    if isinstance(e0s, dict):
        from ase.data import atomic_numbers as symbol_to_z

        table = {}
        for k, v in e0s.items():
            z = int(k) if str(k).lstrip("-").isdigit() else symbol_to_z.get(str(k))
            if z is None:
                raise ConfigError(f"e0s: unknown element {k!r}")
            table[z] = float(v)
        missing = [z for z in atomic_numbers if z not in table]
        if missing:
            raise ConfigError(f"e0s: no value for atomic numbers {missing}")
        return [table[z] for z in atomic_numbers]
    e0s = [float(v) for v in e0s]
    if len(e0s) != len(atomic_numbers):
        raise ConfigError(f"e0s: {len(e0s)} values for {len(atomic_numbers)} species")
    return e0s


def _table(t):
    if isinstance(t, dict):
        return {str(k): float(v) for k, v in t.items()}
    return [float(v) for v in t]


def head_e0_matrix(e0s_config, heads: list[str], atomic_numbers: list[int]) -> list[list[float]]:
    """``(H, S)`` E0s from :func:`head_e0s_config`'s output."""
    if e0s_config is None:
        return [[0.0] * len(atomic_numbers) for _ in heads]
    return [e0_vector(e0s_config[h], atomic_numbers) for h in heads]
