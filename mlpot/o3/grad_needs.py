"""Which gradients a running backward pass will use: lets a custom autograd function skip the
ones nobody asked for (a force call needs no weight gradient).

Shared by the message passing (:mod:`mlpot.o3.tensor_product`,
:mod:`mlpot.o3.grouped_message_passing`) and the symmetric contraction.
"""
from __future__ import annotations

import torch


def grad_node(t: torch.Tensor):
    """The autograd node that receives the gradient of ``t`` (None when ``t`` needs none)."""
    if not t.requires_grad:
        return None
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]  # a leaf's AccumulateGrad


def needed(flag: bool, node) -> bool:
    """Inside a backward: is this input's gradient used by the running ``backward``/``grad`` call?

    ``ctx.needs_input_grad`` only says that an input requires grad; a force call
    (``autograd.grad(E, positions)``) does not need the gradients w.r.t. the weights, which
    built-in ops skip and custom functions should too.

    The only use of torch's private ``torch._C._will_engine_execute_node`` in mlpot; without it
    the answer is True (correct, only slower). ``tests/test_o3_tensor_product.py`` fails if the
    private API stops answering.
    """
    if not flag:
        return False
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True
