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
from e3nn import nn as enn
from torch import nn

__all__ = [
    "AgnesiTransform",
    "BesselBasis",
    "BesselRadial",
    "ChebyshevBasis",
    "GaussianBasis",
    "MaceZBLRepulsion",
    "PolynomialCutoff",
    "RadialMLP",
    "RadialEmbeddingBlock",
    "SoftTransform",
    "SpeciesRadialEmbeddingBlock",
    "bessel_basis",
    "radial_mlp",
]


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


class RadialMLP(enn.FullyConnectedNet):
    r"""e3nn's ``FullyConnectedNet`` (same parameters, same state dict, same function). In eval
    mode the per-layer scalings (:math:`1/\sqrt{\text{fan-in}}` and the activation's
    normalisation constant) are folded into cached weights, so a layer is one matmul and one
    activation, forward and backward, instead of four or five operations (the weights are then
    constants, as everywhere in eval mode: :func:`mlpot.nn.cache.cached_on_weights`)."""

    def _folded(self, dtype, device):
        weights, acts, carry = [], [], 1.0
        for layer in self.children():
            if layer.act is None:
                scale = (layer.h_in * layer.var_in / layer.var_out) ** -0.5
            else:
                scale = (layer.h_in * layer.var_in) ** -0.5
            weights.append((layer.weight * (carry * scale)).to(dtype=dtype, device=device))
            act = layer.act
            if act is None:
                acts.append(None)
                carry = 1.0
            else:  # e3nn's normalize2mom: f(x) * cst (cst skipped when it is ~1), then * sqrt(var_out)
                acts.append(act.f)
                carry = (1.0 if act._is_id else act.cst) * layer.var_out ** 0.5
        return weights, acts, carry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        from mlpot.nn.cache import cached_on_weights

        weights, acts, carry = cached_on_weights(self, "_fold_cache", self._folded, x.dtype, x.device)
        for w, act in zip(weights, acts):
            x = x @ w
            if act is not None:
                x = act(x)
        return x if carry == 1.0 else x * carry


def radial_mlp(num_in: int, hidden: list[int], num_out: int) -> nn.Module:
    """mace-torch's radial MLP: ``e3nn.nn.FullyConnectedNet([num_in, *hidden, num_out], silu)``
    (:class:`RadialMLP`)."""
    return RadialMLP([int(num_in)] + [int(h) for h in hidden] + [int(num_out)], torch.nn.functional.silu)


# ------------------------------------------------------------------------------------------------
# mace-torch's other radial bases, distance transforms and pair repulsion (``radial_type``,
# ``distance_transform``, ``pair_repulsion``). Buffer names are mace-torch's, so its state dict maps
# onto these modules key for key. Per-edge species enter as atomic numbers ``z_s, z_r (E, 1)``.
# ------------------------------------------------------------------------------------------------
def _covalent_radii_buffer(module: nn.Module) -> None:
    from ase.data import covalent_radii

    module.register_buffer("covalent_radii", torch.tensor(covalent_radii, dtype=torch.get_default_dtype()))


class GaussianBasis(nn.Module):
    r""":math:`g_n(r) = \exp(-(r - \mu_n)^2 / (2 \delta^2))`, :math:`\mu_n` evenly spaced on
    :math:`[0, r_{max}]`, :math:`\delta = r_{max} / (N - 1)` (mace-torch's ``radial_type: gaussian``)."""

    def __init__(self, r_max: float, num_basis: int = 8):
        super().__init__()
        self.register_buffer(
            "gaussian_weights", torch.linspace(0.0, r_max, num_basis, dtype=torch.get_default_dtype())
        )
        self.coeff = -0.5 / (r_max / (num_basis - 1)) ** 2
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (r - self.gaussian_weights) ** 2)


class ChebyshevBasis(nn.Module):
    r""":math:`T_n(r)`, Chebyshev polynomials of the first kind of the (unscaled) distance,
    :math:`n = 1..N` (mace-torch's ``radial_type: chebyshev``)."""

    def __init__(self, r_max: float, num_basis: int = 8):
        super().__init__()
        self.register_buffer("n", torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())[None, :])
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return torch.special.chebyshev_polynomial_t(r.expand(-1, self.num_basis), self.n.expand(r.shape[0], -1))


class AgnesiTransform(nn.Module):
    r"""Distance :math:`r \to \big(1 + a x^q / (1 + x^{q - p})\big)^{-1}`, :math:`x = r / r_0`,
    :math:`r_0` the mean covalent radius of the pair (ACEpotentials.jl's Agnesi transform, as
    mace-torch's ``distance_transform: Agnesi``; ``q, p, a`` are buffers)."""

    def __init__(self, q: float = 0.9183, p: float = 4.5791, a: float = 1.0805):
        super().__init__()
        dtype = torch.get_default_dtype()
        self.register_buffer("q", torch.tensor(q, dtype=dtype))
        self.register_buffer("p", torch.tensor(p, dtype=dtype))
        self.register_buffer("a", torch.tensor(a, dtype=dtype))
        _covalent_radii_buffer(self)

    def forward(self, r: torch.Tensor, z_s: torch.Tensor, z_r: torch.Tensor) -> torch.Tensor:
        x = r / (0.5 * (self.covalent_radii[z_s] + self.covalent_radii[z_r]))
        return 1.0 / (1 + self.a * torch.pow(x, self.q) / (1 + torch.pow(x, self.q - self.p)))


class SoftTransform(nn.Module):
    r"""Distance :math:`r \to p_0 + (r - p_0)\, \tfrac12 [1 + \tanh(\alpha' (r - m))]` with
    :math:`r_0` the sum of the covalent radii, :math:`p_0 = 3 r_0 / 4`, :math:`p_1 = 4 r_0 / 3`,
    :math:`m = (p_0 + p_1) / 2`, :math:`\alpha' = \alpha / (p_1 - p_0)` (mace-torch's
    ``distance_transform: Soft``)."""

    def __init__(self, alpha: float = 4.0):
        super().__init__()
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.get_default_dtype()))
        _covalent_radii_buffer(self)

    def forward(self, r: torch.Tensor, z_s: torch.Tensor, z_r: torch.Tensor) -> torch.Tensor:
        r0 = self.covalent_radii[z_s] + self.covalent_radii[z_r]
        p0, p1 = (3 / 4) * r0, (4 / 3) * r0
        s = 0.5 * (1.0 + torch.tanh(self.alpha / (p1 - p0) * (r - 0.5 * (p0 + p1))))
        return p0 + (r - p0) * s


RADIAL_TYPES = {"bessel": BesselBasis, "gaussian": GaussianBasis, "chebyshev": ChebyshevBasis}
DISTANCE_TRANSFORMS = {"Agnesi": AgnesiTransform, "Soft": SoftTransform}


class SpeciesRadialEmbeddingBlock(RadialEmbeddingBlock):
    r"""mace-torch's general radial embedding: basis ``radial_type`` of the (optionally
    ``distance_transform``-ed) length, times the polynomial envelope of the true length
    (``apply_cutoff``), or without it (then the envelope multiplies the radial MLP's output).

    ``radial_and_envelope(lengths, z_s, z_r) -> (radial (E, N), envelope (E, 1))``.
    """

    def __init__(self, r_max: float, num_bessel: int, num_polynomial_cutoff: int, radial_type: str = "bessel",
                 distance_transform: str | None = None, apply_cutoff: bool = True):
        super().__init__(r_max, num_bessel, num_polynomial_cutoff)
        from mlpot.errors import ConfigError

        if radial_type not in RADIAL_TYPES:
            raise ConfigError(f"radial_type {radial_type!r} unknown; choose one of {', '.join(RADIAL_TYPES)}")
        if distance_transform is not None and distance_transform not in DISTANCE_TRANSFORMS:
            raise ConfigError(f"distance_transform {distance_transform!r} unknown; choose one of "
                              f"{', '.join(DISTANCE_TRANSFORMS)} or None")
        if radial_type != "bessel":
            self.bessel_fn = RADIAL_TYPES[radial_type](r_max, num_bessel)
        if distance_transform is not None:
            self.distance_transform = DISTANCE_TRANSFORMS[distance_transform]()
        self.apply_cutoff = bool(apply_cutoff)
        self.out_dim = int(num_bessel)  # every radial type has num_bessel functions

    def radial_and_envelope(self, lengths, z_s=None, z_r=None):
        envelope = self.cutoff_fn(lengths)
        if hasattr(self, "distance_transform"):
            lengths = self.distance_transform(lengths, z_s, z_r)
        radial = self.bessel_fn(lengths)
        return (radial * envelope if self.apply_cutoff else radial), envelope


class MaceZBLRepulsion(nn.Module):
    r"""mace-torch's ZBL pair repulsion (``pair_repulsion=True``), per atom, added to the
    interaction energy before scale/shift:

    .. math:: E_i = \sum_{e: \text{receiver} = i} \tfrac12\, \frac{14.3996\, Z_s Z_r}{r}\,
        \phi(r / a)\, f_p\big(r; R_s + R_r\big),

    :math:`a = 0.529\, a_{pre} / (Z_s^{a_{exp}} + Z_r^{a_{exp}})`,
    :math:`\phi(x) = \sum_k c_k e^{-d_k x}` with :math:`d = (3.2, 0.9423, 0.4028, 0.2016)`,
    ``c``, ``a_pre``, ``a_exp`` buffers (mace-torch's 0.1818, 0.5099, 0.2802, 0.02817; 0.4543;
    0.300), :math:`R` covalent radii and :math:`f_p` the polynomial envelope with
    ``p = num_polynomial_cutoff``. Not mlpot's :class:`~mlpot.models.base.ZBLRepulsion`, whose
    constants and cutoff differ.
    """

    def __init__(self, p: int = 5):
        super().__init__()
        dtype = torch.get_default_dtype()
        self.register_buffer("c", torch.tensor([0.1818, 0.5099, 0.2802, 0.02817], dtype=dtype))
        self.register_buffer("p", torch.tensor(int(p), dtype=torch.int))
        _covalent_radii_buffer(self)
        self.register_buffer("a_exp", torch.tensor(0.300, dtype=dtype))
        self.register_buffer("a_prefactor", torch.tensor(0.4543, dtype=dtype))

    def forward(self, r: torch.Tensor, z_s: torch.Tensor, z_r: torch.Tensor, receiver: torch.Tensor,
                num_nodes: int) -> torch.Tensor:
        rc = self.covalent_radii[z_s] + self.covalent_radii[z_r]
        z_s, z_r = z_s.to(r.dtype), z_r.to(r.dtype)
        a = self.a_prefactor * 0.529 / (torch.pow(z_s, self.a_exp) + torch.pow(z_r, self.a_exp))
        x = r / a
        phi = (self.c[0] * torch.exp(-3.2 * x) + self.c[1] * torch.exp(-0.9423 * x)
               + self.c[2] * torch.exp(-0.4028 * x) + self.c[3] * torch.exp(-0.2016 * x))
        v = 0.5 * (14.3996 * z_s * z_r) / r * phi * PolynomialCutoff.envelope(r, rc, self.p.to(torch.int))
        return r.new_zeros(num_nodes).index_add(0, receiver, v.squeeze(-1))


class LayerNormRadialMLP(nn.Module):
    r"""``[Linear (bias) -> LayerNorm -> SiLU] x hidden, Linear (bias)`` on the channel sizes
    ``channels = [in, *hidden, out]`` (mace-torch's ``RadialMLP``, used by its non-linear
    interaction block; the modules sit in ``net`` under mace-torch's indices)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Linear(int(a), int(b), bias=True))
            if k < len(channels) - 2:
                layers += [nn.LayerNorm(int(b)), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
