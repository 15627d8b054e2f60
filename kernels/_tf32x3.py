r"""The float32 arithmetic of ``tl.dot(..., input_precision="tf32x3")`` on tensor cores, as a model
in torch, and its error bound.

TF32 keeps float32's 8-bit exponent and 10 of its 23 mantissa bits; :func:`tf32_round` rounds to
nearest even at that width, so ``|tf32(a) - a| <= 2^-11 |a|``. tf32x3 splits each float32 operand
into a head and a tail, ``a_h = tf32(a)``, ``a_t = tf32(a - a_h)`` (``a - a_h`` is exact in float32,
and ``|a - a_h - a_t| <= 2^-22 |a|``), and computes

    a . b  ~  a_h . b_h + a_h . b_t + a_t . b_h

on tensor cores, accumulating in float32. Each TF32 x TF32 product is exact in float32 (11-bit by
11-bit significands). The dropped ``a_t b_t`` and the two tails' roundings each cost at most
``2^-22 |a_k b_k|`` per term, and a length-``K`` float32 accumulation at most ``K u |a_k b_k|`` per
term with ``u = 2^-23`` (tensor cores may truncate instead of rounding, so the unit is
``2^-23``, not ``2^-24``). Hence, for ``c = a . b`` of length ``K``,

    |c~ - c| <= (3 * 2^-22 + K * 2^-23) * sum_k |a_k| |b_k|            (:func:`dot_error_unit`)

against plain TF32's ``2^-10`` (one head product), which float32 force tests would see.

:func:`tf32x3_matmul` evaluates ``a @ b`` with exactly the split above (heads and tails rounded as
the hardware rounds them, each partial product accumulated in float32), so the bound can be tested
on a CPU, where the Triton interpreter computes every ``tl.dot`` in plain float32.
"""
import torch

#: float32 unit of the tensor-core accumulation (truncation allowed)
ACC_UNIT = 2.0 ** -23
#: per-term error of the three-product split (dropped tail x tail, two rounded tails)
SPLIT_UNIT = 3 * 2.0 ** -22


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32 (10 mantissa bits), to nearest even; inf and nan unchanged."""
    if x.dtype != torch.float32:
        raise TypeError(f"tf32_round takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = (bits + ((bits >> 13) & 1) + 0xFFF) & 0xFFFFE000
    out = torch.where(special, bits, rounded)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)
    return out.view(torch.float32)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor, terms: int = 3) -> torch.Tensor:
    """``a @ b`` (float32) as tf32x3 computes it: ``a_h b_h + a_h b_t + a_t b_h`` with float32
    accumulation. ``terms=1`` gives plain TF32 (``a_h b_h``), for comparison."""
    ah, bh = tf32_round(a), tf32_round(b)
    out = ah @ bh
    if terms == 3:
        at, bt = tf32_round(a - ah), tf32_round(b - bh)
        out = out + ah @ bt + at @ bh
    return out


def dot_error_unit(K: int) -> float:
    """The relative unit of a tf32x3 dot of length ``K``: ``|c~ - c| <= unit * sum_k |a_k b_k|``."""
    return SPLIT_UNIT + int(K) * ACC_UNIT


__all__ = ["ACC_UNIT", "SPLIT_UNIT", "dot_error_unit", "tf32_round", "tf32x3_matmul"]
