"""Boundary conversions between e3nn's ``mul_ir`` layout and the kernels' channel-last layout.

e3nn stores a feature of irreps ``C x l0 + C x l1 + ...`` as the concatenation over irreps of
blocks ``(C, 2l+1)`` flattened, i.e. ``x[..., off_l + c*(2l+1) + m]``. The kernels use the
channel-last layout ``(..., D, C)`` with ``D = sum_l (2l+1)`` and ``x_cl[..., off'_l + m, c]``,
so that a block of channels is one contiguous (coalesced) load. Every irrep must carry the same
multiplicity ``C`` (MACE's hidden features do).
"""
from __future__ import annotations

import torch
from e3nn import o3


def uniform_mul(irreps: o3.Irreps) -> int:
    muls = {mul for mul, _ in o3.Irreps(irreps)}
    if len(muls) != 1:
        raise ValueError(f"kernels need one multiplicity for all irreps, got {irreps}")
    return muls.pop()


def mul_ir_to_channel_last(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., irreps.dim)`` mul_ir  ->  ``(..., D, C)`` channel-last (contiguous)."""
    irreps = o3.Irreps(irreps)
    C = uniform_mul(irreps)
    blocks = []
    for sl, (mul, ir) in zip(irreps.slices(), irreps):
        blocks.append(x[..., sl].reshape(*x.shape[:-1], mul, ir.dim).transpose(-1, -2))
    return torch.cat(blocks, dim=-2).contiguous() if blocks else x.new_zeros(*x.shape[:-1], 0, C)


def channel_last_to_mul_ir(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., D, C)`` channel-last  ->  ``(..., irreps.dim)`` mul_ir."""
    irreps = o3.Irreps(irreps)
    blocks, off = [], 0
    for mul, ir in irreps:
        blk = x[..., off:off + ir.dim, :].transpose(-1, -2)
        blocks.append(blk.reshape(*x.shape[:-2], mul * ir.dim))
        off += ir.dim
    return torch.cat(blocks, dim=-1)
