"""Launch helpers shared by the kernels.

Triton decides at decoration time whether a ``@triton.jit`` function runs compiled (GPU) or on its
CPU interpreter (``TRITON_INTERPRET=1``). :class:`LazyKernel` delays the decoration to the first
launch, so importing ``mlpot.kernels`` before the environment variable is set (by a test module, in
any process order) still gives interpreter kernels later. On a GPU it wraps the kernel in
``triton.autotune`` over the given configs (duplicates removed); under the interpreter it launches
one config, the first unless :func:`interpreter_config` picks another (tests walk through all of
them; autotuning there would only burn CPU time).
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

# Active launch recorders: (list the launches go to, whether the launches still run).
_RECORDERS: list[tuple[list, bool]] = []


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Collect ``(LazyKernel, args, kwargs)`` for every launch inside the block: ``args``/``kwargs``
    as the caller passed them, without the config's constexprs. With ``execute=False`` the
    kernels are not run (their outputs keep whatever they were allocated with): enough to learn
    which kernel variants a model launches, as the ahead-of-time compile check
    (:mod:`mlpot.bench.aot`) does."""
    launches: list = []
    entry = (launches, bool(execute))
    _RECORDERS.append(entry)
    try:
        yield launches
    finally:
        _RECORDERS.remove(entry)


@contextlib.contextmanager
def count_launches():
    """Launches inside the block by kernel function name: a ``Counter``, filled when the block
    ends (tests use it to assert that a model ran its own kernels)."""
    counts: Counter = Counter()
    with record_launches(execute=True) as launches:
        yield counts
    counts.update(kernel.fn.__name__ for kernel, _, _ in launches)


def _recorded(kernel, args, kwargs) -> bool:
    """Hand a launch to the recorders; True when one of them asks not to run it."""
    for launches, _ in _RECORDERS:
        launches.append((kernel, args, kwargs))
    return not all(execute for _, execute in _RECORDERS)


# Config index launched under the interpreter (None: the first); see interpreter_config.
_INTERPRETER_CONFIG: list = [None]


@contextlib.contextmanager
def interpreter_config(index: int):
    """Under the interpreter, launch every kernel with its config ``index`` (modulo its number of
    configs) instead of the first, so that tests can run each autotune config."""
    _INTERPRETER_CONFIG.append(int(index))
    try:
        yield
    finally:
        _INTERPRETER_CONFIG.pop()


def dedupe_configs(configs) -> list:
    """``configs`` without repeats, first occurrence kept (the autotuner would time a repeat twice)."""
    seen, out = set(), []
    for meta, warps, stages in configs:
        key = (tuple(sorted(meta.items())), warps, stages)
        if key not in seen:
            seen.add(key)
            out.append((dict(meta), warps, stages))
    return out


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _interpreted_stdlib() -> None:
    """Make triton.language's own ``@jit`` helpers (``tl.sum``, ``tl.zeros``, ...) interpretable.

    They are decorated when ``triton.language`` is first imported; if that happened before
    ``TRITON_INTERPRET=1`` was set (e.g. a library imported triton first), they are compiled-mode
    ``JITFunction`` objects that the interpreter refuses to call. Rebind them, once, to interpreted
    wrappers of the same Python functions. Only done when kernels run on the interpreter.
    """
    import triton.language as tl_
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    mods = [tl_, std, tl_.core]
    if not any(isinstance(v, JITFunction) for m in mods for v in vars(m).values()):
        return
    wrapped: dict[int, object] = {}
    for mod in mods:
        for name, val in list(vars(mod).items()):
            if isinstance(val, JITFunction):
                if id(val) not in wrapped:
                    wrapped[id(val)] = InterpretedFunction(val.fn)
                setattr(mod, name, wrapped[id(val)])


class LazyKernel:
    """``LazyKernel(fn, configs, key)[grid](*args)``: a jit-on-first-use Triton kernel.

    ``configs`` is a list of ``(meta: dict, num_warps, num_stages)``; ``meta`` holds the constexpr
    block sizes chosen by autotuning. ``grid`` may be a callable of ``meta``.
    """

    def __init__(self, fn, configs=None, key=()):
        self.fn = fn
        self.configs = dedupe_configs(configs or [({}, 4, 2)])
        self.key = list(key)
        self._built: dict[bool, object] = {}

    def _build(self, interp: bool):
        import triton

        if interp:
            _interpreted_stdlib()
        if interp not in self._built:
            jitted = triton.jit(self.fn)
            if not interp and len(self.configs) > 1:
                cfgs = [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in self.configs]
                jitted = triton.autotune(configs=cfgs, key=self.key)(jitted)
            self._built[interp] = jitted
        return self._built[interp]

    def __getitem__(self, grid):
        interp = interpret_mode()
        kernel = self._build(interp)
        if interp or len(self.configs) == 1:
            pick = _INTERPRETER_CONFIG[-1] if interp else None
            meta, warps, stages = self.configs[0 if pick is None else pick % len(self.configs)]

            def launch(*args, **kwargs):
                if _RECORDERS and _recorded(self, args, kwargs):
                    return None
                g = grid(meta) if callable(grid) else grid
                extra = {} if interp else {"num_warps": warps, "num_stages": stages}
                return kernel[g](*args, **meta, **kwargs, **extra)

            return launch

        def launch_tuned(*args, **kwargs):
            if _RECORDERS and _recorded(self, args, kwargs):
                return None
            return kernel[grid](*args, **kwargs)

        return launch_tuned


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpret_mode():
            raise RuntimeError(
                "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"got a tensor on {t.device}"
            )


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``: ``"tf32x3"`` for float32,
    ``"ieee"`` otherwise.

    tf32x3 runs on tensor cores (``mma``/``wgmma``): each float32 operand is split into a TF32 head
    and a TF32 tail, ``a = a_h + a_t`` with ``|a_t| <= 2^-11 |a|``, and ``a b`` is computed as
    ``a_h b_h + a_h b_t + a_t b_h`` with float32 accumulation. The dropped ``a_t b_t`` and the
    rounding of the tails give a relative error of at most about ``3 * 2^-22 ~ 7e-7`` per product,
    so a length-``K`` dot product is off by at most ``(3 * 2^-22 + K * 2^-24) * sum_k |a_k b_k|``
    (``K * 2^-24`` is plain float32 accumulation, the same as ``ieee``). Plain TF32 would be
    ``2^-11 ~ 5e-4``, which fp32 force tests would see.
    """
    return "tf32x3" if dtype == torch.float32 else "ieee"


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def channel_block(C: int, cap: int = 128) -> int:
    return max(1, min(cap, next_pow2(C)))


try:
    import triton.language as tl
except Exception:  # noqa: BLE001  # pragma: no cover - without triton the kernels are defined but never launched

    class _NoTriton:
        constexpr = object

    tl = _NoTriton()


def reference_vjp(fn, primals, cotangents):
    """Partial derivatives of ``<cotangents, fn(*primals)>`` with respect to each of ``primals``.

    This is how a kernel's backward (or double backward) differentiates its torch reference. The
    primals are treated as independent variables. ``torch.autograd.grad`` on the saved tensors
    would instead return total derivatives: the upstream gradient of a force loss depends on the
    kernel's own inputs through the rest of the model, so that path would be counted once here and
    once more by the autograd engine. ``torch.func.vjp`` differentiates at its own level, and the
    result stays differentiable, to any order, with respect to ``primals``, ``cotangents`` and
    whatever produced them.
    """
    _, vjp_fn = torch.func.vjp(fn, *primals)
    return vjp_fn(cotangents)


def multilinear_form_backward(roles, role, saved, grad, needs_input_grad, apply):
    """Backward of one partial derivative of a multilinear form ``F(a, b, ...)``.

    An op computes ``dF/d(role)`` (the operand ``role`` absent); the gradient of
    ``<grad, dF/d(role)>`` with respect to another operand ``k`` is ``dF/dk`` with ``grad`` in
    place of ``role``. ``saved`` are the operands in ``roles`` order (``role``'s entry None),
    ``apply(k, *operands)`` runs the op for ``dF/dk`` (operand ``k`` passed as None). Returns one
    gradient (or None) per operand, so the ops are differentiable to any order on themselves.
    """
    ops = dict(zip(roles, saved))
    ops[role] = grad
    grads = []
    for k, need in zip(roles, needs_input_grad):
        if need and k != role:
            args = dict(ops)
            args[k] = None
            grads.append(apply(k, *(args[r] for r in roles)))
        else:
            grads.append(None)
    return grads
