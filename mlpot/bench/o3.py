r"""Scaling of equivariant edge products with the degree L (CG vs Gaunt vs SO(2)).

Every method computes the same kind of MACE edge message: node features
``C x (0e + 1o + ... + L)`` (channelwise, ``uvu``) times the spherical harmonics of the edge
vector up to ``L``, outputs up to degree ``L``, per-edge weights ``(E, weight_numel)``:

* ``cg``: ``e3nn.o3.TensorProduct`` with every allowed ``(l1, l2) -> (l3, p3)`` path, ``l3 <= L``
  (both output parities), one weight per path and channel;
* ``gaunt-grid`` / ``gaunt-fourier``: :class:`mlpot.o3.gaunt.GauntMessageTP` (paths with
  ``l1 + l2 + l3`` even only, even-type outputs);
* ``so2``: :class:`mlpot.o3.so2.SO2MessageTP` with ``mmax = L`` (includes the edge rotation).

Timed regions start from edge vectors (the harmonics are computed inside, for all methods):
``fwd``; ``fwd+bwd`` (gradients w.r.t. features, vectors, weights); ``double`` (gradient
w.r.t. the vectors with ``create_graph=True`` -- the force -- then its backward to the
weights, as in force training). The scaling exponent is the slope of log(time) vs log(L)
over the largest L measured. Usage: ``python scripts/bench_o3.py --edges 10000 --lmax 8``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from e3nn import o3

from mlpot.o3.gaunt import GauntMessageTP, gaunt_paths
from mlpot.o3.spherical_harmonics import spherical_harmonics

METHODS = ("cg", "gaunt-grid", "gaunt-fourier", "so2")


def _cg_tp(irreps_in, L):
    sh = o3.Irreps.spherical_harmonics(L)
    mid, instr = [], []
    for i, (mul, ir_i) in enumerate(irreps_in):
        for f, (_, ir_f) in enumerate(sh):
            for ir_o in ir_i * ir_f:
                if ir_o.l <= L:
                    instr.append((i, f, len(mid), "uvu", True))
                    mid.append((mul, ir_o))
    tp = o3.TensorProduct(irreps_in, sh, o3.Irreps(mid), instr, shared_weights=False, internal_weights=False)
    return tp, len(instr)


def build(method: str, L: int, C: int, dtype=torch.float32):
    """Return ``(fn(x, vectors, weights) -> messages, weight_numel, n_paths, note)``."""
    irreps_in = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
    if method == "cg":
        tp, n = _cg_tp(irreps_in, L)
        tp = tp.to(dtype)
        return (lambda x, v, w: tp(x, spherical_harmonics(L, v), w)), tp.weight_numel, n, "(l1,l2,l3,p3) paths"
    if method.startswith("gaunt"):
        target = o3.Irreps([(C, (l, p)) for l in range(L + 1) for p in (1, -1)])
        tp = GauntMessageTP(irreps_in, L, target, method=method.split("-")[1]).to(dtype)
        n = len(gaunt_paths(range(L + 1), range(L + 1), L))
        return (lambda x, v, w: tp(x, spherical_harmonics(L, v), w)), tp.weight_numel, n, "(l1,l2,l3) paths"
    if method == "so2":
        from mlpot.o3.so2 import SO2MessageTP

        target = o3.Irreps([(C, (l, p)) for l in range(L + 1) for p in (1, -1)])
        tp = SO2MessageTP(irreps_in, L, target, mmax=L).to(dtype)
        return (lambda x, v, w: tp(x, v, w)), tp.weight_numel, len(tp.plan.paths), "(in,out,m) blocks"
    raise ValueError(method)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(method: str, L: int, C: int, E: int, dtype, reps: int, modes):
    built = build(method, L, C, dtype)
    if built is None:
        return None
    fn, numel, n_paths, what = built
    g = torch.Generator().manual_seed(0)
    dim = C * (L + 1) ** 2
    x = torch.randn(E, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(E, 3, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(E, numel, generator=g, dtype=dtype, requires_grad=True)

    def fwd():
        with torch.no_grad():
            fn(x, v, w)

    def fwd_bwd():
        out = fn(x, v, w)
        torch.autograd.grad(out.square().sum(), (x, v, w))

    def double():
        out = fn(x, v, w)
        (gv,) = torch.autograd.grad(out.square().sum(), v, create_graph=True)
        torch.autograd.grad(gv.square().sum(), (w, x))

    res = {"paths": n_paths, "what": what}
    for name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("double", double)):
        if name in modes:
            res[name] = _time(f, reps)
    return res


def fit_exponent(Ls, ts) -> float:
    """Least-squares slope of log t vs log L."""
    xs, ys = [math.log(l) for l in Ls], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edges", type=int, default=10000)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--lmax", type=int, default=8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--modes", default="fwd,fwd+bwd,double")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop a method at larger L once one timed call exceeds this")
    p.add_argument("--fit-from", type=int, default=4, help="fit exponents on L >= this")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    modes = a.modes.split(",")
    results: dict = {}
    print(f"E={a.edges} C={a.channels} dtype={a.dtype} threads={torch.get_num_threads()}")
    print(f"{'method':14s} {'L':>2s} {'paths':>6s} " + " ".join(f"{m:>10s}" for m in modes))
    for method in a.methods.split(","):
        results[method] = {}
        for L in range(1, a.lmax + 1):
            r = measure(method, L, a.channels, a.edges, dtype, a.reps, modes)
            if r is None:
                print(f"{method:14s} unavailable")
                break
            results[method][L] = r
            print(f"{method:14s} {L:2d} {r['paths']:6d} " + " ".join(f"{r[m] * 1e3:9.1f}ms" for m in modes),
                  flush=True)
            if max(r[m] for m in modes) > a.max_seconds:
                print(f"{method:14s} stopped after L={L} (> {a.max_seconds}s per call)")
                break
    print(f"scaling exponents (slope of log t vs log L, L >= {a.fit_from}):")
    for method, rs in results.items():
        Ls = [L for L in rs if L >= a.fit_from]
        if len(Ls) >= 2:
            ex = {m: fit_exponent(Ls, [rs[L][m] for L in Ls]) for m in modes}
            rs["exponent"] = ex
            print(f"  {method:14s} L={Ls[0]}..{Ls[-1]} " + " ".join(f"{m}: {ex[m]:.2f}" for m in modes))
    return results


if __name__ == "__main__":
    main()
