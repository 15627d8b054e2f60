r"""Radial features of an edge: Bessel basis, polynomial cutoff, radial MLP (MACE's).

* :class:`BesselBasis`: :math:`b_n(r) = \sqrt{2/r_{max}}\, \sin(n \pi r / r_{max}) / r`,
  :math:`n = 1..N` (the zeroth spherical Bessel functions vanishing at :math:`r_{max}`).
* :class:`PolynomialCutoff`: :math:`f(x) = 1 - \tfrac{(p+1)(p+2)}{2} x^p + p(p+2) x^{p+1}
  - \tfrac{p(p+1)}{2} x^{p+2}` for :math:`x = r / r_{max} < 1`, else 0; :math:`f`, :math:`f'`
  and :math:`f''` vanish at :math:`r_{max}` (p = 5 in MACE).
* :class:`RadialEmbeddingBlock`: :math:`b_n(r) f(r)`, the edge features.
* :class:`BesselRadial`: the same :math:`b_n(r) f(r)` for a model that keeps the frequencies,
  :math:`r_{max}` and :math:`p` as plain values (eSCN), with no module state of its own.

Both describe themselves to the fused edge-embedding kernel through ``edge_embedding_args()``
(:func:`mlpot.nn.edge_geometry.build_edge_geometry`).
* :func:`radial_mlp`: e3nn's ``FullyConnectedNet`` ``[N] + hidden + [out]`` with SiLU, exactly
  mace-torch's ``conv_tp_weights``: each layer is :math:`x W / \sqrt{\text{fan-in}}` and the
  activation is normalized to unit second moment under a standard normal input
  (``normalize2mom``); no biases, no activation on the output layer.

The buffer names (``bessel_weights``, ``prefactor``, ``r_max``, ``p``) are mace-torch's, so a
mace-torch state dict maps onto these modules key for key.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BesselBasis", "BesselRadial", "PolynomialCutoff", "RadialEmbeddingBlock", "bessel_basis", "radial_mlp"]


def bessel_basis(r: torch.Tensor, freqs: torch.Tensor, prefactor) -> torch.Tensor:
    r""":math:`b_n(r) = c\, \sin(\omega_n r) / r` for ``r (E, 1)`` and ``freqs`` :math:`\omega_n`
    (``(num_basis,)``), with :math:`c = \sqrt{2 / r_{max}}` -> ``(E, num_basis)``."""
    return prefactor * (torch.sin(freqs * r) / r)


class BesselBasis(nn.Module):
    r""":math:`\sqrt{2/r_{max}} \sin(n \pi r / r_{max}) / r`, ``(E, 1) -> (E, num_basis)``."""

    def __init__(self, r_max: float, num_basis: int = 8):
        super().__init__()
        dtype = torch.get_default_dtype()
        w = math.pi / r_max * torch.linspace(1.0, num_basis, num_basis, dtype=dtype)
        self.register_buffer("bessel_weights", w)
        self.register_buffer("r_max", torch.tensor(float(r_max), dtype=dtype))
        self.register_buffer("prefactor", torch.tensor(math.sqrt(2.0 / r_max), dtype=dtype))
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return bessel_basis(r, self.bessel_weights, self.prefactor)

    def extra_repr(self) -> str:
        return f"r_max={float(self.r_max)}, num_basis={self.num_basis}"


class PolynomialCutoff(nn.Module):
    """Smooth envelope, 1 at r = 0 and 0 (with two derivatives) at ``r_max``; ``(E, 1) -> (E, 1)``."""

    def __init__(self, r_max: float, p: int = 5):
        super().__init__()
        self.register_buffer("r_max", torch.tensor(float(r_max), dtype=torch.get_default_dtype()))
        self.register_buffer("p", torch.tensor(int(p), dtype=torch.int))

    @staticmethod
    def envelope(r: torch.Tensor, r_max, p) -> torch.Tensor:
        x = r / r_max
        env = (
            1.0
            - ((p + 1.0) * (p + 2.0) / 2.0) * torch.pow(x, p)
            + p * (p + 2.0) * torch.pow(x, p + 1)
            - (p * (p + 1.0) / 2) * torch.pow(x, p + 2)
        )
        return env * (r < r_max)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.envelope(r, self.r_max, self.p.to(torch.int))

    def extra_repr(self) -> str:
        return f"r_max={float(self.r_max)}, p={int(self.p)}"


class RadialEmbeddingBlock(nn.Module):
    """Edge lengths ``(E, 1)`` -> Bessel features times the cutoff envelope ``(E, num_bessel)``."""

    def __init__(self, r_max: float, num_bessel: int, num_polynomial_cutoff: int):
        super().__init__()
        self.bessel_fn = BesselBasis(r_max=r_max, num_basis=num_bessel)
        self.cutoff_fn = PolynomialCutoff(r_max=r_max, p=num_polynomial_cutoff)
        self.out_dim = num_bessel

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.bessel_fn(lengths) * self.cutoff_fn(lengths)

    def radial_and_envelope(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b_n(r) f(r), f(r))``, the envelope one tensor used by both."""
        envelope = self.cutoff_fn(lengths)
        return self.bessel_fn(lengths) * envelope, envelope

    def envelope(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.cutoff_fn(lengths)

    def edge_embedding_args(self) -> tuple:
        """``(num_basis, r_max, p, freqs)`` of the fused edge-embedding kernel."""
        return (int(self.bessel_fn.num_basis), float(self.bessel_fn.r_max), int(self.cutoff_fn.p),
                self.bessel_fn.bessel_weights)


class BesselRadial:
    r""":math:`\sqrt{2/r_{max}}\, \sin(\omega_n r) / r \cdot f_p(r / r_{max})` with given frequencies
    ``freqs`` :math:`\omega_n` (a tensor, treated as constant), ``r_max`` and ``p`` (plain numbers).

    ``BesselRadial(freqs, r_max, p)(lengths (E, 1)) -> (E, num_basis)``; the radial basis of
    :class:`RadialEmbeddingBlock` for models that hold no such module (no state dict entries).
    """

    def __init__(self, freqs: torch.Tensor, r_max: float, p: int):
        self.freqs, self.r_max, self.p = freqs, float(r_max), int(p)

    def __call__(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.radial_and_envelope(lengths)[0]

    def radial_and_envelope(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b_n(r) f(r), f(r))``, the envelope one tensor used by both."""
        envelope = self.envelope(lengths)
        return bessel_basis(lengths, self.freqs, math.sqrt(2.0 / self.r_max)) * envelope, envelope

    def envelope(self, lengths: torch.Tensor) -> torch.Tensor:
        return PolynomialCutoff.envelope(lengths, self.r_max, self.p)

    def edge_embedding_args(self) -> tuple:
        """``(num_basis, r_max, p, freqs)`` of the fused edge-embedding kernel."""
        return (int(self.freqs.shape[0]), self.r_max, self.p, self.freqs)


def radial_mlp(num_in: int, hidden: list[int], num_out: int) -> nn.Module:
    """mace-torch's radial MLP: ``e3nn.nn.FullyConnectedNet([num_in, *hidden, num_out], silu)``."""
    from e3nn import nn as enn

    return enn.FullyConnectedNet([int(num_in)] + [int(h) for h in hidden] + [int(num_out)], torch.nn.functional.silu)
