"""The append kernel of the CUDA qkv_attention (rotate k, write k and v into the page pool), run on
the CPU with the host-thread shim of test_cuda_elementwise_vec.

A thread handles the feature pair (q, q + d/2) and looks the token's page up once; the test
compares every pool row the kernel writes, and the rows it must leave alone, with a NumPy
reference: rotary embedding in float32 (rotate_half or interleaved, over the whole head or a
part of it) rounded to float16, values copied, slots through the page table (a ring that has
wrapped, with sinks, for a sliding window).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from test_cuda_elementwise_vec import run_host
from test_cuda_flash_attention import attention_spec

from mlcc.backends.cuda.attention import APPEND_THREADS, DECODE_ROWS, gen_qkv_attention
from mlcc.backends.llvm.fallback import inv_freq_table

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def with_rope(spec, style: str, rotary: int):
    attrs = dict(spec.attrs)
    attrs.update(rope_style=style, rotary_dim=rotary)
    return replace(spec, attrs=tuple(sorted(attrs.items())))


def rotate(k: np.ndarray, pos: np.ndarray, inv: np.ndarray, style: str, rotary: int):
    """(n, heads, d) float16 keys rotated to `pos` in float32, rounded to float16."""
    x = k.astype(np.float32)
    out = x.copy()
    c = np.arange(rotary)
    if style == "rotate_half":
        half = rotary // 2
        freq, partner, sign = c % half, np.where(c < half, c + half, c - half), np.where(
            c < half, -1.0, 1.0)
    else:
        freq, partner, sign = c // 2, c ^ 1, np.where(c % 2 == 0, -1.0, 1.0)
    angle = pos.astype(np.float32)[:, None] * inv[freq][None, :]  # (n, rotary)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    out[..., :rotary] = x[..., c] * cos + sign.astype(np.float32) * x[..., partner] * sin
    return out.astype(np.float16)


CASES = [  # (q heads, kv heads, d, window, sinks, start, tokens, style, rotary)
    (4, 2, 128, -1, 0, 0, 9, "rotate_half", 128),
    (4, 4, 64, -1, 0, 37, 5, "interleaved", 64),
    (2, 2, 64, -1, 0, 3, 6, "rotate_half", 32),
    (4, 2, 64, 8, 4, 530, 7, "rotate_half", 64),
    (4, 2, 64, -1, 0, 11, 1, "rotate_half", 64),  # a decode row: a block per KV head
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[7]}_{c[2]}_w{c[3]}" for c in CASES])
def test_append_writes_rotated_keys_and_values_into_their_slots(tmp_path, case):
    hq, hkv, d, window, sinks, start, n, style, rotary = case
    spec = with_rope(attention_spec(hq=hq, hkv=hkv, d=d, window=window, sinks=sinks, rows=n),
                     style, rotary)
    kv = dict(spec.kv)
    kernel = gen_qkv_attention(spec, "k0_qkv_attention", flash=False)
    source = kernel.device_source
    body = source[:source.index("__device__ __forceinline__ int k0_qkv_attention_attend")]
    rng = np.random.default_rng(start)
    pages, page = kv["pages"], kv["page_size"]
    arrays = {"qkv": rng.standard_normal((n, (hq + 2 * hkv) * d)).astype(np.float16),
              "y": np.zeros((n, hq * d), np.float16),
              "seq_info": np.array([start, 0], np.int32),
              "page_table": rng.permutation(pages).astype(np.int32),
              "pool": rng.standard_normal((pages, 2, hkv, page, d)).astype(np.float16)}
    before = arrays["pool"].copy()
    # the launcher's grid: a block per token for chunks, per (token, KV head) for decode rows
    heads = 1 if n <= DECODE_ROWS else hkv
    threads = max(32, min(heads * (d // 2), APPEND_THREADS))
    assert f"T.thread_binding({threads}," in kernel.launcher
    call = ("k0_qkv_attention_append(qkv.data(), y.data(), seq_info.data(), page_table.data(),"
            " pool.data())")
    pool = run_host(tmp_path, kernel, call, threads, n * hkv // heads, arrays, ["pool"],
                    body)["pool"]

    pos = np.arange(start, start + n)
    slots = pos
    if kv["ring"]:
        slots = np.where(pos < sinks, pos, sinks + (pos - sinks) % (kv["capacity"] - sinks))
    heads = arrays["qkv"].reshape(n, hq + 2 * hkv, d)
    inv = inv_freq_table(spec).astype(np.float32)
    keys = rotate(heads[:, hq:hq + hkv], pos, inv, style, rotary)
    expected = before.copy()
    rows = arrays["page_table"][slots // page]
    expected[rows, 0, :, slots % page, :] = keys
    expected[rows, 1, :, slots % page, :] = heads[:, hq + hkv:]
    np.testing.assert_allclose(pool.astype(np.float32), expected.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    # values are copies and untouched rows keep their bytes
    np.testing.assert_array_equal(pool[:, 1], expected[:, 1])
