"""Data-parallel training across processes (``torchrun``; NCCL on CUDA, gloo on CPU).

Launch::

    torchrun --nproc_per_node=4 -m mlpot.cli.main train config.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them. Each rank trains on its shard of every global
batch (a :class:`~torch.utils.data.DistributedSampler` seeded by ``(seed, epoch)``), and after
``backward`` the gradients are **summed** over ranks with :func:`allreduce_gradients` (the
loss of each rank is already its share of the global mean, see :mod:`mlpot.train.losses`).
We all-reduce gradients ourselves instead of wrapping the model in
``DistributedDataParallel``: force training differentiates through ``autograd.grad`` inside
the forward pass, and parameters that receive no gradient (e.g. unused high-order paths)
would stall DDP's reducer; a flat all-reduce of every gradient (zeros where ``None``) has
neither issue.

Evaluation is sharded too (rank ``r`` takes frames ``r, r + R, ...``); error sums are merged
with ``all_gather_object``, so every rank sees the same metrics. Decisions that depend on the
wall clock (time limit) are broadcast from rank 0, so all ranks stop at the same step and
nobody waits forever in a collective.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "setup", "teardown", "allreduce_gradients", "broadcast_flag", "gather_objects"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def teardown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def allreduce_gradients(params, info: DistInfo) -> None:
    """Sum every parameter's gradient over ranks (missing gradients count as zero)."""
    if not info.enabled:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    if not info.enabled:
        return bool(flag)
    import torch.distributed as dist

    obj = [bool(flag)]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not info.enabled:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
