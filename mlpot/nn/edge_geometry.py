r"""The edge geometry of one forward pass, computed once and shared by every layer.

For edge vectors :math:`\vec r_e` (``(E, 3)``, ``D = pos[j] - pos[i] + S @ cell``):

* ``lengths`` :math:`r_e = |\vec r_e|` (``(E, 1)``);
* ``sh`` :math:`Y_{lm}(\hat r_e)`, e3nn's real basis, "component" normalization, ``l <= lmax_sh``;
* ``radial`` :math:`b_n(r_e) f(r_e)`: the Bessel basis times the polynomial cutoff envelope
  (:class:`mlpot.nn.radial.RadialEmbeddingBlock` or :class:`~mlpot.nn.radial.BesselRadial`), and
  the envelope :math:`f(r_e)` alone when asked;
* ``rotation`` and ``wigner``: the edge frames :math:`R_e` (:func:`mlpot.o3.wigner.edge_rotation`)
  and their Wigner blocks :math:`D^l(R_e)`, ``l <= frames_lmax``, only when a layer reads them.

With ``backend: triton`` the spherical harmonics and the radial basis come from one fused
kernel (registry op ``edge_embedding``); its reference is :func:`reference_edge_embedding`.
"""
from __future__ import annotations

import torch

from mlpot.o3.backend import check_backend, implementation, select_backend
from mlpot.o3.message_passing import EdgeGeometry
from mlpot.o3.wigner import edge_rotation, wigner_D_list

__all__ = ["EdgeGeometry", "build_edge_geometry", "check_edge_geometry_backend", "reference_edge_embedding"]


def reference_edge_embedding(vec: torch.Tensor, lmax: int, freqs=None, r_max: float = 1.0, p: int = 5):
    """Torch reference of the op ``edge_embedding``: ``(Y (E, (lmax+1)^2), R (E, num_basis))``.

    ``Y``: e3nn "component" spherical harmonics; ``R_n = sqrt(2 / r_max) sin(freqs_n r) / r * f(r / r_max)``
    with the polynomial envelope of order ``p`` (:class:`mlpot.nn.radial.PolynomialCutoff`).
    """
    from e3nn import o3

    from mlpot.nn.radial import BesselRadial

    Y = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="component")
    if freqs is None:
        return Y, vec.new_zeros(vec.shape[0], 0)
    return Y, BesselRadial(freqs, r_max, p)(vec.norm(dim=-1, keepdim=True))


def check_edge_geometry_backend(backend: str) -> None:
    """Build-time check that ``backend`` can compute the edge embedding."""
    check_backend("edge_embedding", backend)


def build_edge_geometry(
    vectors: torch.Tensor,
    spherical_harmonics=None,
    radial_embedding=None,
    frames_lmax: int | None = None,
    backend: str = "reference",
    envelope: bool = False,
) -> EdgeGeometry:
    """One :class:`EdgeGeometry` for all layers.

    Args:
        vectors: ``(E, 3)`` edge vectors.
        spherical_harmonics: a module ``(E, 3) -> (E, (lmax+1)^2)`` (e.g. e3nn's
            ``o3.SphericalHarmonics``, normalized, "component"), or None when no layer reads them.
        radial_embedding: a :class:`~mlpot.nn.radial.RadialEmbeddingBlock` or
            :class:`~mlpot.nn.radial.BesselRadial` (``lengths -> radial``, and
            ``edge_embedding_args()`` for the fused kernel), or None.
        frames_lmax: largest Wigner degree the layers need, or None for no edge frames.
        backend: ``reference | triton | auto``; ``triton`` computes ``radial`` (and ``sh`` when
            asked for) in the fused kernel.
        envelope: also keep the cutoff envelope ``f(r)`` (``(E, 1)``, torch; on the reference path
            the tensor the radial basis was multiplied by).
    """
    lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
    sh = radial = env = None
    fused = (
        radial_embedding is not None
        and vectors.shape[0] > 0
        and backend != "reference"
        and select_backend("edge_embedding", backend, vectors.device) == "triton"
    )
    if fused:
        num_basis, r_max, p, freqs = radial_embedding.edge_embedding_args()
        lmax = 0 if spherical_harmonics is None else int(spherical_harmonics.irreps_out.lmax)
        sh, radial = implementation("edge_embedding", "triton")(
            vectors.contiguous(), lmax, num_basis, r_max, p, freqs=freqs
        )
        if spherical_harmonics is None:
            sh = None  # the radial basis alone (the kernel's l = 0 row is the constant 1)
        if envelope:
            env = radial_embedding.envelope(lengths)
    else:
        if spherical_harmonics is not None:
            sh = spherical_harmonics(vectors)
        if radial_embedding is not None and envelope:
            radial, env = radial_embedding.radial_and_envelope(lengths)
        elif radial_embedding is not None:
            radial = radial_embedding(lengths)
    rotation = wigner = None
    if frames_lmax is not None:
        rotation = edge_rotation(vectors)
        wigner = wigner_D_list(int(frames_lmax), rotation)
    return EdgeGeometry(vectors=vectors, lengths=lengths, sh=sh, radial=radial, envelope=env, rotation=rotation,
                        wigner=wigner)
