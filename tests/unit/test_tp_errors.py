"""The one-line errors of tensor-parallel runs that need GPUs, checked on a machine without
them: NCCL missing, torch.distributed missing, more shards than visible GPUs."""

from __future__ import annotations

import sys

import pytest

from mlcc.errors import MlccError
from mlcc.runtime_check.tensor_parallel_workers import check_group

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")


def test_nccl_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(MlccError, match=r"tensor_parallel_shards=2 on CUDA needs "
                       r"torch.distributed with NCCL, which this torch .* lacks; install the "
                       r"CUDA build of torch") as err:
        check_group(2, 0)
    assert "\n" not in str(err.value)


def test_torch_distributed_missing_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed", None)  # import fails
    with pytest.raises(MlccError, match=r"tensor_parallel_shards=4 on the CPU needs torch with "
                       r"torch.distributed .*install torch"):
        check_group(4, None)


def test_more_shards_than_gpus_says_how_many_are_visible(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(MlccError, match=r"tensor_parallel_shards=4 starting at cuda:0 needs "
                       r"GPUs 0\.\.3, but 2 are visible \(CUDA_VISIBLE_DEVICES=0,1\); use at most "
                       r"2 shards or a machine with more GPUs"):
        check_group(4, 0)
    check_group(2, 0)  # two shards on two GPUs: no error


def test_cpu_ranks_need_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_group(4, None)
