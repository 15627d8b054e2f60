r"""Equivariance and gradient checks for ops and models.

An op :math:`f` with input representation :math:`D_{in}` and output :math:`D_{out}` is
O(3)-equivariant when :math:`f(D_{in}(g)\, x) = D_{out}(g)\, f(x)` for every orthogonal
matrix :math:`g` (rotations and reflections). :func:`assert_equivariant` checks this in
float64 for random rotations *and* reflections, using e3nn's ``Irreps.D_from_matrix`` as the
independent reference for :math:`D` (so the op's own Wigner-D code is not trusted by the test).

Typical use::

    from mlpot.testing import assert_equivariant
    assert_equivariant(lambda x, v, w: op(x, v, w),
                       irreps_in=["4x0e+2x1o", "1o", None],   # None: invariant input (weights)
                       irreps_out="4x0e+2x1o",
                       inputs=[x, vectors, weights])
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "D_from_matrix",
    "assert_equivariant",
    "assert_gradcheck",
    "assert_gradgradcheck",
    "equivariance_error",
    "rand_orthogonal",
    "rand_reflection",
    "rand_rotation",
]


def rand_rotation(n: int | None = None, dtype=torch.float64, device=None, generator=None) -> torch.Tensor:
    """Uniform random proper rotations (Haar measure, via unit quaternions), ``(n, 3, 3)`` or ``(3, 3)``."""
    shape = () if n is None else (n,)
    q = torch.randn(shape + (4,), dtype=dtype, device=device, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    )
    return R.reshape(shape + (3, 3))


def rand_reflection(n: int | None = None, dtype=torch.float64, device=None, generator=None) -> torch.Tensor:
    """Random improper orthogonal matrices (det = -1): ``-R`` for a random rotation ``R``."""
    return -rand_rotation(n, dtype, device, generator)


def rand_orthogonal(n: int, dtype=torch.float64, device=None, generator=None) -> torch.Tensor:
    """``n`` random orthogonal matrices, alternating proper / improper (first one proper)."""
    R = rand_rotation(n, dtype, device, generator)
    sign = torch.ones(n, dtype=dtype, device=device)
    sign[1::2] = -1
    return R * sign[:, None, None]


def _matrix_to_angles(R: torch.Tensor):
    """Euler angles of a proper rotation, ``R = R_y(a) R_x(b) R_y(c)`` (e3nn's convention).

    Uses ``atan2`` only (``R y_hat = (sin a sin b, cos b, cos a sin b)``), which keeps float64
    accuracy everywhere; ``acos`` based extraction loses digits near the poles.
    """
    from e3nn import o3

    u = R[..., :, 1]
    b = torch.atan2(torch.sqrt(u[..., 0] ** 2 + u[..., 2] ** 2), u[..., 1])
    a = torch.atan2(u[..., 0], u[..., 2])
    M = o3.matrix_x(b).transpose(-1, -2) @ o3.matrix_y(a).transpose(-1, -2) @ R  # = R_y(c)
    c = torch.atan2(M[..., 0, 2], M[..., 0, 0])
    return a, b, c


def D_from_matrix(irreps, R: torch.Tensor) -> torch.Tensor:
    """Representation matrix of an e3nn irreps string for orthogonal ``R`` (e3nn's ``D_from_angles``).

    ``R`` may be improper: ``D = D(det(R) R) * p**k`` with ``k = 1`` for reflections, as in
    e3nn's ``Irreps.D_from_matrix``. The Euler angles are extracted with ``atan2`` (see
    :func:`_matrix_to_angles`) and e3nn's generators are built in ``R.dtype`` (it uses the
    default dtype), so a float64 check is float64-accurate.
    """
    from e3nn import o3

    old = torch.get_default_dtype()
    torch.set_default_dtype(R.dtype)
    try:
        d = torch.det(R).sign()
        k = (1 - d) / 2
        angles = _matrix_to_angles(d[..., None, None] * R)
        return o3.Irreps(irreps).D_from_angles(*angles, k)
    finally:
        torch.set_default_dtype(old)


def _transform(x: torch.Tensor, irreps, R: torch.Tensor) -> torch.Tensor:
    if irreps is None:
        return x
    D = D_from_matrix(irreps, R).to(dtype=x.dtype, device=x.device)
    if x.shape[-1] != D.shape[-1]:
        raise AssertionError(f"tensor last dim {x.shape[-1]} does not match irreps {irreps} (dim {D.shape[-1]})")
    return x @ D.T


def _is_single(v) -> bool:
    from e3nn import o3

    return v is None or isinstance(v, (str, o3.Irreps, o3.Irrep)) or not isinstance(v, (list, tuple))


def _as_list(v):
    return [v] if _is_single(v) else list(v)


def equivariance_error(
    fn: Callable,
    irreps_in,
    irreps_out,
    inputs: Sequence[torch.Tensor] | None = None,
    n_matrices: int = 4,
    batch: int = 5,
    generator: torch.Generator | None = None,
) -> float:
    """Largest ``|f(D_in x) - D_out f(x)| / max(1, max|f(x)|)`` over random rotations and reflections.

    The error is relative to the output's scale once that exceeds 1, so that high-degree outputs
    (whose Wigner-D matrices carry ~1e-11 relative round-off) are held to the same standard.

    ``irreps_in``/``irreps_out``: one irreps (str/Irreps) or a list, one per positional input /
    output; ``None`` marks an invariant tensor of any shape (passed unchanged). Missing inputs
    are drawn as ``randn(batch, dim)`` in float64 (``None`` entries then need ``inputs``).
    """
    from e3nn import o3

    ins = _as_list(irreps_in)
    outs = _as_list(irreps_out)
    single_out = _is_single(irreps_out)
    if inputs is None:
        if any(ir is None for ir in ins):
            raise ValueError("equivariance_error: invariant (None) inputs need explicit `inputs`")
        inputs = [torch.randn(batch, o3.Irreps(ir).dim, dtype=torch.float64, generator=generator) for ir in ins]
    inputs = list(inputs)
    if len(inputs) != len(ins):
        raise ValueError(f"{len(inputs)} inputs for {len(ins)} irreps_in entries")
    Rs = rand_orthogonal(n_matrices, generator=generator)
    y = fn(*inputs)
    y = [y] if single_out else list(y)
    err = 0.0
    for R in Rs:
        y_rot_in = fn(*[_transform(x, ir, R) for x, ir in zip(inputs, ins)])
        y_rot_in = [y_rot_in] if single_out else list(y_rot_in)
        for a, b, ir in zip(y_rot_in, y, outs):
            if a.numel():
                scale = max(1.0, b.abs().max().item())
                err = max(err, (a - _transform(b, ir, R)).abs().max().item() / scale)
    return err


def assert_equivariant(fn: Callable, irreps_in, irreps_out, inputs=None, atol: float = 1e-10, **kwargs) -> float:
    """Assert :func:`equivariance_error` ``<= atol`` (default 1e-10, meant for float64); returns it."""
    err = equivariance_error(fn, irreps_in, irreps_out, inputs, **kwargs)
    assert err <= atol, f"equivariance error {err:.3e} > {atol:.1e}"
    return err


def _prep(inputs):
    out = []
    for x in inputs:
        if torch.is_tensor(x) and x.is_floating_point():
            x = x.detach().to(torch.float64).requires_grad_(True)
        out.append(x)
    return tuple(out)


def assert_gradcheck(fn: Callable, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    """``torch.autograd.gradcheck`` in float64 on every floating input; raises on failure."""
    assert torch.autograd.gradcheck(fn, _prep(inputs), eps=eps, atol=atol, rtol=rtol, raise_exception=True)


def assert_gradgradcheck(fn: Callable, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """``torch.autograd.gradgradcheck`` (second order, as force training needs); raises on failure."""
    assert torch.autograd.gradgradcheck(fn, _prep(inputs), eps=eps, atol=atol, rtol=rtol, raise_exception=True)
