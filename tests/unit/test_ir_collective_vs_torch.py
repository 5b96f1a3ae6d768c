"""all_reduce against torch.distributed, and the shard spec's slicing against torch.chunk.

One program alone is a group of one rank, so all_reduce's reference must equal what
torch.distributed's all_reduce returns in a one-process gloo group. In `run_sharded` every rank
gets the sum of all ranks' inputs, which is checked against torch's sum of the stacked inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mlcc import ir
from mlcc.ir.collective import ShardSpec, run_sharded


@pytest.fixture(scope="module")
def gloo_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in this torch")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


def _module(shape, dtype: str = "float32") -> ir.Module:
    mb = ir.ModuleBuilder("collective")
    with mb.function("f") as b:
        x = b.input("x", shape, dtype)
        b.output(b.emit("all_reduce", x))
    return mb.finish()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_all_reduce_of_one_rank_equals_torch_distributed(gloo_group, dtype):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(dtype)
    (ours,) = ir.interpret(_module((ir.Sym("n"), 5), dtype), "f", [x], {})
    theirs = torch.from_numpy(x.copy())
    dist.all_reduce(theirs)
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_run_sharded_sums_over_ranks_like_torch(shards):
    rng = np.random.default_rng(shards)
    xs = [rng.standard_normal((2, 7)).astype(np.float32) for _ in range(shards)]
    module = _module((2, 7))
    outs = run_sharded([module] * shards, "f", [[x] for x in xs], [{}] * shards)
    expected = torch.stack([torch.from_numpy(x) for x in xs]).sum(0).numpy()
    for (out,) in outs:
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_shard_spec_segments_slice_like_torch_chunk():
    # qkv rows: q 8, k 4, v 4 split over 2 ranks per segment
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    spec = ShardSpec(2, 0, ((8, 2), (4, 2), (4, 2)))
    t = torch.from_numpy(w)
    q, k, v = torch.split(t, [8, 4, 4])
    for rank in range(2):
        expected = torch.cat([q.chunk(2)[rank], k.chunk(2)[rank], v.chunk(2)[rank]])
        np.testing.assert_array_equal(spec.take(w, rank), expected.numpy())
    assert spec.local_shape(w.shape) == (8, 3)


def test_shard_spec_shared_chunks_and_rank_zero_bias():
    # 2 key/value heads over 4 ranks: ranks 0, 1 share head 0 and ranks 2, 3 head 1
    w = np.arange(8, dtype=np.float32).reshape(2, 4)
    spec = ShardSpec(4, 1, ((4, 2),))
    parts = [spec.take(w, r) for r in range(4)]
    halves = torch.from_numpy(w).chunk(2, dim=1)
    for rank, part in enumerate(parts):
        np.testing.assert_array_equal(part, halves[rank // 2].numpy())
    bias = np.ones(3, np.float32)
    once = ShardSpec(4, rank_zero_only=True)
    np.testing.assert_array_equal(sum(once.take(bias, r) for r in range(4)), bias)
    assert ShardSpec.from_json(spec.to_json()) == spec
