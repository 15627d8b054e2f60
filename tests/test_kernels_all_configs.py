"""Every autotune config of every kernel, not only the first, against its reference on the CPU
interpreter: fp32 and fp64, forward, first gradients and double backward, at tiny sizes. The
problems are those of the GPU benchmark and parity check (:func:`mlpot.bench.kernels.build`,
:func:`mlpot.bench.gpu_check.parity` at production sizes). Tolerances 1e-10 (fp64), 1e-4 (fp32),
relative to the reference's norm."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import triton.language as tl

from mlpot.bench.gpu_check import TOL, _grads, _rel
from mlpot.bench.kernels import build
from mlpot.o3.backend import kernels_module

RT = kernels_module("_runtime")
# the LazyKernels each benchmark problem launches (forward, backward and double backward)
LAUNCHED = {
    "sh": [("spherical_harmonics", "_FWD"), ("spherical_harmonics", "_BWD")],
    "sc": [("symmetric_contraction", "CONFIGS"), ("symmetric_contraction", "_BLOCK_SUM")],  # CONFIGS: generated
    "mp": [("mp_codegen", "SEGMENT_SUM"), ("mp_codegen", "CONFIGS")],  # CONFIGS: of the generated kernels
    "gaunt": [("gaunt", "_KERNEL_NARROW"), ("gaunt", "_KERNEL_WIDE")],
    "so2": [("so2", "_NODE"), ("so2", "_EDGE"), ("so2", "_BWD_FP32"), ("so2", "_BWD_FP32_D"), ("so2", "_BWD_FP64"),
            ("so2", "_BWD_FP64_D"), ("mp_codegen", "SEGMENT_SUM")],
}


def _configs(mod, name):
    """A LazyKernel's configs (or a config list: the kernels generated per table share one)."""
    obj = getattr(kernels_module(mod), name)
    return obj if isinstance(obj, list) else obj.configs


def _num_configs(kernel):
    return max(len(_configs(mod, name)) for mod, name in LAUNCHED[kernel])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel", sorted(LAUNCHED))
def test_every_autotune_config_matches_the_reference(kernel, dtype):
    impls, _ = build(kernel, 1, 2, 6, getattr(torch, dtype), torch.device("cpu"), True, False)
    ref_name = next(k for k in impls if k != "triton")
    for mode in ("fwd", "fwd+bwd", "double"):
        want = _grads(*impls[ref_name], mode)
        for index in range(_num_configs(kernel)):
            with RT.interpreter_config(index), RT.count_launches() as counts:
                got = _grads(*impls["triton"], mode)
            assert sum(counts.values()) > 0
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert _rel(a, b) < TOL[dtype], (kernel, dtype, mode, index)


def _store_block_kernel(out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr, BLOCK)


def test_interpreter_config_picks_the_config():
    """The context manager changes the config launched (index modulo the number of configs)."""
    kernel = RT.LazyKernel(_store_block_kernel, [({"BLOCK": b}, 1, 2) for b in (3, 5, 7)])
    out = torch.zeros(1, dtype=torch.int32)
    seen = []
    for index in (None, 0, 1, 2, 3, 4):
        if index is None:
            kernel[(1,)](out)
        else:
            with RT.interpreter_config(index):
                kernel[(1,)](out)
        seen.append(int(out[0]))
    assert seen == [3, 3, 5, 7, 3, 5]


def test_duplicate_configs_are_removed():
    cfgs = [({"BLOCK": 32}, 1, 2), ({"BLOCK": 64}, 2, 2), ({"BLOCK": 32}, 1, 2), ({"BLOCK": 32}, 2, 2)]
    assert RT.dedupe_configs(cfgs) == [({"BLOCK": 32}, 1, 2), ({"BLOCK": 64}, 2, 2), ({"BLOCK": 32}, 2, 2)]
    for mod, name in sum(LAUNCHED.values(), []):
        configs = _configs(mod, name)
        assert len(configs) == len(RT.dedupe_configs(configs)), (mod, name)
