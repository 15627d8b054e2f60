r"""Equivariant layer normalisation of spherical-harmonic features.

Input ``x`` of shape ``(N, (L+1)^2, C)`` (degrees ``l = 0..L``, e3nn order, channels last).
Per node and per degree ``l``:

* ``l = 0`` (scalars): mean-centred over channels, then RMS-normalised,
  :math:`y_{0c} = g_{0c}\,(x_{0c} - \bar x_0)/\sqrt{\overline{(x_0 - \bar x_0)^2} + \epsilon} + b_c`;
* ``l >= 1``: RMS over the :math:`2l+1` components and the channels (a rotation invariant,
  since :math:`\sum_m x_{lm}^2` is), no centring (a mean of vectors is not invariant),
  :math:`y_{lmc} = g_{lc}\, x_{lmc} / \sqrt{\frac{1}{C(2l+1)} \sum_{m,c} x_{lmc}^2 + \epsilon}`.

Every operation is a scalar (rotation- and reflection-invariant) rescaling of whole
:math:`(2l+1)`-blocks, so the map is exactly O(3)-equivariant. A zero block stays zero.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EquivariantLayerNorm", "SeparableLayerNorm"]


class EquivariantLayerNorm(nn.Module):
    """Per-degree RMS norm, scalars mean-centred, learned per-(l, channel) gains and scalar bias."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.lmax, self.channels, self.eps = int(lmax), int(channels), float(eps)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.lmax + 1, self.channels))
            self.bias = nn.Parameter(torch.zeros(self.channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        degree = torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(self.lmax + 1)])
        self.register_buffer("degree", degree, persistent=False)

    def _normalise_rest(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The normalised ``l >= 1`` blocks: each degree by its own RMS."""
        parts = []
        for l in range(1, self.lmax + 1):
            xl = x[:, l * l : (l + 1) ** 2, :]
            parts.append(xl * torch.rsqrt(xl.pow(2).mean(dim=(-2, -1), keepdim=True) + self.eps))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x[:, :1, :]
        x0 = x0 - x0.mean(dim=-1, keepdim=True)
        x0 = x0 * torch.rsqrt(x0.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = torch.cat([x0] + self._normalise_rest(x), 1)
        if self.weight is not None:
            y = y * self.weight[self.degree].to(y.dtype)
            y = torch.cat([y[:, :1, :] + self.bias.to(y.dtype), y[:, 1:, :]], 1)
        return y

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, channels={self.channels}, eps={self.eps}"


class SeparableLayerNorm(EquivariantLayerNorm):
    r"""EquiformerV2's separable layer norm of ``(N, (L+1)^2, C)`` features.

    * ``l = 0``: an ordinary layer norm over the channels,
      :math:`y_{0c} = g_{0c} (x_{0c} - \bar x_0) / \sqrt{\overline{(x_0 - \bar x_0)^2} + \epsilon} + b_c`;
    * ``l >= 1``, all degrees together: one per-node scale
      :math:`s = \frac{1}{L} \sum_{l=1}^{L} \frac{1}{C(2l+1)} \sum_{m,c} x_{lmc}^2` (each degree
      weighted equally, whatever its size), :math:`y_{lmc} = g_{lc}\, x_{lmc} / \sqrt{s + \epsilon}`.

    Unlike :class:`EquivariantLayerNorm` the relative sizes of the ``l >= 1`` degrees survive the
    normalisation. :math:`s` is O(3)-invariant, so the map is exactly O(3)-equivariant.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(lmax, channels, eps, affine)
        # 1 / (L (2l+1) C) per row l >= 1: the equal-weight mean over degrees of the per-degree mean square
        balance = torch.cat([torch.full((2 * l + 1,), 1.0 / (2 * l + 1)) for l in range(1, self.lmax + 1)]
                            or [torch.zeros(0)])
        self.register_buffer("balance", balance / max(self.lmax, 1) / self.channels, persistent=False)

    def _normalise_rest(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``l >= 1`` blocks, all divided by one per-node RMS (equal weight per degree)."""
        if self.lmax == 0:
            return []
        rest = x[:, 1:, :]
        s = torch.einsum("nkc,k->n", rest.pow(2), self.balance.to(x.dtype))
        return [rest * torch.rsqrt(s + self.eps)[:, None, None]]
