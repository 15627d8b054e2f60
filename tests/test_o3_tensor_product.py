"""ChannelwiseTensorProduct: equals e3nn's uvu TensorProduct (values, weight layout, gradients)."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3

from mlpot.o3 import grouped_message_passing
from mlpot.o3.message_passing import EdgeGeometry
from mlpot.o3.tensor_product import (
    ChannelwiseTensorProduct,
    channel_last_to_mul_ir,
    channelwise_instructions,
    mul_ir_to_channel_last,
)
from mlpot.testing.equivariance import D_from_matrix, rand_reflection, rand_rotation


def _sh_geometry(y):
    """An edge geometry holding only the (here arbitrary) edge attributes ``y``."""
    return EdgeGeometry(vectors=y.new_zeros(y.shape[0], 3), lengths=y.new_zeros(y.shape[0], 1), sh=y)


CASES = [
    ("5x0e", 3, "5x0e+5x1o+5x2e+5x3o"),  # MACE first layer
    ("4x0e+4x1o", 3, "4x0e+4x1o+4x2e+4x3o"),  # MACE second layer
    ("3x0e+3x1o+3x2e", 2, "3x0e+3x1o+3x2e+3x1e+3x0o"),  # odd-parity outputs too
    ("2x0e+2x0o+2x1o+2x1e", 2, "0e+0o+1o+1e+2e+2o"),  # unnatural parities
    ("3x0e+2x1o", 2, "1x0e+1x1o+1x2e"),  # unequal multiplicities: generic path
]


def _e3nn_reference(tp: ChannelwiseTensorProduct):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its CG constants in the default dtype
    try:
        return o3.TensorProduct(
            tp.irreps_in1,
            tp.irreps_in2,
            tp.irreps_out,
            [(i1, i2, io, "uvu", True) for i1, i2, io in tp.instructions],
            shared_weights=False,
            internal_weights=False,
        )
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("irreps_in, lmax, target", CASES)
def test_matches_e3nn(irreps_in, lmax, target):
    sh = o3.Irreps.spherical_harmonics(lmax)
    tp = ChannelwiseTensorProduct(irreps_in, sh, target)
    ref = _e3nn_reference(tp)
    assert tp.weight_numel == ref.weight_numel
    E = 17
    x = torch.randn(E, tp.irreps_in1.dim, dtype=torch.float64)
    y = torch.randn(E, sh.dim, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64)
    torch.testing.assert_close(tp(x, y, w), ref(x, y, w), atol=1e-10, rtol=0)


def test_instructions_like_mace():
    """Output blocks sorted by irrep, one block per path, instructions sorted by output block."""
    irreps_out, ins = channelwise_instructions("4x0e+4x1o", o3.Irreps.spherical_harmonics(2), "4x0e+4x1o+4x2e")
    assert str(irreps_out) == "4x0e+4x0e+4x1o+4x1o+4x1o+4x2e+4x2e"
    assert [i[2] for i in ins] == list(range(len(ins)))
    assert sorted(ins) == [(0, 0, 0), (0, 1, 2), (0, 2, 5), (1, 0, 3), (1, 1, 1), (1, 1, 6), (1, 2, 4)]


@pytest.mark.parametrize("grouping", ["edge", "receiver"])
@pytest.mark.parametrize("irreps_in, lmax, target", CASES[1:])
def test_message_passing_and_gradients(irreps_in, lmax, target, grouping, monkeypatch):
    """gather + product + scatter, and its first and second derivatives, equal e3nn's (edge order,
    and grouped by receiver over several node chunks)."""
    monkeypatch.setattr(grouped_message_passing, "SLOTS_PER_CHUNK", 5)
    sh = o3.Irreps.spherical_harmonics(lmax)
    tp = ChannelwiseTensorProduct(irreps_in, sh, target)
    tp.chunk_size = 7  # several chunks
    tp.grouping = grouping
    ref = _e3nn_reference(tp)
    N, E = 6, 23
    g = torch.Generator().manual_seed(1)
    snd = torch.randint(0, N, (E,), generator=g)
    rcv = torch.randint(0, N, (E,), generator=g)
    x = torch.randn(N, tp.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(E, sh.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64, requires_grad=True)
    a = tp.message_passing(x, _sh_geometry(y), w, snd, rcv, N)
    b = torch.zeros(N, ref.irreps_out.dim, dtype=torch.float64).index_add(0, rcv, ref(x[snd], y, w))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    cot = torch.randn_like(a)
    # without a graph (inference: the grouped backward reuses the forward's chunks and products)
    g0 = torch.autograd.grad((tp.message_passing(x, _sh_geometry(y), w, snd, rcv, N) * cot).sum(), [x, y, w])
    ga = torch.autograd.grad((a * cot).sum(), [x, y, w], create_graph=True)
    gb = torch.autograd.grad((b * cot).sum(), [x, y, w], create_graph=True)
    for p0, p, q in zip(g0, ga, gb):
        torch.testing.assert_close(p0, q, atol=1e-10, rtol=0)
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    # second order: a scalar function of the gradients (what force training differentiates)
    ha = sum((p * torch.cos(p)).sum() for p in ga)
    hb = sum((p * torch.cos(p)).sum() for p in gb)
    for p, q in zip(torch.autograd.grad(ha, [x, y, w]), torch.autograd.grad(hb, [x, y, w])):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-10)


@pytest.mark.parametrize("grouping", ["edge", "receiver"])
def test_gradgradcheck_small(grouping):
    sh = o3.Irreps.spherical_harmonics(1)
    tp = ChannelwiseTensorProduct("1x0e+1x1o", sh, "1x0e+1x1o")
    tp.chunk_size = 2
    tp.grouping = grouping
    N, E = 2, 3
    snd, rcv = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    x = torch.randn(N, tp.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(E, sh.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64, requires_grad=True)

    def f(x, y, w):
        return tp.message_passing(x, _sh_geometry(y), w, snd, rcv, N)

    assert torch.autograd.gradcheck(f, (x, y, w))
    assert torch.autograd.gradgradcheck(f, (x, y, w))


@pytest.mark.parametrize("improper", [False, True])
def test_equivariance(improper):
    sh = o3.Irreps.spherical_harmonics(3)
    tp = ChannelwiseTensorProduct("3x0e+3x1o+3x2e", sh, "3x0e+3x1o+3x2e+3x3o")
    E = 9
    x = torch.randn(E, tp.irreps_in1.dim, dtype=torch.float64)
    vec = torch.randn(E, 3, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64)
    R = rand_reflection() if improper else rand_rotation()

    def run(x, vec):
        return tp(x, o3.spherical_harmonics(sh, vec, True, normalization="component"), w)

    out = run(x, vec)
    rotated = run(x @ D_from_matrix(tp.irreps_in1, R).T, vec @ R.T)
    torch.testing.assert_close(rotated, out @ D_from_matrix(tp.irreps_out, R).T, atol=1e-10, rtol=0)


def test_layout_roundtrip_and_empty_graph():
    irreps = o3.Irreps("3x0e+3x1o+3x2e")
    x = torch.randn(4, irreps.dim, dtype=torch.float64)
    torch.testing.assert_close(channel_last_to_mul_ir(mul_ir_to_channel_last(x, irreps), irreps), x)
    tp = ChannelwiseTensorProduct(irreps, o3.Irreps.spherical_harmonics(1), "3x0e+3x1o")
    empty = torch.zeros(0, dtype=torch.long)
    out = tp.message_passing(
        x, _sh_geometry(torch.zeros(0, 4, dtype=torch.float64)), torch.zeros(0, tp.weight_numel, dtype=torch.float64),
        empty, empty, 4,
    )
    assert out.shape == (4, tp.irreps_out.dim) and not out.any()


def test_needed_sees_which_gradients_the_running_call_uses():
    """``needed`` is the one place that reads torch's private ``_will_engine_execute_node``: a force
    call (gradient w.r.t. positions only) must skip the weight gradients. If the private API
    disappears or changes, ``needed`` falls back to True and this test fails."""
    from mlpot.o3.grad_needs import grad_node, needed

    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, nodes):
            ctx.nodes = nodes
            return a * b

        @staticmethod
        def backward(ctx, g):
            seen["a"], seen["b"] = (needed(True, n) for n in ctx.nodes)
            return g, g, None

    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def out():
        x, y = a * 2.0, b * 3.0
        return Probe.apply(x, y, (grad_node(x), grad_node(y))).sum()

    torch.autograd.grad(out(), [a])
    assert seen == {"a": True, "b": False}
    torch.autograd.grad(out(), [a, b])
    assert seen == {"a": True, "b": True}


@pytest.mark.parametrize("create_graph", [False, True])
def test_grouped_identity_slot_table(create_graph, monkeypatch):
    """Edges sorted by receiver with equal in-degrees: the slot table is the identity and the
    grouped path reads ``Y``/``w`` and writes ``gY``/``gw`` in edge order, without the gathers.
    Same values, gradients and (when the backward builds a graph) second derivatives as the same
    graph with its edges shuffled (gathered through the slot table) and as the edge order."""
    monkeypatch.setattr(grouped_message_passing, "SLOTS_PER_CHUNK", 7)  # several node chunks
    sh = o3.Irreps.spherical_harmonics(2)
    tp = ChannelwiseTensorProduct("3x0e+3x1o", sh, "3x0e+3x1o+3x2e")
    N, deg = 5, 3
    g = torch.Generator().manual_seed(3)
    rcv = torch.arange(N).repeat_interleave(deg)
    snd = torch.randint(0, N, (rcv.shape[0],), generator=g)
    perm = torch.randperm(rcv.shape[0], generator=g)
    assert grouped_message_passing.ReceiverGroups(snd, rcv, N, torch.float64).identity
    assert not grouped_message_passing.ReceiverGroups(snd[perm], rcv[perm], N, torch.float64).identity
    x = torch.randn(N, tp.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    y = torch.randn(rcv.shape[0], sh.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rcv.shape[0], tp.weight_numel, dtype=torch.float64, requires_grad=True)
    results = []
    for grouping, order in (("receiver", slice(None)), ("receiver", perm), ("edge", slice(None))):
        tp.grouping = grouping
        out = tp.message_passing(x, _sh_geometry(y[order]), w[order], snd[order], rcv[order], N)
        cot = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads = torch.autograd.grad((out * cot).sum(), [x, y, w], create_graph=create_graph)
        if create_graph:
            grads += torch.autograd.grad(sum((p * torch.sin(p)).sum() for p in grads), [x, y, w])
        results.append((out, *grads))
    for other in results[1:]:
        for p, q in zip(results[0], other):
            torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
