r"""MACE energy+forces per step and peak memory on a GPU, from 1k fcc Cu atoms to the largest
cell that fits; and batched small cells in atoms·steps/s.

What is timed: one ``model(graph, compute_force=True)`` (energy, then forces by autograd) on a
graph already on the device, the positions moved by 1e-3 Å before every step (nothing cached).
The neighbour list is not timed (MD rebuilds it every ~10-20 steps). Device work is
synchronised before the host clock is read; one untimed warm-up step (it also runs the Triton
autotuner), then the median of ``--repeats`` steps. Peak memory is
``torch.cuda.max_memory_allocated`` over one step (model, graph and activations included).

Model: MACE with the hyperparameters of :data:`mlpot.bench.model.MACE_HYPER` (hidden
``128x0e + 128x1o``, ``max_ell 3``, correlation 3, 2 interactions, r_max 5 Å), random weights,
``--backend`` (default ``triton`` on CUDA). Sizes grow ``4 n^3`` atoms until a step runs out of
memory, exceeds ``--max-step-s`` or the time budget ``--budget-s`` is spent; fp32 then fp64,
each with half the budget.

    python scripts/bench_model.py cuda --json model_cuda.json
    python scripts/bench_model.py cuda --dry-run      # CPU, reference backend, tiny model and cells
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlpot.bench.fcc import CU_Z, fcc_cu_graph
from mlpot.bench.model import MACE_HYPER

# supercell edge n (atoms = 4 n^3): 1372, 4000, 10976, 23328, 42592, 78732, 108000, 157216, 219488, 318028
SIZES = (7, 10, 14, 18, 22, 27, 30, 34, 38, 43)
BATCHES = (64, 256, 1024)  # batched 2x2x2 cells (32 atoms each)
TINY_HYPER = dict(MACE_HYPER, hidden_irreps="8x0e + 8x1o", max_ell=2, correlation=2, radial_MLP=[8])


def build_mace(backend: str, dtype: torch.dtype, device, hyper=MACE_HYPER):
    from mlpot.models import build_model
    from mlpot.testing.model_checks import randomize_parameters

    torch.manual_seed(0)
    model = build_model("MACE", **dict(hyper, atomic_numbers=[CU_Z]), backend=backend)
    randomize_parameters(model, seed=0, scale=0.05)
    return model.to(device=device, dtype=dtype).eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, graph, repeats: int) -> tuple[float, float, float]:
    """(median s per step, spread max-min s, peak bytes of one step) for energy+forces."""
    device = graph["positions"].device
    base = graph["positions"].clone()
    gen = torch.Generator().manual_seed(1)
    is_cuda = device.type == "cuda"

    def step():
        graph["positions"] = base + 1e-3 * torch.randn(base.shape, generator=gen, dtype=base.dtype).to(device)
        out = model(graph, compute_force=True)
        if not torch.isfinite(out["forces"]).all():
            raise FloatingPointError("non-finite forces")
        return out

    step()  # warm-up: compiles and autotunes the kernels
    _sync(device)
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = float(torch.cuda.max_memory_allocated(device)) if is_cuda else float("nan")
    return statistics.median(times), max(times) - min(times), peak


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def scaling(backend, dtype, device, sizes, repeats, budget_s, max_step_s, hyper=MACE_HYPER) -> list[dict]:
    rows = []
    t_start = time.perf_counter()
    model = build_mace(backend, dtype, device, hyper)
    for n in sizes:
        if time.perf_counter() - t_start > budget_s:
            rows.append({"kind": "single", "n": n, "status": "budget spent"})
            break
        try:
            graph = fcc_cu_graph(n, hyper["r_max"], dtype=dtype, device=device)
            atoms, edges = graph["positions"].shape[0], graph["edge_index"].shape[1]
            t, spread, peak = time_steps(model, graph, repeats)
        except Exception as exc:  # noqa: BLE001 - out of memory ends the scan, anything else is reported
            graph = None
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"kind": "single", "n": n, "atoms": 4 * n ** 3,
                         "status": "out of memory" if _oom(exc) else f"{type(exc).__name__}: {exc}"[:200]})
            break
        rows.append({"kind": "single", "n": n, "atoms": atoms, "edges": edges, "s_per_step": t,
                     "spread_s": spread, "peak_GB": peak / 1e9, "atom_steps_per_s": atoms / t, "status": "ok"})
        print(f"  {str(dtype)[6:]:8s} {atoms:8d} atoms {edges:9d} edges  {1e3 * t:9.2f} ms/step "
              f"(spread {1e3 * spread:.2f})  peak {peak / 1e9:7.2f} GB", flush=True)
        del graph
        if t > max_step_s:
            break
    return rows


def batched(backend, dtype, device, batches, repeats, hyper=MACE_HYPER, n=2) -> list[dict]:
    rows = []
    model = build_mace(backend, dtype, device, hyper)
    for b in batches:
        try:
            graph = fcc_cu_graph(n, hyper["r_max"], cells=b, dtype=dtype, device=device)
            atoms = graph["positions"].shape[0]
            t, spread, peak = time_steps(model, graph, repeats)
        except Exception as exc:  # noqa: BLE001
            rows.append({"kind": "batched", "cells": b, "status": "out of memory" if _oom(exc)
                         else f"{type(exc).__name__}: {exc}"[:200]})
            break
        rows.append({"kind": "batched", "cells": b, "atoms": atoms, "s_per_step": t, "spread_s": spread,
                     "peak_GB": peak / 1e9, "atom_steps_per_s": atoms / t, "status": "ok"})
        print(f"  {str(dtype)[6:]:8s} {b:5d} x {4 * n ** 3} atoms  {1e3 * t:9.2f} ms/step  "
              f"{atoms / t:12.0f} atom-steps/s", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench_model.py cuda", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget for the size scan (all dtypes)")
    p.add_argument("--max-step-s", type=float, default=3.0, help="stop growing once one step takes longer")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--dry-run", action="store_true", help="CPU, reference backend, tiny model and cells")
    args = p.parse_args(argv)
    hyper, sizes, batches = MACE_HYPER, SIZES, BATCHES
    if args.dry_run:
        args.device, args.backend, args.repeats = "cpu", "reference", 1
        hyper, sizes, batches = TINY_HYPER, (1,), (2,)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_model.py cuda: no CUDA device (use --dry-run on a CPU)")
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    rows = []
    for dtype in dtypes:
        print(f"# MACE {hyper['hidden_irreps']}, max_ell {hyper['max_ell']}, correlation {hyper['correlation']}, "
              f"backend {args.backend}, {args.device}, {dtype}", flush=True)
        rows += [dict(r, dtype=str(dtype)[6:]) for r in scaling(
            args.backend, dtype, args.device, sizes, args.repeats, args.budget_s / len(dtypes), args.max_step_s, hyper)]
        rows += [dict(r, dtype=str(dtype)[6:]) for r in batched(
            args.backend, dtype, args.device, batches, args.repeats, hyper)]
    if args.json:
        from mlpot.fileio import atomic_write_text

        meta = {"device": torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
                else "cpu", "backend": args.backend, "hyper": hyper, "repeats": args.repeats}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
