r"""The message tensor product and the product basis a model selects by config name.

``make_message_tp(kind, irreps_in, lmax_sh, irreps_out_target, backend="reference", method="grid", mmax=None)``
    The edge (message) tensor product, a :class:`mlpot.o3.message_passing.MessageTensorProduct`:

    * ``kind="cg"``: channelwise Clebsch-Gordan product
      (:class:`mlpot.o3.tensor_product.ChannelwiseTensorProduct`), the MACE default.
    * ``kind="gaunt"``: Gaunt product (:class:`mlpot.o3.gaunt.GauntMessageTP`), the product of
      the two spherical functions on the sphere (parity-even paths only), ``method`` ``"grid"``
      (Gauss-Legendre x uniform grid) or ``"fourier"`` (2D Fourier on the torus).
    * ``kind="so2"``: SO(2)-reduced convolution in the edge frames
      (:class:`mlpot.o3.so2.SO2MessageTP`); ``mmax`` (default: no truncation, the largest degree
      involved) keeps only :math:`|m| \le m_{max}` in the edge frame.

``make_product_basis(kind, irreps_in, irreps_out, correlation, num_elements, backend="reference", method="grid", basis_sizes=None)``
    The many-body product basis, a :class:`mlpot.o3.product_basis.ProductBasis`:
    ``"symmetric"`` (:class:`mlpot.o3.symmetric_contraction.SymmetricContraction`, MACE's) or
    ``"gaunt"`` (:class:`mlpot.o3.gaunt.GauntProductBasis`, ``method`` as above).

Every option is a constructor argument checked when the module is built: an unknown ``kind``,
an option that does not apply to it (``mmax`` for a Gaunt product, ``method`` for CG), or a
backend the registry (:mod:`mlpot.o3.backend`) has no implementation for is a
:class:`mlpot.errors.ConfigError`.
"""
from __future__ import annotations

from e3nn import o3

from mlpot.errors import ConfigError
from mlpot.o3.gaunt import GauntMessageTP, GauntProductBasis
from mlpot.o3.message_passing import MessageTensorProduct
from mlpot.o3.product_basis import ProductBasis
from mlpot.o3.so2 import SO2MessageTP
from mlpot.o3.symmetric_contraction import SymmetricContraction
from mlpot.o3.tensor_product import ChannelwiseTensorProduct

__all__ = ["GAUNT_METHODS", "MESSAGE_TP_KINDS", "PRODUCT_BASIS_KINDS", "make_message_tp", "make_product_basis"]

MESSAGE_TP_KINDS = ("cg", "gaunt", "so2")
PRODUCT_BASIS_KINDS = ("symmetric", "gaunt")
GAUNT_METHODS = ("grid", "fourier")


def _check_method(method, kind: str, what: str) -> None:
    if kind == "gaunt":
        if method not in (None, *GAUNT_METHODS):
            raise ConfigError(f"{what} gaunt: method must be one of {', '.join(GAUNT_METHODS)}, got {method!r}")
    elif method not in (None, "grid"):
        raise ConfigError(f"{what} {kind!r} has no `method` option (got {method!r}); it applies to 'gaunt'")


def make_message_tp(
    kind: str,
    irreps_in,
    lmax_sh: int,
    irreps_out_target,
    backend: str = "reference",
    method: str | None = None,
    mmax: int | None = None,
) -> MessageTensorProduct:
    """Edge tensor product of sender features and edge geometry (see module doc)."""
    kind = str(kind).lower()
    irreps_in, irreps_out_target, lmax_sh = o3.Irreps(irreps_in), o3.Irreps(irreps_out_target), int(lmax_sh)
    if kind not in MESSAGE_TP_KINDS:
        raise ConfigError(f"unknown message tensor product {kind!r}; choose one of {', '.join(MESSAGE_TP_KINDS)}")
    _check_method(method, kind, "interaction_tp")
    if mmax is not None and kind != "so2":
        raise ConfigError(f"interaction_tp {kind!r} has no `mmax` option (got {mmax!r}); it applies to 'so2'")
    if kind == "cg":
        return ChannelwiseTensorProduct(irreps_in, o3.Irreps.spherical_harmonics(lmax_sh), irreps_out_target, backend=backend)
    if kind == "gaunt":
        return GauntMessageTP(irreps_in, lmax_sh, irreps_out_target, method=method or "grid", backend=backend)
    if mmax is None:
        mmax = max([ir.l for _, ir in irreps_in] + [ir.l for _, ir in irreps_out_target] + [lmax_sh])
    return SO2MessageTP(irreps_in, lmax_sh, irreps_out_target, mmax=mmax, backend=backend)


def make_product_basis(
    kind: str,
    irreps_in,
    irreps_out,
    correlation: int,
    num_elements: int,
    backend: str = "reference",
    method: str | None = None,
    basis_sizes=None,
) -> ProductBasis:
    """Many-body product basis on nodes (see module doc)."""
    kind = str(kind).lower()
    if kind not in PRODUCT_BASIS_KINDS:
        raise ConfigError(f"unknown product basis {kind!r}; choose one of {', '.join(PRODUCT_BASIS_KINDS)}")
    _check_method(method, kind, "product")
    if kind == "symmetric":
        return SymmetricContraction(
            irreps_in, irreps_out, int(correlation), int(num_elements), basis_sizes=basis_sizes, backend=backend
        )
    if basis_sizes is not None:
        raise ConfigError("product 'gaunt' has no coupling basis sizes (product_basis_sizes is for 'symmetric')")
    return GauntProductBasis(
        irreps_in, irreps_out, correlation=int(correlation), num_elements=int(num_elements), method=method or "grid",
        backend=backend,
    )
