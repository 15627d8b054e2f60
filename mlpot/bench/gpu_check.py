r"""The steps of ``scripts/gpu_check.sh`` that are Python: kernel parity at production sizes,
MACE ``triton`` == ``reference``, message-passing bandwidth against copy bandwidth, and the
summary table. Each step is its own process (``python -m mlpot.bench.gpu_check STEP``), so one
failing step does not hide the others; each writes one JSON file.

* ``parity``: every kernel of :func:`mlpot.bench.kernels.build` (``sh``, ``sc``, ``mp``, ``gaunt``,
  ``so2``) against its reference on the same inputs (e3nn for ``mp``, the torch reference for the
  others): outputs, first gradients (random cotangents) and the gradient of the squared first
  gradients (double backward), in fp32 and fp64. Error: ``||a - b|| / ||b||`` per tensor, the
  largest over the tensors of a mode. Passes under 1e-10 (fp64) and 1e-4 (fp32; ``mp``, ``gaunt`` and
  ``so2`` sum over many terms) -- 1e-5 would flag tf32 use, which none of the kernels asks for.
* ``mace``: the MACE of :data:`mlpot.bench.model.MACE_HYPER` with ``backend="triton"`` and with
  ``backend="reference"`` (same weights) on a rattled 3x3x3 fcc Cu cell: energy and forces.
* ``bandwidth``: the median time of a large device-to-device copy (bytes read + written) and of
  the fused message-passing forward at MACE's layer-2 shapes (``128x0e+128x1o`` in, ``L = 3``
  harmonics, outputs up to ``l = 3``); achieved bandwidth = the kernel's *floor* bytes (each
  operand read once, the output written once: :mod:`mlpot.bench.kernel_cost`) over its time.
* ``summary``: reads the JSON files of a run folder, prints a short table, writes ``summary.md``.

``--dry-run``: CPU, tiny sizes; kernels run on the Triton interpreter, the models on the
reference backend. It checks the plumbing, not the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

TOL = {"float64": 1e-10, "float32": 1e-4}
SIZES = {"prod": dict(L=3, C=128, E=100_000, E_double=20_000), "dry": dict(L=1, C=2, E=12, E_double=12)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _grads(fn, inputs, mode, cot_seed=7):
    """Outputs (fwd), first gradients (fwd+bwd) or double-backward gradients of ``fn(*inputs)``."""
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    if mode == "fwd":
        return [o.detach() for o in outs]
    gen = torch.Generator().manual_seed(cot_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
    gs = torch.autograd.grad(outs, leaves, cots, create_graph=(mode == "double"), allow_unused=True)
    if mode == "fwd+bwd":
        return [g.detach() for g in gs if g is not None]
    scal = sum((g * g).sum() for g in gs if g is not None)
    return [g.detach() for g in torch.autograd.grad(scal, leaves, allow_unused=True) if g is not None]


def parity(dry: bool, device: str, kernels, dtypes) -> list[dict]:
    from mlpot.bench.kernels import build

    size = SIZES["dry" if dry else "prod"]
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for kernel in kernels:
            for mode in ("fwd", "fwd+bwd", "double"):
                E = size["E_double"] if mode == "double" else size["E"]
                t0 = time.perf_counter()
                try:
                    impls, _ = build(kernel, size["L"], size["C"], E, dtype, torch.device(device), True, False)
                    ref_name = next(k for k in impls if k != "triton")
                    got = _grads(*impls["triton"], mode)
                    want = _grads(*impls[ref_name], mode)
                    if len(got) != len(want):
                        raise RuntimeError(f"{len(got)} gradients from triton, {len(want)} from {ref_name}")
                    err = max(_rel(a, b) for a, b in zip(got, want))
                    status = "ok" if err < TOL[dtype_name] else "FAIL"
                except Exception as exc:  # noqa: BLE001 - one kernel failing must not hide the others
                    ref_name, err, status = "?", float("nan"), f"error {type(exc).__name__}: {exc}"[:300]
                rows.append({"kernel": kernel, "mode": mode, "dtype": dtype_name, "L": size["L"], "C": size["C"],
                             "E": E, "reference": ref_name, "rel_err": err, "tol": TOL[dtype_name],
                             "status": status, "seconds": round(time.perf_counter() - t0, 2)})
                print(f"parity {kernel:6s} {mode:8s} {dtype_name:8s} vs {ref_name:9s} rel err {err:9.2e}  {status}",
                      flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def mace_parity(dry: bool, device: str, dtypes) -> list[dict]:
    from mlpot.bench.fcc import fcc_cu_graph
    from mlpot.bench.model import MACE_HYPER
    from mlpot.bench.model_cuda import TINY_HYPER, build_mace

    hyper, n = (TINY_HYPER, 1) if dry else (MACE_HYPER, 3)
    # dry run: the interpreter would take minutes on a MACE; the plumbing runs reference vs reference
    fast = "reference" if dry else "triton"
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ref = build_mace("reference", dtype, device, hyper)
        other = build_mace(fast, dtype, device, hyper)
        other.load_state_dict(ref.state_dict())
        graph = fcc_cu_graph(n, hyper["r_max"], dtype=dtype, device=device)
        a, b = ref(graph, compute_force=True), other(graph, compute_force=True)
        e_err, f_err = _rel(b["energy"], a["energy"]), _rel(b["forces"], a["forces"])
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        status = "ok" if max(e_err, f_err) < tol else "FAIL"
        rows.append({"dtype": dtype_name, "backend": fast, "atoms": graph["positions"].shape[0],
                     "edges": graph["edge_index"].shape[1], "energy_rel_err": e_err, "forces_rel_err": f_err,
                     "tol": tol, "status": status})
        print(f"mace {fast} vs reference {dtype_name}: energy {e_err:.2e} forces {f_err:.2e}  {status}", flush=True)
    return rows


def _median_time(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _copy_time(dev, nbytes: int, repeats: int) -> float:
    """Median time of a device-to-device copy of ``nbytes`` (reads ``nbytes``, writes ``nbytes``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return _median_time(lambda: dst.copy_(src), dev, repeats)


def bandwidth(dry: bool, device: str) -> dict:
    from e3nn import o3

    from mlpot.bench.kernel_cost import mp_costs, mp_layer2_shapes
    from mlpot.o3.backend import kernels_module

    dev = torch.device(device)
    copy_bytes = (1 << 20) if dry else (2 << 30)
    t_copy = _copy_time(dev, copy_bytes, 3 if dry else 20)
    copy_gbs = 2 * copy_bytes / t_copy / 1e9

    C, E, L = (2, 8, 1) if dry else (128, 1_000_000, 3)
    N = max(2, E // 40)
    irreps_in, irreps_sh, irreps_out, ins = mp_layer2_shapes(C, L)
    CT = kernels_module("channelwise_tp")
    fused = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)
    gen = torch.Generator().manual_seed(0)
    dst = torch.sort(torch.randint(0, N, (E,), generator=gen)).values.to(dev)
    src = torch.randint(0, N, (E,), generator=gen).to(dev)
    x = torch.randn(N, irreps_in.dim, generator=gen).to(dev)
    Y = o3.spherical_harmonics(irreps_sh, torch.randn(E, 3, generator=gen), True, normalization="component").to(dev)
    w = torch.randn(E, fused.table.P * C, generator=gen).to(dev)
    plan = CT.EdgePlan.build(src, dst, N)
    with torch.no_grad():
        t_mp = _median_time(lambda: fused(x, Y, w, src, dst, plan=plan), dev, 1 if dry else 20)
    cost = mp_costs(C=C, L=L, N=N, E=E, bytes_per=4)
    floor = cost["floor"]["bytes"]
    gbs = floor / t_mp / 1e9
    out = {"copy_bytes": copy_bytes, "copy_s": t_copy, "copy_GBs": copy_gbs, "mp_C": C, "mp_E": E, "mp_N": N,
           "mp_s": t_mp, "mp_floor_bytes": floor, "mp_GBs_of_floor": gbs, "fraction_of_copy": gbs / copy_gbs}
    print(f"copy {copy_gbs:8.1f} GB/s   message passing fwd (C={C}, E={E}) {1e3 * t_mp:8.3f} ms = "
          f"{gbs:8.1f} GB/s of floor bytes = {100 * gbs / copy_gbs:5.1f}% of copy", flush=True)
    return out


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out_dir: Path) -> str:
    """A short markdown table of a gpu_check run folder."""
    lines = ["| check | result |", "|---|---|"]
    par = _load(out_dir / "parity.json")
    if par is None:
        lines.append("| kernel parity | missing |")
    else:
        bad = [f"{r['kernel']} {r['mode']} {r['dtype']}: {r['status']}" for r in par if r["status"] != "ok"]
        worst = {d: max((r["rel_err"] for r in par if r["dtype"] == d and r["status"] == "ok"), default=float("nan"))
                 for d in ("float32", "float64")}
        lines.append(f"| kernel parity ({len(par)} cases) | {len(par) - len(bad)} ok; worst rel err "
                     f"fp32 {worst['float32']:.1e}, fp64 {worst['float64']:.1e}"
                     + (f"; {'; '.join(bad)[:300]}" if bad else "") + " |")
    mace = _load(out_dir / "mace_parity.json")
    for r in mace or [{"dtype": "-", "status": "missing", "forces_rel_err": float("nan"), "backend": "-"}]:
        lines.append(f"| MACE {r['backend']} == reference ({r['dtype']}) | {r['status']}, forces rel err "
                     f"{r['forces_rel_err']:.1e} |")
    kern = _load(out_dir / "kernels" / "results.json")
    if kern is None:
        lines.append("| bench_kernels | missing |")
    else:
        by = {}
        for r in kern["rows"]:
            if r["ms"] is not None and r["mode"] == "fwd+bwd":
                by.setdefault(r["kernel"], {})[r["impl"]] = r["ms"]
        for k, impls in by.items():
            cells = ", ".join(f"{name} {ms:.2f} ms" for name, ms in impls.items())
            lines.append(f"| {k} fwd+bwd | {cells} |")
        cue = {v.get("cuequivariance") for v in kern["meta"].get("info", {}).values() if "cuequivariance" in v}
        lines.append(f"| cuEquivariance | {', '.join(sorted(c for c in cue if c)) or 'not reported'} |")
    model = _load(out_dir / "model_cuda.json")
    if model is None:
        lines.append("| bench_model cuda | missing |")
    else:
        for d in ("float32", "float64"):
            ok = [r for r in model["rows"] if r.get("dtype") == d and r["kind"] == "single" and r["status"] == "ok"]
            end = [r for r in model["rows"] if r.get("dtype") == d and r["kind"] == "single" and r["status"] != "ok"]
            if ok:
                big = ok[-1]
                lines.append(f"| MACE {d} largest | {big['atoms']} atoms: {1e3 * big['s_per_step']:.1f} ms/step, "
                             f"peak {big['peak_GB']:.1f} GB" + (f"; next: {end[0]['status']}" if end else "") + " |")
            bt = [r for r in model["rows"] if r.get("dtype") == d and r["kind"] == "batched" and r["status"] == "ok"]
            if bt:
                best = max(bt, key=lambda r: r["atom_steps_per_s"])
                lines.append(f"| MACE {d} batched | {best['cells']} cells: {best['atom_steps_per_s']:.3g} atom-steps/s |")
    bw = _load(out_dir / "bandwidth.json")
    if bw is None:
        lines.append("| bandwidth | missing |")
    else:
        lines.append(f"| mp bandwidth | {bw['mp_GBs_of_floor']:.0f} GB/s = {100 * bw['fraction_of_copy']:.0f}% of copy "
                     f"({bw['copy_GBs']:.0f} GB/s) |")
    return "\n".join(lines)


def _write(path: str, obj) -> None:
    from mlpot.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlpot.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("step", choices=("parity", "mace", "bandwidth", "summary"))
    p.add_argument("--out", required=True, help="JSON file (summary: the run folder)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--kernels", default="sh,sc,mp,gaunt,so2")
    p.add_argument("--dtypes", default="float32,float64")
    args = p.parse_args(argv)
    if args.step == "summary":
        table = summary(Path(args.out))
        from mlpot.fileio import atomic_write_text

        atomic_write_text(Path(args.out) / "summary.md", table + "\n")
        print(table)
        return 0
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        if args.step != "mace":
            os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.step == "parity":
        rows = parity(args.dry_run, device, [k.strip() for k in args.kernels.split(",")], dtypes)
        _write(args.out, rows)
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    if args.step == "mace":
        rows = mace_parity(args.dry_run, device, dtypes)
        _write(args.out, rows)
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    res = bandwidth(args.dry_run, device)
    _write(args.out, res)
    return 0 if math.isfinite(res["mp_GBs_of_floor"]) else 1


if __name__ == "__main__":
    sys.exit(main())
