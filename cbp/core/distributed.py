"""Process-group set-up for torchrun, and the one-process case as the same thing with world 1.

``torchrun --nproc_per_node=N -m cbp ...`` starts N copies of the program; :func:`setup` joins
them (nccl on GPU, gloo on CPU) and every helper here is a no-op when there is one process, so the
training loop has one code path. ``CBP_DEBUG=1`` makes the loop check at every epoch end that all
processes hold the same weights, lambda, g and p (:func:`check_in_sync`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

DEBUG_ENV = "CBP_DEBUG"


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """Join torchrun's process group if launched by it (nccl on GPU, gloo on CPU).

    ``device``: "cpu", "cuda" or None (CUDA when available). Under torchrun each process takes the
    GPU of its ``LOCAL_RANK``.
    """
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} has no GPU: this node has "
                                 f"{torch.cuda.device_count()}; lower --nproc_per_node")
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            _import_group_defaults()
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return Context(dist.get_rank(), dist.get_world_size(), target)
    return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the module is
    first imported; DDP imports it lazily, i.e. after :func:`setup`. The defaults would then hold
    the process group for good, :func:`teardown` could not free it, and its gloo threads would
    outlive Python: one of them releasing a finished collective's tensors while the interpreter
    shuts down aborts the process ("terminate called without an active exception", SIGABRT).
    """
    import torch.distributed.nn  # noqa: F401


def teardown() -> None:
    """Leave the process group once every process is done with it.

    The barrier keeps a process from closing its connections while another still talks; freeing
    the group joins its worker threads, so that none is left running when Python exits.
    """
    if is_distributed():
        barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every process (e.g. until rank 0 has written the checkpoint the others may read).

    nccl's barrier runs on a GPU: it is told this process's (set by :func:`setup`), not left to
    guess one from the rank.
    """
    if is_distributed():
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (identity for one process)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes, in place (identity for one process)."""
    if is_distributed():
        all_reduce_sum(values).div_(dist.get_world_size())
    return values


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics).

    DDP copies rank 0's buffers to the others before each training forward, after which each
    process updates them with its own share of the batch; so at an epoch's end they differ
    slightly. Evaluation and the checkpoint must see one model: rank 0's, the one it saves.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """BatchNorm layers whose batch statistics span all processes (``torch.nn.SyncBatchNorm``).

    Opt-in: the paper's reference code uses per-process statistics, the usual DDP behaviour.
    PyTorch implements SyncBatchNorm for GPUs only; on CPU it would fail at the first step.
    """
    if ctx.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class OutOfSyncError(RuntimeError):
    """Processes that should hold identical training state do not."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def _fingerprint(value: float | torch.Tensor | Iterable) -> int:
    """An exact, order-independent checksum: the sum of the bit patterns of all values.

    Integer sums are associative, so the same data gives the same number on every process whatever
    the reduction order; a single flipped bit changes it.
    """
    if isinstance(value, torch.Tensor):
        flat = value.detach().contiguous().flatten()
        if flat.is_floating_point():
            flat = flat.view(torch.int32 if flat.element_size() % 4 == 0 else torch.int16)
        return int(flat.sum(dtype=torch.int64))
    if isinstance(value, (int, float)):
        return int(torch.tensor(float(value), dtype=torch.float64).view(torch.int64))
    return sum(_fingerprint(v) for v in value)


def assert_same(values: dict[str, float | torch.Tensor | Iterable], device: torch.device) -> None:
    """Raise :class:`OutOfSyncError` naming every entry that is not bit-identical on all ranks."""
    if not is_distributed():
        return
    names = list(values)
    local = torch.tensor([_fingerprint(values[n]) for n in names], dtype=torch.int64,
                         device=device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differ = [n for n, hi, lo in zip(names, high.tolist(), low.tolist()) if hi != lo]
    if differ:
        raise OutOfSyncError(f"rank {dist.get_rank()}: {', '.join(differ)} differ between "
                             "processes")


def check_in_sync(model: nn.Module, optimizer: torch.optim.Optimizer, lagrangian=None,
                  device: torch.device | None = None) -> None:
    """Debug check at an epoch's end: weights, buffers, lr, and CBP's lambda, g, p alike on all."""
    values: dict = {"parameters": list(model.parameters()), "buffers": list(model.buffers()),
                    "lr": [group["lr"] for group in optimizer.param_groups]}
    if lagrangian is not None:
        values.update({"lambda": list(lagrangian.multipliers.values()), "g": lagrangian.g,
                       "p": lagrangian.p, "L_sum_pre": lagrangian.lagrangian_sum_pre})
    assert_same(values, device or next(model.parameters()).device)
