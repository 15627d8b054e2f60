r"""``mlpot bench aot``: compile, ahead of time and without a GPU, every Triton kernel variant a
model launches, for NVIDIA targets; report registers, spills and shared memory per variant.

A *variant* is what the Triton JIT compiles once: a kernel function with one signature (pointer
dtypes, integer widths, the ``tt.divisibility`` attributes, integers equal to 1 folded in), one
set of constexprs (the block sizes of one autotune config included) and one ``num_warps`` /
``num_stages``. On a GPU the autotuner compiles every config of a kernel, so every config is a
variant here too.

1. **Record** (a child process with ``TRITON_INTERPRET=1``). Each model is built with
   ``backend="triton"`` and evaluated on a tiny molecule: energy and forces (the MD call), then the
   parameter gradient of a force loss (the training call, double backward).
   :func:`mlpot.kernels._runtime.record_launches` sees every launch; by default the interpreter
   does not run them (the launch sequence depends on shapes only, and interpreting 128-channel
   kernels takes minutes); ``--execute`` runs them. Each launch is specialised exactly as the JIT
   would for a CUDA target, with Triton's own binder (``create_function_from_signature`` and
   ``JITFunction._pack_args``).
2. **Compile** (this process, no interpreter): ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", sm, 32))`` for each variant, each ``--arch`` and each ``--dtype``
   (the model is recorded once per dtype). Triton's wheel ships ``ptxas``: no driver is needed.
   Registers and spill bytes come from the ``ptxas -v`` log, shared memory from the kernel's
   metadata.

    mlpot bench aot                                   # MACE and ESCN defaults, sm_80 + sm_90, fp32 + fp64
    mlpot bench aot --model MACE:interaction_tp=gaunt --arch 90 --dtype fp32 --first-config
    mlpot bench aot --max-spill-bytes 0 --md aot.md   # exit status 1 on a spill or a failed compile
    mlpot bench aot --jobs 2 --summary-md summary.md  # compile in 2 processes; the per-kernel table

Exit status: 1 when a variant fails to compile or spills more than ``--max-spill-bytes``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

DEFAULT_MODELS = ("MACE", "ESCN")
# SO(2) message passing (issue 13, item 5): MACE with `interaction_tp: so2` is checked by default too
DEFAULT_MODELS += ("MACE:interaction_tp=so2",)
ARCHS = (80, 90)
DTYPES = ("fp32", "fp64")
_TORCH_DTYPES = {"fp32": "float32", "fp64": "float64"}

# PTX features counted per variant: tensor-core instructions (mma.sync on sm_80+, wgmma on sm_90),
# float kernel parameters by width (a Python float argument arrives as .f32 whatever the dtype),
# and local memory (spills or arrays that did not fit in registers)
_PTX = {
    "mma": re.compile(r"^\s*mma\.sync", re.M),
    "wgmma": re.compile(r"^\s*wgmma\.mma_async", re.M),
    "param_f32": re.compile(r"\.param \.f32 "),
    "param_f64": re.compile(r"\.param \.f64 "),
    "local": re.compile(r"\.local "),
}

_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


# ------------------------------------------------------------------------------------- models
def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"MACE"`` or ``"MACE:interaction_tp=gaunt,max_ell=2"`` -> (name, overrides); values are
    read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas outside [...]
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"model spec {spec!r}: expected key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


def _tiny_graph(model, dtype):
    """A bent triatomic of the model's first two species, every pair within the cutoff."""
    from ase import Atoms

    from mlpot.data.graph import atoms_to_graph

    z = list(model.atomic_numbers)
    numbers = [z[0], z[-1], z[-1]]
    atoms = Atoms(numbers=numbers, positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.1]])
    return atoms_to_graph(atoms, model.r_max, dtype=dtype)


def _run_model(model, graph) -> None:
    """The two calls a user makes: forces (MD), and the gradient of a force loss (training)."""
    import torch

    model.eval()
    model(graph, compute_force=True)
    model.train()
    out = model(graph, compute_force=True, create_graph=True)
    loss = out["energy"].square().sum() + out["forces"].square().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(loss, params, allow_unused=True)
    model.eval()


# ------------------------------------------------------------------------------------- record
def _json_key(path: tuple) -> str:
    return ",".join(str(i) for i in path)


def record_variants(specs: list[str], dtype_name: str, execute: bool = False) -> list[dict]:
    """Every kernel variant the models of ``specs`` launch in ``dtype_name``, as JSON-able dicts.

    Must run with ``TRITON_INTERPRET=1`` (kernels then accept CPU tensors); call it in a process
    that will not compile, since the interpreter rebinds ``triton.language`` helpers.
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from mlpot.models import build_model
    from mlpot.o3.backend import kernels_module

    runtime = kernels_module("_runtime")
    if not runtime.interpret_mode():
        raise RuntimeError("record_variants needs TRITON_INTERPRET=1")
    dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
    backend = make_backend(GPUTarget("cuda", max(ARCHS), 32))  # specialisation is the same for every sm
    jits: dict = {}
    variants: dict[str, dict] = {}
    for spec in specs:
        name, overrides = parse_model_spec(spec)
        config = {"atomic_numbers": [1, 8], "seed": 0, **overrides, "backend": "triton"}
        model = build_model(name, **config).to(dtype)
        graph = _tiny_graph(model, dtype)
        with runtime.record_launches(execute=execute) as launches:
            _run_model(model, graph)
        for kernel, args, kwargs in launches:
            if kernel.fn not in jits:
                jit = JITFunction(kernel.fn)
                jits[kernel.fn] = (jit, create_function_from_signature(jit.signature, jit.params, backend))
            jit, binder = jits[kernel.fn]
            for meta, warps, stages in kernel.configs:
                options = {"num_warps": warps, "num_stages": stages}
                bound, specialization, _ = binder(*args, **kwargs, **meta, **options)
                _, signature, constexprs, attrs = jit._pack_args(backend, options, bound, specialization, options)
                variant = {
                    "module": kernel.fn.__module__,
                    "kernel": kernel.fn.__name__,
                    "arg_names": list(jit.arg_names),
                    "signature": signature,
                    "constexprs": {_json_key(k): v for k, v in constexprs.items()},
                    "attrs": {_json_key(k): v for k, v in attrs.items()},
                    "num_warps": warps,
                    "num_stages": stages,
                    "first_config": (meta, warps, stages) == kernel.configs[0],
                }
                key = json.dumps(variant, sort_keys=True, default=str)
                variants.setdefault(key, {**variant, "dtype": dtype_name, "models": []})
                if spec not in variants[key]["models"]:
                    variants[key]["models"].append(spec)
    return list(variants.values())


def record_in_child(specs: list[str], dtype_name: str, execute: bool = False) -> list[dict]:
    """:func:`record_variants` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "variants.json")
        cmd = [sys.executable, "-m", "mlpot.bench.aot", "--record-to", out, "--dtype", dtype_name, "--model", *specs]
        if execute:
            cmd.append("--execute")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"recording the launches of {specs} ({dtype_name}) failed:\n{proc.stderr[-4000:]}")
        with open(out) as fh:
            return json.load(fh)


# ------------------------------------------------------------------------------------ compile
def _constexprs(variant: dict) -> dict:
    return {tuple(int(i) for i in k.split(",")): v for k, v in variant["constexprs"].items()}


def _attrs(variant: dict) -> dict:
    return {tuple(int(i) for i in k.split(",")): [tuple(a) for a in v] for k, v in variant["attrs"].items()}


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one recorded variant for ``sm_<arch>``: registers, spill bytes, shared memory."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_variant needs compiled-mode Triton: unset TRITON_INTERPRET")
    fn = getattr(importlib.import_module(variant["module"]), variant["kernel"])
    src = ASTSource(JITFunction(fn), variant["signature"], _constexprs(variant), _attrs(variant))
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                src, target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant["num_warps"], "num_stages": variant["num_stages"]},
            )
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = False, False
    stats = {"compile_s": round(time.perf_counter() - t0, 2), "shared": int(kernel.metadata.shared or 0)}
    ptx = kernel.asm.get("ptx", "")
    stats.update({key: len(pattern.findall(ptx)) for key, pattern in _PTX.items()})
    for key, pattern in _PTXAS.items():
        found = pattern.findall(log.getvalue())
        if key == "regs" and not found:
            raise RuntimeError("no `ptxas -v` log was captured: cannot read the register count")
        stats[key] = int(found[-1]) if found else 0
    return stats


def _constexpr_text(variant: dict) -> str:
    """``NAME=value`` for each constexpr (block sizes, and integer arguments folded because = 1)."""
    names = variant["arg_names"]
    return " ".join(f"{names[int(k.split(',')[0])]}={v}" for k, v in variant["constexprs"].items())


def markdown_table(rows: list[dict]) -> str:
    head = ("| kernel | sm | dtype | warps | stages | constexprs (and ints folded to 1) | registers | "
            "spill st/ld (B) | shared (B) | mma/wgmma | models |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        res = (f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['mma']}/{r['wgmma']}"
               if r["ok"] else f"**failed**: {r['error'][:80]} | | | ")
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{r['constexprs']} | {res} | {', '.join(r['models'])} |")
    return head + "\n".join(lines) + "\n"


# --- per-kernel summary and parallel compiles (the BENCHMARKS.md table; Gaunt tensor-core work) ---
def _span(values) -> str:
    values = list(values)
    return f"{min(values)}–{max(values)}" if values else "–"


def summary_table(rows: list[dict]) -> str:
    """One line per (kernel, sm, dtype): variants, warps, register range, largest spill and shared
    memory, tensor-core instruction counts (``mma.sync`` / ``wgmma``, min–max over the variants),
    models: the table of BENCHMARKS.md (``--summary-md``)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    head = ("| kernel | sm | dtype | variants | warps | registers (min–max) | spill st/ld, max (B) | shared, max (B) "
            "| mma.sync / wgmma (min–max) | models |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for (kernel, arch, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        failed = len(rs) - len(ok)
        n = f"{len(rs)}" + (f" (**{failed} failed**)" if failed else "")
        warps = ",".join(str(w) for w in sorted({r["num_warps"] for r in rs}))
        spill = (f"{max((r['spill_stores'] for r in ok), default=0)}/{max((r['spill_loads'] for r in ok), default=0)}")
        models = ", ".join(sorted({m for r in rs for m in r["models"]}))
        lines.append(f"| {kernel} | {arch} | {dtype} | {n} | {warps} | {_span(r['regs'] for r in ok)} | {spill} | "
                     f"{max((r['shared'] for r in ok), default=0)} | {_span(r['mma'] for r in ok)} / "
                     f"{_span(r['wgmma'] for r in ok)} | {models} |")
    return head + "\n".join(lines) + "\n"


def _compile_row(job) -> dict:
    variant, arch = job
    row = {**variant, "arch": f"sm_{arch}", "constexprs": _constexpr_text(variant)}
    try:
        row.update(compile_variant(variant, arch), ok=True)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the exit status
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    return row


def run(specs, archs, dtypes, first_config=False, execute=False, only=None, jobs: int = 1) -> list[dict]:
    """Record in a child, compile here (``jobs`` > 1: in that many worker processes); one row per
    (variant, arch), in the same order either way."""
    work = []
    for dtype_name in dtypes:
        for variant in record_in_child(list(specs), dtype_name, execute=execute):
            if first_config and not variant["first_config"]:
                continue
            if only and not re.search(only, variant["kernel"]):
                continue
            work.extend((variant, arch) for arch in archs)
    if jobs <= 1:
        return [_compile_row(job) for job in work]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_row, work, chunksize=4))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlpot bench aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                    help="model specs NAME[:key=value,...] (default: the MACE and ESCN defaults)")
    ap.add_argument("--arch", nargs="+", type=int, default=list(ARCHS), help="compute capabilities (80 90)")
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--first-config", action="store_true", help="only the first autotune config of each kernel")
    ap.add_argument("--only", default=None, help="regular expression on the kernel name")
    ap.add_argument("--execute", action="store_true", help="run the kernels on the interpreter while recording")
    ap.add_argument("--max-spill-bytes", type=int, default=None, help="exit 1 when a variant spills more")
    ap.add_argument("--md", default=None, help="also write the table to this markdown file")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--summary-md", default=None, help="also write the per-kernel summary (BENCHMARKS.md) here")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    ap.add_argument("--record-to", default=None, help=argparse.SUPPRESS)  # the child's side of run()
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.record_to:
        variants = record_variants(args.model, args.dtype[0], execute=args.execute)
        with open(args.record_to, "w") as fh:
            json.dump(variants, fh, default=str)
        return 0
    import torch
    import triton

    t0 = time.perf_counter()
    rows = run(args.model, args.arch, args.dtype, args.first_config, args.execute, args.only, jobs=args.jobs)
    table = markdown_table(rows)
    print(f"# mlpot bench aot: triton {triton.__version__}, torch {torch.__version__}, "
          f"{platform.machine()} host, models {' '.join(args.model)}")
    print(table)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    if args.summary_md:
        with open(args.summary_md, "w") as fh:
            fh.write(summary_table(rows))
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and args.max_spill_bytes is not None
               and max(r["spill_stores"], r["spill_loads"]) > args.max_spill_bytes]
    print(f"# {len(rows) - len(failed)}/{len(rows)} variants compiled; {len(failed)} failed"
          + (f"; {len(spilled)} spill more than {args.max_spill_bytes} B" if args.max_spill_bytes is not None else "")
          + f"; {time.perf_counter() - t0:.0f} s")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
