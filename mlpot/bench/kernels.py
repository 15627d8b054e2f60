r"""Microbenchmarks of the Triton kernels against their references (e3nn eager / torch.compile,
our torch references, cuEquivariance when importable).

Kernels (``--kernels``): ``mp`` (fused gather + channelwise uvu TP + scatter, MACE-style paths up
to ``L``), ``sh`` (spherical harmonics + Bessel x cutoff), ``sc`` (symmetric contraction, nu = 3,
synthetic sparse U tensors), ``gaunt`` (S2-grid product), ``so2`` (fused SO(2) message passing).
Modes: ``fwd``, ``fwd+bwd`` (first gradients) and ``double`` (gradient of the squared first
gradients, the work of a force loss). Sizes: ``--lmax``, ``--channels``, ``--edges`` (nodes =
edges / 16). Output: a markdown table (stdout and ``results.md``), ``results.json`` and PNG plots
(time vs L) in ``--out``.

``--roofline`` adds, for the fused message-passing kernel, achieved bandwidth and FLOP/s from
the byte and FLOP counts: bytes = gathered ``x[src]`` (no reuse assumed) + ``Y`` + ``w`` +
output + indices; FLOPs = 3 per (edge, channel, CG entry). On CPU use ``--quick`` (reference paths
and tiny sizes only: it checks that the script works, the numbers mean nothing for a GPU).

    python scripts/bench_kernels.py --quick
    python scripts/bench_kernels.py --device cuda --lmax 1 2 3 4 5 6 --channels 32 64 128 \
        --edges 10000 100000 --roofline --compile
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
from e3nn import o3

from mlpot.o3.backend import kernels_module, resolve_backend

KERNELS = ("mp", "sh", "sc", "gaunt", "so2")
MODES = ("fwd", "fwd+bwd", "double")
# H100 SXM reference peaks (dense, non-tensor-core FP32/FP64) for the roofline fractions
PEAK = {"bandwidth_GBs": 3350.0, "fp32_GFLOPs": 67000.0, "fp64_GFLOPs": 34000.0}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _runner(fn, inputs, mode):
    """A closure running ``fn(*inputs)`` in ``mode``; gradients w.r.t. all float inputs needing grad."""
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if mode == "fwd":
            return
        gs = torch.autograd.grad([o.sum() for o in outs], leaves, create_graph=(mode == "double"))
        if mode == "double":
            torch.autograd.grad(sum((g * g).sum() for g in gs), leaves)

    return run


# ----------------------------------------------------------------------------- problem builders
def uvu_message_irreps(irreps_in, L):
    """(irreps_in, irreps_sh, irreps_out, instructions) of a MACE-style ``uvu`` message: every path
    of ``irreps_in x Y^{0..L}`` into its own output irrep of degree ``<= L``."""
    irreps_in = o3.Irreps(irreps_in)
    irreps_sh = o3.Irreps.spherical_harmonics(L)
    outs, ins = [], []
    for i1, (mul, ir1) in enumerate(irreps_in):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir3 in ir1 * ir2:
                if ir3.l <= L:
                    ins.append((i1, i2, len(outs)))
                    outs.append((mul, ir3))
    return irreps_in, irreps_sh, o3.Irreps(outs), ins


def _mace_irreps(C, L):
    return uvu_message_irreps(o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)]), L)


def _graph(E, device, gen):
    N = max(2, E // 16)
    src = torch.randint(0, N, (E,), generator=gen).to(device)
    dst = torch.randint(0, N, (E,), generator=gen).to(device)
    return N, src, dst


def cuequivariance_status() -> str:
    """``"installed <version>"`` or ``"not installed"`` (the benchmark then skips that column)."""
    import importlib.util

    if importlib.util.find_spec("cuequivariance_torch") is None:
        return "not installed"
    import cuequivariance_torch

    return f"installed {getattr(cuequivariance_torch, '__version__', '?')}"


def _add_cuequivariance_mp(impls, info, irreps_in, irreps_sh, irreps_out, N, src, dst, x, Y, dtype, device, gen):
    """cuEquivariance's channel-wise tensor product with gather (``indices_1``) and scatter
    (``indices_out``), the same message as ours (its output irreps in its own order, and its own
    weight layout: timing only), when the package is installed."""
    info["cuequivariance"] = cuequivariance_status()
    if info["cuequivariance"] == "not installed":
        return
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    try:
        filt = [cue.O3(l, p) for l, p in sorted({(ir.l, ir.p) for _, ir in irreps_out})]
        tp = cuet.ChannelWiseTensorProduct(
            cue.Irreps("O3", str(irreps_in)), cue.Irreps("O3", str(irreps_sh)), filt, layout=cue.mul_ir,
            shared_weights=False, internal_weights=False, device=device, dtype=dtype, math_dtype=dtype)
        w = torch.randn(Y.shape[0], tp.weight_numel, generator=gen, dtype=dtype).to(device).requires_grad_()

        def cue_mp(x, Y, w):
            return tp(x, Y, w, indices_1=src, indices_out=dst, size_out=N)

        impls["cuequivariance"] = (cue_mp, (x, Y, w))
    except Exception as exc:  # noqa: BLE001 - reported in the table's info, the other columns still run
        info["cuequivariance"] += f" (setup failed: {type(exc).__name__}: {exc})"[:200]


def build(kernel, L, C, E, dtype, device, with_triton, compile_e3nn):
    """Return ``(impls: dict name -> (fn, inputs), info)``."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device).requires_grad_()
    impls, info = {}, {}
    if kernel == "mp":
        CT = kernels_module("channelwise_tp")
        irreps_in, irreps_sh, irreps_out, ins = _mace_irreps(C, L)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_out, [(a, b, c, "uvu", True) for a, b, c in ins],
                                  shared_weights=False, internal_weights=False)
        finally:
            torch.set_default_dtype(old)
        tp = tp.to(device=device, dtype=dtype)
        N, src, dst = _graph(E, device, gen)
        x = rnd(N, irreps_in.dim)
        Y = o3.spherical_harmonics(irreps_sh, torch.randn(E, 3, generator=gen, dtype=dtype).to(device), True,
                                   normalization="component").requires_grad_()
        w = rnd(E, tp.weight_numel)

        def e3nn_mp(x, Y, w, tp=tp):
            return torch.zeros(N, irreps_out.dim, device=device, dtype=dtype).index_add(0, dst, tp(x[src], Y, w))

        impls["e3nn"] = (e3nn_mp, (x, Y, w))
        if compile_e3nn:
            ctp = torch.compile(tp)
            impls["e3nn-compile"] = (lambda x, Y, w: e3nn_mp(x, Y, w, tp=ctp), (x, Y, w))
        _add_cuequivariance_mp(impls, info, irreps_in, irreps_sh, irreps_out, N, src, dst, x, Y, dtype, device, gen)
        if with_triton:
            fused = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)
            plan = CT.EdgePlan.build(src, dst, N)
            impls["triton"] = (lambda x, Y, w: fused(x, Y, w, src, dst, plan=plan), (x, Y, w))
            t = fused.table
            s = torch.finfo(dtype).bits // 8
            info["bytes"] = s * (E * t.D_in * C + E * t.D_sh + E * t.P * C + N * t.D_out * C) + 16 * E
            info["flops"] = 3 * t.coef.numel() * E * C
            info["cg_entries"] = int(t.coef.numel())
    elif kernel == "sh":
        SH = kernels_module("spherical_harmonics")
        v = rnd(E, 3)
        nb, r_max = 8, 5.0
        freqs = (torch.arange(1, nb + 1, dtype=dtype) * math.pi / r_max).to(device)
        impls["reference"] = (lambda v: SH.reference_edge_embedding(v, L, freqs, r_max, 5), (v,))
        ls = list(range(L + 1))
        # harmonics only (no radial basis): timing columns, not parity references
        impls["e3nn Y"] = (lambda v: o3.spherical_harmonics(ls, v, True, normalization="component"), (v,))
        info["cuequivariance"] = cuequivariance_status()
        if info["cuequivariance"] != "not installed":
            import cuequivariance_torch as cuet

            impls["cuequivariance Y"] = (lambda v: cuet.spherical_harmonics(ls, v, normalize=True), (v,))
        if with_triton:
            impls["triton"] = (lambda v: SH.edge_embedding(v, L, nb, r_max), (v,))
    elif kernel == "sc":
        SC = kernels_module("symmetric_contraction")
        D = (min(L, 3) + 1) ** 2  # dense U of order 3 grows as D^3: cap the input degree at 3
        Us = []
        for nu, q in ((1, 2), (2, 4), (3, 8)):
            u = torch.randn(1, *([D] * nu), q, generator=gen, dtype=torch.float64)
            Us.append(u * (torch.rand(u.shape, generator=gen) < 0.05))
        N = max(2, E // 16)
        A = rnd(N, D, C)
        elem = torch.randint(0, 4, (N,), generator=gen).to(device)
        Ws = [rnd(4, u.shape[-1], C) for u in Us]
        Ud = [u.to(device=device, dtype=dtype) for u in Us]
        impls["reference"] = (lambda A, *W: SC.reference_symmetric_contraction(A, elem, Ud, list(W)), (A, *Ws))
        if with_triton:
            table = SC.build_table(Us)
            impls["triton"] = (lambda A, *W: SC.symmetric_contraction(A, elem, list(W), table), (A, *Ws))
    elif kernel == "gaunt":
        GA = kernels_module("gaunt")
        N = max(2, E // 16)
        x1, x2 = rnd(N, C, (L + 1) ** 2), rnd(N, C, (L + 1) ** 2)
        impls["reference"] = (lambda a, b: GA.reference_gaunt_product(a, b, L), (x1, x2))
        try:
            from mlpot.o3.gaunt import gaunt_product as o3_gaunt

            impls["mlpot.o3"] = (lambda a, b: o3_gaunt(a, b, L, method="grid"), (x1, x2))
        except Exception:  # noqa: BLE001, S110 - the reference module may be absent or broken
            pass
        if with_triton:
            impls["triton"] = (lambda a, b: GA.gaunt_product(a, b, L), (x1, x2))
    elif kernel == "so2":
        from mlpot.o3 import so2 as S
        from mlpot.o3 import wigner as Wg

        K = kernels_module("so2")
        CT = kernels_module("channelwise_tp")
        irreps = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
        plan = S.SO2Plan(irreps, irreps, L, mode="depthwise")
        table = K.SO2Table(plan)
        N, src, dst = _graph(E, device, gen)
        x = rnd(N, (L + 1) ** 2, C)
        w = rnd(E, plan.weight_numel)
        wig = Wg.wigner_D_blocks(L, Wg.edge_rotation(torch.randn(E, 3, generator=gen, dtype=dtype).to(device)))
        wig = wig.detach().requires_grad_()
        impls["reference"] = (lambda x, w, d: K.reference_so2_message_passing(x, w, d, src, dst, N, table),
                              (x, w, wig))
        if with_triton:
            ep = CT.EdgePlan.build(src, dst, N)
            impls["triton"] = (lambda x, w, d: K.so2_message_passing(x, w, d, ep, table), (x, w, wig))
    else:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    return impls, info


# ----------------------------------------------------------------------------- driver
def _parser():
    p = argparse.ArgumentParser(prog="mlpot bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--lmax", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--channels", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--edges", nargs="+", type=int, default=[10_000, 100_000])
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(e3nn)")
    p.add_argument("--roofline", action="store_true", help="bandwidth and FLOP/s of the fused MP kernel")
    p.add_argument("--quick", action="store_true", help="tiny sizes, reference paths only on CPU")
    p.add_argument("--out", default="bench_results/kernels", help="folder for results.json/.md and plots")
    p.add_argument("--no-plot", action="store_true")
    return p


def _markdown(rows, roofline):
    head = ["kernel", "L", "C", "E", "mode", "impl", "time (ms)"]
    if roofline:
        head += ["GB/s", "GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kernel"], r["L"], r["C"], r["E"], r["mode"], r["impl"],
                 "n/a" if r["ms"] is None else f"{r['ms']:.3f}"]
        if roofline:
            cells += [r.get("GBs", ""), r.get("GFLOPs", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for kernel in sorted({r["kernel"] for r in rows}):
        sub = [r for r in rows if r["kernel"] == kernel and r["ms"] is not None]
        if not sub:
            continue
        modes = sorted({r["mode"] for r in sub}, key=MODES.index)
        fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for key in sorted({(r["impl"], r["C"], r["E"]) for r in sub if r["mode"] == mode}):
                pts = sorted((r["L"], r["ms"]) for r in sub if r["mode"] == mode and (r["impl"], r["C"], r["E"]) == key)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} C={key[1]} E={key[2]}")
            ax.set_title(f"{kernel} {mode}")
            ax.set_xlabel("L")
            ax.set_ylabel("time (ms)")
            ax.set_yscale("log")
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{kernel}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        args.lmax, args.channels, args.edges, args.repeats = [1, 2], [8], [64], 2
    try:
        with_triton = resolve_backend("triton", device) == "triton" and device.type == "cuda"
    except Exception:  # noqa: BLE001
        with_triton = False
    if not with_triton:
        print(f"# note: no CUDA device ({device}); timing reference implementations only")
    rows = []
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "argv": argv, "triton": with_triton}
    for kernel in args.kernels:
        for E in args.edges:
            for C in args.channels:
                for L in args.lmax:
                    impls, info = build(kernel, L, C, E, dtype, device, with_triton, args.compile)
                    for mode in args.modes:
                        for name, (fn, inputs) in impls.items():
                            try:
                                ms = 1e3 * _time(_runner(fn, inputs, mode), device, args.repeats)
                            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the largest sizes
                                ms = None
                                info[f"error {name} {mode}"] = f"{type(exc).__name__}: {exc}"[:200]
                            row = {"kernel": kernel, "L": L, "C": C, "E": E, "mode": mode, "impl": name, "ms": ms}
                            if args.roofline and kernel == "mp" and name == "triton" and mode == "fwd" and ms:
                                row["GBs"] = round(info["bytes"] / (ms * 1e-3) / 1e9, 1)
                                row["GFLOPs"] = round(info["flops"] / (ms * 1e-3) / 1e9, 1)
                                peak = PEAK["fp64_GFLOPs" if dtype == torch.float64 else "fp32_GFLOPs"]
                                row["frac_bw"] = round(row["GBs"] / PEAK["bandwidth_GBs"], 3)
                                row["frac_flops"] = round(row["GFLOPs"] / peak, 3)
                            rows.append(row)
                    if info:
                        meta.setdefault("info", {})[f"{kernel} L={L} C={C} E={E}"] = info
    md = _markdown(rows, args.roofline)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(md + "\n")
    if not args.no_plot:
        result["plots"] = _plot(rows, args.out)
    return result


if __name__ == "__main__":
    main()
