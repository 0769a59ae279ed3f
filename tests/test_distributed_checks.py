"""The debug checks of cbp.core.distributed in one process: checksums by hand, and
``assert_same`` / ``check_in_sync`` with a second rank played in a real one-process gloo group.

Apart from tests/test_distributed.py, which launches torchrun (mutation testing leaves it out: a
mutant in a subprocess is invisible to it), so that these run under ``make mutation`` too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import cbp
import cbp.core.distributed
from cbp.core.distributed import (
    Context,
    OutOfSyncError,
    _fingerprint,
    _import_group_defaults,
    all_reduce_mean,
    all_reduce_sum,
    assert_same,
    barrier,
    check_in_sync,
    setup,
    sync_batchnorm,
)


def test_fingerprint_is_exact_and_order_free():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert _fingerprint(x) == _fingerprint(x.flip(0)) == _fingerprint([x[:500], x[500:]])
    y = x.clone()
    y[7] = torch.nextafter(y[7], torch.tensor(float("inf")))   # one ulp
    assert _fingerprint(y) != _fingerprint(x)
    assert _fingerprint(20.0) != _fingerprint(float("inf")) and _fingerprint(2) == _fingerprint(2.0)


def test_fingerprint_sums_the_bit_patterns():
    """32- and 64-bit floats as int32 words, 16-bit ones as int16: each value's own bits."""
    assert _fingerprint(torch.tensor([1.0, -2.0])) == 0x3F800000 - 0x40000000
    assert _fingerprint(torch.tensor([1.0], dtype=torch.float16)) == 0x3C00
    assert _fingerprint(torch.tensor([1.0], dtype=torch.bfloat16)) == 0x3F80
    assert _fingerprint(torch.tensor([1.0], dtype=torch.float64)) == 0x3FF00000   # low word 0
    assert _fingerprint(torch.tensor([3, 4])) == 7 and _fingerprint([]) == 0
    assert _fingerprint(1.0) == 0x3FF0000000000000 == _fingerprint([0.5, 1.0]) - _fingerprint(0.5)


@pytest.fixture
def one_process_group():
    """A real gloo group of one process (torch.distributed.nn imported first, as setup does)."""
    _import_group_defaults()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def two_ranks(monkeypatch, other_rank) -> None:
    """Play rank 1 in this process: ``other_rank()`` runs first and its all_reduce inputs are kept;
    afterwards each all_reduce here also folds in rank 1's tensor with the operation asked for,
    as a two-process group would. The real one-process all_reduce still checks every call."""
    real, theirs = dist.distributed_c10d.all_reduce, []

    def record(tensor, op=dist.ReduceOp.SUM):
        real(tensor, op=op)
        theirs.append(tensor.clone())
    monkeypatch.setattr(dist, "all_reduce", record)
    other_rank()

    def combine(tensor, op=dist.ReduceOp.SUM):
        real(tensor, op=op)
        fold = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum,
                dist.ReduceOp.MIN: torch.minimum}[op]
        tensor.copy_(fold(tensor, theirs.pop(0)))
    monkeypatch.setattr(dist, "all_reduce", combine)


def test_assert_same_names_exactly_the_entries_that_differ(one_process_group, monkeypatch):
    mine = {"a": torch.ones(3), "b": [1.0, torch.zeros(2)], "c": 5.0}
    theirs = {"a": torch.ones(3), "b": [1.0, torch.tensor([0.0, 1e-30])], "c": 5.5}
    cpu = torch.device("cpu")
    two_ranks(monkeypatch, lambda: assert_same(theirs, cpu))
    with pytest.raises(OutOfSyncError, match=r"^rank 0: b, c differ between processes$"):
        assert_same(mine, cpu)
    two_ranks(monkeypatch, lambda: assert_same(mine, cpu))
    assert_same(mine, cpu)   # identical: silent


def test_assert_same_without_a_process_group_checks_nothing():
    assert not dist.is_initialized()
    assert_same({"a": 1.0}, torch.device("cpu"))


def _trained_state() -> tuple[nn.Module, torch.optim.Optimizer, cbp.Lagrangian]:
    torch.manual_seed(0)
    config = cbp.CBPConfig(levels="ternary", skip_first_last=False)
    model = cbp.prepare(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=0.1)
    return model, optimizer, cbp.Lagrangian(model, config, optimizer)


def test_check_in_sync_covers_weights_buffers_lr_and_cbp_state(one_process_group, monkeypatch):
    model, optimizer, lagrangian = _trained_state()
    other = copy.deepcopy((model, optimizer, lagrangian))
    two_ranks(monkeypatch, lambda: check_in_sync(*other))
    check_in_sync(model, optimizer, lagrangian)   # copies agree

    o_model, o_opt, o_lag = other
    with torch.no_grad():
        next(o_model.parameters())[0, 0] += 1
    o_model[1].running_var[0] += 1
    o_opt.param_groups[-1]["lr"] = 0.2
    next(iter(o_lag.multipliers.values()))[0, 0] = 1
    o_lag.g, o_lag.p, o_lag.lagrangian_sum_pre = o_lag.g + 1, 1, 2.5
    two_ranks(monkeypatch, lambda: check_in_sync(*other, device=torch.device("cpu")))
    with pytest.raises(OutOfSyncError) as err:
        check_in_sync(model, optimizer, lagrangian, device=torch.device("cpu"))
    assert str(err.value) == ("rank 0: parameters, buffers, lr, lambda, g, p, L_sum_pre differ "
                              "between processes")

    two_ranks(monkeypatch, lambda: check_in_sync(o_model, o_opt))   # float training: no CBP
    with pytest.raises(OutOfSyncError, match=r"^rank 0: parameters, buffers, lr differ"):
        check_in_sync(model, optimizer)

    devices = []   # the checksums go where asked (nccl needs them on the GPU), else the model's
    monkeypatch.setattr(cbp.core.distributed, "assert_same", lambda v, device: devices.append(device))
    check_in_sync(model, optimizer)
    check_in_sync(model, optimizer, device=torch.device("cuda", 1))
    assert devices == [torch.device("cpu"), torch.device("cuda", 1)]


def test_sync_batchnorm_converts_for_cuda_and_refuses_cpu():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        sync_batchnorm(model, Context(0, 1, torch.device("cpu")))
    synced = sync_batchnorm(model, Context(0, 1, torch.device("cuda", 0)))   # converts on CPU too
    assert isinstance(synced[1], nn.SyncBatchNorm) and synced[0] is model[0]


def test_broadcast_buffers_gives_this_process_rank_0s_batchnorm_statistics(one_process_group,
                                                                           monkeypatch):
    """Played as rank 1: each broadcast from rank 0 (the real one-process call checks it) brings
    rank 0's value of that buffer, running statistics and batch count alike."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    rank0 = {id(b): (torch.randint(0, 9, b.shape) if not b.is_floating_point() else torch.randn(b.shape))
             for b in model.buffers()}
    real = dist.broadcast

    def from_rank0(tensor, src):
        real(tensor, src=src)
        if src == 0:
            tensor.copy_(rank0[id(tensor)])
    monkeypatch.setattr(dist, "broadcast", from_rank0)
    cbp.core.distributed.broadcast_buffers(model)
    assert len(rank0) == 3 and all(torch.equal(b, rank0[id(b)].to(b.dtype)) for b in model.buffers())


@pytest.mark.parametrize(("value", "enabled"), [(None, False), ("", False), ("0", False), ("1", True),
                                                ("yes", True)])
def test_the_debug_checks_are_on_for_any_value_of_cbp_debug_but_empty_or_0(value, enabled,
                                                                              monkeypatch):
    if value is None:
        monkeypatch.delenv(cbp.core.distributed.DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(cbp.core.distributed.DEBUG_ENV, value)
    assert cbp.core.distributed.debug_enabled() is enabled


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU asked for")
def test_setup_refuses_cuda_on_a_machine_without_one_and_takes_the_cpu_by_default(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="^--device cuda was asked for but no CUDA device"):
            setup(device)
    assert setup(None) == setup("cpu") == Context(0, 1, torch.device("cpu"))


def test_one_process_setup_takes_the_gpu_when_asked_or_available(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup(None) == setup("cuda") == Context(0, 1, torch.device("cuda"))
    assert setup("cpu") == Context(0, 1, torch.device("cpu"))


@pytest.fixture
def under_torchrun(monkeypatch):
    """``setup`` as one of two torchrun processes runs it, played in this process: joining the
    group records its backend; the group then says rank 3 of 4 (whatever torchrun's variables)."""
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", backends.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(cbp.core.distributed, "_import_group_defaults", lambda: None)
    return backends


def test_under_torchrun_setup_joins_a_gloo_group_on_the_cpu(under_torchrun, monkeypatch):
    assert setup("cpu") == Context(3, 4, torch.device("cpu")) and under_torchrun == ["gloo"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)   # joined already: not again
    assert setup("cpu") == Context(3, 4, torch.device("cpu")) and under_torchrun == ["gloo"]


def test_under_torchrun_setup_takes_the_gpu_of_its_local_rank(under_torchrun, monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert setup(None) == Context(3, 4, torch.device("cuda", 0))   # LOCAL_RANK unset: GPU 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup("cuda") == Context(3, 4, torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert under_torchrun == ["nccl", "nccl"]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="^local rank 2 has no GPU: this node has 2; lower "
                                         "--nproc_per_node$"):
        setup("cuda")
    assert len(chosen) == 2


def test_barrier_names_this_processs_gpu_to_nccl_and_none_to_gloo(monkeypatch):
    waited = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None: waited.append(device_ids))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend in ("nccl", "gloo"):
        monkeypatch.setattr(dist, "get_backend", lambda backend=backend: backend)
        barrier()
    assert waited == [[3], None]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)   # one process: nothing to wait for
    barrier()
    assert waited == [[3], None]


def test_all_reduce_sum_adds_every_processs_values_in_place(one_process_group, monkeypatch):
    two_ranks(monkeypatch, lambda: all_reduce_sum(torch.tensor([1.0, 2.0])))
    mine = torch.tensor([10.0, 20.0])
    assert all_reduce_sum(mine) is mine and torch.equal(mine, torch.tensor([11.0, 22.0]))


def test_all_reduce_mean_averages_every_processs_values_in_place(one_process_group, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    two_ranks(monkeypatch, lambda: all_reduce_mean(torch.tensor([1.0, 2.0])))
    mine = torch.tensor([3.0, 6.0])
    assert all_reduce_mean(mine) is mine and torch.equal(mine, torch.tensor([2.0, 4.0]))
