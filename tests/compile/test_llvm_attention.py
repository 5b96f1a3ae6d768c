"""Rotary embedding, paged KV append and attention against NumPy.

A sequence is fed in chunks of different sizes (prefill kernels with a symbolic seq_len, then
decode kernels with one row) into a page pool whose page table is a random permutation; after
every call the attention output and the cache slots written are compared with a dense NumPy
reference. Windowed cases run past the window so the ring wraps around several times.
"""

from __future__ import annotations

import numpy as np
import pytest
from llvm_cache import (
    assert_close,
    attention_reference,
    inv_freq,
    kernel_cache,  # noqa: F401  (pytest fixture)
    ring_slot,
    rope_reference,
    tensors,
)

from mlcc.backends.layouts import PagedKVSpec
from mlcc.backends.llvm import paged_attention as A
from mlcc.errors import MlccError

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
ROPE_CASES = {  # name: (q heads, kv heads, head_dim, rotary_dim, style, scaling)
    "half": (4, 2, 16, 16, "rotate_half", None),
    "partial": (4, 4, 16, 8, "rotate_half", None),
    "interleaved": (2, 1, 8, 8, "interleaved", None),
    "linear": (2, 2, 8, 8, "rotate_half", {"rope_type": "linear", "factor": 4.0}),
    "llama3": (4, 2, 32, 32, "rotate_half", LLAMA3),
}


def make_rope(dt: str) -> list:
    return [A.rope(f"rope_{name}_{dt}", "seq_len", hq, hkv, d, r, 10000.0, dt, style, scaling)
            for name, (hq, hkv, d, r, style, scaling) in ROPE_CASES.items()]


@pytest.mark.parametrize("dt", ["float32", "float16"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_in_place_on_q_and_k_heads(kernel_cache, dt, case):  # noqa: F811
    ex = kernel_cache.get(f"rope_{dt}", lambda: make_rope(dt))
    hq, hkv, d, r, style, scaling = ROPE_CASES[case]
    rng = np.random.default_rng(11)
    inv = inv_freq(r, 10000.0, scaling)
    for n, start in ((1, 0), (6, 3), (9, 1000)):
        qkv = rng.standard_normal((n, (hq + 2 * hkv) * d)).astype(dt)
        args = tensors(qkv, np.array([start, 0], np.int32))
        ex[f"rope_{case}_{dt}"](*args)
        expected = rope_reference(qkv, np.arange(start, start + n), hq + hkv, d, r, inv, style)
        assert_close(args[0].numpy(), expected, dt, scale=4.0)


# (q heads, kv heads, head_dim, window, sinks, chunk sizes of the sequence)
CACHE_CASES = {
    "full": (4, 2, 16, -1, 0, [5, 1, 1, 19, 1, 1]),
    "mqa_window": (4, 1, 48, 8, 0, [5, 1, 7, 7, 7, 1, 1, 1]),
    "window_sinks": (2, 2, 8, 8, 4, [7, 7, 7, 7, 1, 1, 1, 1, 7, 1]),
}
DTYPES = [("float32", "float32"), ("float16", "float16"), ("float32", "float16")]


def cache_spec(case: str, kv_dtype: str) -> tuple[PagedKVSpec, int]:
    _, hkv, d, window, sinks, chunks = CACHE_CASES[case]
    if window > 0:
        capacity = -(-(sinks + window + max(chunks)) // 16) * 16
        per_seq = capacity // 16
    else:
        capacity, per_seq = -1, -(-sum(chunks) // 16)
    return PagedKVSpec(hkv, d, kv_dtype, per_seq + 3, window, sinks, capacity), per_seq


def make_cache_kernels(case: str, dt: str, kv_dt: str) -> list:
    hq = CACHE_CASES[case][0]
    spec, _ = cache_spec(case, kv_dt)
    tag = f"{case}_{dt}_{kv_dt}"
    return [A.kv_append(f"append_{tag}", "seq_len", hq, spec, dt),
            A.attention(f"attend_{tag}", "seq_len", hq, spec, dt),
            A.kv_append(f"append1_{tag}", 1, hq, spec, dt),
            A.attention(f"attend1_{tag}", 1, hq, spec, dt)]


@pytest.mark.parametrize("dt,kv_dt", DTYPES)
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_append_then_attend_over_a_sequence(kernel_cache, case, dt, kv_dt):  # noqa: F811
    tag = f"{case}_{dt}_{kv_dt}"
    ex = kernel_cache.get(f"cache_{tag}", lambda: make_cache_kernels(case, dt, kv_dt))
    hq, hkv, d, window, sinks, chunks = CACHE_CASES[case]
    spec, per_seq = cache_spec(case, kv_dt)
    rng = np.random.default_rng(len(tag))
    table_np = rng.permutation(spec.num_pages)[:per_seq].astype(np.int32)
    pages, table = tensors(np.zeros(spec.page_shape, kv_dt), table_np)
    keys, values, start = [], [], 0
    for n in chunks:
        qkv = rng.standard_normal((n, (hq + 2 * hkv) * d)).astype(dt)
        info = np.array([start, 0], np.int32)
        suffix = "1" if n == 1 else ""
        qkv_t, info_t, out = tensors(qkv, info, np.zeros((n, hq * d), dt))
        ex[f"append{suffix}_{tag}"](qkv_t, pages, table, info_t)
        ex[f"attend{suffix}_{tag}"](qkv_t, pages, table, info_t, out)
        k = qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).astype(kv_dt)
        v = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d).astype(kv_dt)
        keys.append(k.astype(np.float32))
        values.append(v.astype(np.float32))
        q = qkv[:, :hq * d].reshape(n, hq, d).astype(np.float32)
        expected = attention_reference(q, np.concatenate(keys), np.concatenate(values), start,
                                       window, sinks)
        assert_close(out.numpy().reshape(n, hq, d), expected, "float32" if dt == kv_dt ==
                     "float32" else "float16")
        pool = pages.numpy()
        for i in range(n):
            slot = ring_slot(start + i, spec.capacity, sinks, spec.windowed)
            row = pool[table_np[slot // 16], :, :, slot % 16]
            np.testing.assert_array_equal(row[0], k[i])
            np.testing.assert_array_equal(row[1], v[i])
        start += n


def test_physical_slot_is_the_ring_of_design():
    spec = PagedKVSpec(1, 8, "float32", 4, sliding_window=8, attention_sink=4, capacity=32)
    for pos in range(200):
        assert spec.physical_slot(pos) == ring_slot(pos, 32, 4, True)
    plain = PagedKVSpec(1, 8, "float32", 4)
    assert [plain.physical_slot(p) for p in (0, 17, 63)] == [0, 17, 63]


def test_ring_capacity_and_head_checks():
    with pytest.raises(MlccError, match="capacity 16 must be a multiple of 16 larger than"):
        PagedKVSpec(1, 8, "float32", 4, sliding_window=12, attention_sink=4, capacity=16)
    spec = PagedKVSpec(1, 8, "float32", 4, sliding_window=8, attention_sink=4, capacity=32)
    with pytest.raises(MlccError, match="raise the capacity to 48"):
        spec.check_chunk(30)
    with pytest.raises(MlccError, match="multiple of kv heads 2"):
        A.attention("a", 1, 3, PagedKVSpec(2, 8, "float32", 4), "float32")
    with pytest.raises(MlccError, match="rotary_dim 6 must be even and in"):
        A.rope("r", 1, 2, 2, 4, 6, 1e4, "float32")
    with pytest.raises(MlccError, match="rope scaling 'yarn'"):
        A.rope("r", 1, 2, 2, 8, 8, 1e4, "float32", scaling={"rope_type": "yarn"})


def test_from_layout_reads_the_kv_layout_pass_attribute():
    ring = {"page_size": 16, "pages": 3, "capacity": 48, "ring": True, "window": 8,
            "sinks": 4, "dtype": "float16", "kv_heads": 2, "head_dim": 64}
    spec = PagedKVSpec.from_layout(ring)
    assert (spec.sliding_window, spec.attention_sink, spec.capacity) == (8, 4, 48)
    full = PagedKVSpec.from_layout({**ring, "ring": False, "pages": 128})
    assert not full.windowed and full.num_pages == 128


def test_positions_past_the_page_table_stay_inside_the_pool(kernel_cache):  # noqa: F811
    spec = PagedKVSpec(1, 16, "float32", 2)
    ex = kernel_cache.get("clamp", lambda: [A.kv_append("clamp_append", "seq_len", 1, spec,
                                                        "float32")])
    qkv = np.ones((4, 48), np.float32)
    pool, table = tensors(np.zeros(spec.page_shape, np.float32), np.array([9], np.int32))
    ex["clamp_append"](tensors(qkv)[0], pool, table, tensors(np.array([40, 0], np.int32))[0])
    written = pool.numpy()
    assert written[0].sum() == 0 and written[1].sum() == 4 * 2 * 16  # page 9 clamps to 1
