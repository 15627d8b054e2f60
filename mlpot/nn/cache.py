"""Values derived from a module's weights, cached until any weight or buffer changes."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["cached_on_weights"]


def cached_on_weights(module: nn.Module, name: str, compute, dtype, device):
    """``compute(dtype, device)``, computed without gradient and kept on ``module`` as ``name``.

    The cache key holds ``(dtype, device)`` and the identity and in-place version counter of
    every parameter and buffer, so an optimizer step, ``load_state_dict`` or ``.to()``
    invalidates it. Callers skip the cache when gradients with respect to the weights are needed
    (training).
    """
    key = (dtype, str(device)) + tuple((id(t), t._version) for t in (*module.parameters(), *module.buffers()))
    cache = getattr(module, name, None)
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, compute(dtype, device))
        setattr(module, name, cache)
    return cache[1]
