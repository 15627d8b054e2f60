r"""Feature layouts and the conversions between them (the one place they are written).

* ``mul_ir`` (e3nn's, at every module boundary): irreps ``mul_1 x l_1 + mul_2 x l_2 + ...`` as
  ``(..., irreps.dim)``, block ``i`` flattened as ``(mul_i, 2 l_i + 1)``:
  ``x[..., off_i + c (2 l_i + 1) + m]``.
* channel-last ``(..., D, C)`` with ``D = sum_i (2 l_i + 1)``: ``x[..., d_i + m, c]`` (the
  channelwise tensor product, the SO(2) and Triton kernels: a block of channels is one
  contiguous load). Needs one multiplicity ``C`` for all irreps.
* channels-first ``(..., C, D)``: ``x[..., c, d_i + m]`` (mace-torch's ``reshape_irreps``; the
  product bases read the atomic basis this way). Needs one multiplicity.

For irreps ``C x 0 + C x 1 + ... + C x L`` (each degree once, in order) the channel-last rows are
the e3nn component indices ``l^2 + l + m``.
"""
from __future__ import annotations

import torch
from e3nn import o3

__all__ = [
    "channel_last_to_mul_ir",
    "channels_first_to_mul_ir",
    "mul_ir_to_channel_last",
    "mul_ir_to_channels_first",
    "uniform_mul",
]


def uniform_mul(irreps) -> int:
    """The one multiplicity of ``irreps``; ValueError when there are several."""
    muls = {mul for mul, _ in o3.Irreps(irreps)}
    if len(muls) != 1:
        raise ValueError(f"this layout needs one multiplicity for all irreps, got {irreps}")
    return muls.pop()


def mul_ir_to_channel_last(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., irreps.dim)`` mul_ir -> ``(..., D, C)`` channel-last."""
    irreps = o3.Irreps(irreps)
    U = uniform_mul(irreps)
    lead = x.shape[:-1]
    blocks = [x[..., sl].reshape(*lead, U, ir.dim).transpose(-1, -2) for sl, (_, ir) in zip(irreps.slices(), irreps)]
    return torch.cat(blocks, dim=-2)


def channel_last_to_mul_ir(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., D, C)`` channel-last -> ``(..., irreps.dim)`` mul_ir."""
    irreps = o3.Irreps(irreps)
    lead = x.shape[:-2]
    blocks, off = [], 0
    for mul, ir in irreps:
        blocks.append(x[..., off : off + ir.dim, :].transpose(-1, -2).reshape(*lead, mul * ir.dim))
        off += ir.dim
    return torch.cat(blocks, dim=-1)


def mul_ir_to_channels_first(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(N, irreps.dim)`` mul_ir -> ``(N, C, D)`` channels-first (mace-torch's ``reshape_irreps``)."""
    N = x.shape[0]
    out, ix = [], 0
    for mul, ir in o3.Irreps(irreps):
        out.append(x[:, ix : ix + mul * ir.dim].reshape(N, mul, ir.dim))
        ix += mul * ir.dim
    return torch.cat(out, dim=-1)


def channels_first_to_mul_ir(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(N, C, D)`` channels-first -> ``(N, irreps.dim)`` mul_ir."""
    N = x.shape[0]
    out, off = [], 0
    for mul, ir in o3.Irreps(irreps):
        out.append(x[:, :, off : off + ir.dim].reshape(N, mul * ir.dim))
        off += ir.dim
    return torch.cat(out, dim=-1)
