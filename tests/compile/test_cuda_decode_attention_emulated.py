"""The one-launch CUDA decode attention (mlcc.backends.cuda.decode_attention) run on the CPU.

The generated device source is compiled with g++ against a shim: a block is 128 host threads
(kept for the whole grid, each block's index handed to all of them), `__shared__` arrays are
statics, `__syncthreads` a std::barrier, `__shfl_xor_sync` an exchange at a warp barrier,
atomicAdd a sequentially consistent fetch-add, `__threadfence` a full fence and `__ldcg` a
plain load. Blocks run one after another in a shuffled order, so any split may be the last to
arrive and merge. The append kernel of the two-kernel path runs in the same program on a copy
of the pool.

Checks: the output against a NumPy float64 reference (rotary in float32 with the query rounded
to the activation dtype, softmax over exactly the visible positions read through the page
table, the new rows' keys and values included); the pool after the call equal bit for bit to
what the append kernel writes; the per-(row, head) counters back to 0. Cases: the Llama-2-7B
head at positions 0, 1, 100 and 1000, GQA, head_dim 64, several rows, a sliding window with
sinks in a ring that has wrapped, float32 activations, one split, and a split with no position.
Also: the kernels compile for sm_90 without spills, with 16-byte loads, and the Llama-2-7B
decode entry attends in one launch while its prefill keeps append + the tensor-core kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from host_shim import MLCC_HOST
from nvcc_probe import cubin_report, entry_ptx, probe_stats
from test_cuda_flash_emulated import load_bench

from mlcc.backends.cuda import decode_attention
from mlcc.backends.cuda.attention import APPEND_THREADS, gen_qkv_attention
from mlcc.backends.cuda.codegen import device_source
from mlcc.backends.cuda.decode_attention import (
    CHUNK,
    MAX_SPLITS,
    SOLO,
    UNROLL,
    WARPS,
    WIDE,
    gen_decode_attention,
    split_ranges,
    static_splits,
    use_decode,
)
from mlcc.backends.cuda.kernels import C_TYPES, GRID_WAIT
from mlcc.backends.llvm.fallback import inv_freq_table
from mlcc.backends.plan import KernelSpec

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
typedef _Float16 half;
struct uint4 { unsigned x, y, z, w; };
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim;
inline float __half2float(half v) { return (float)v; }
inline half __float2half(float v) { return (half)v; }
""" + MLCC_HOST + r"""
static std::barrier<>* g_block;
inline void __syncthreads() { g_block->arrive_and_wait(); }
static std::barrier<>* g_warp[32];
static float g_lanes[32][32];
inline float __shfl_xor_sync(unsigned, float v, int m) {
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  g_lanes[w][l] = v;
  g_warp[w]->arrive_and_wait();
  const float r = g_lanes[w][l ^ m];
  g_warp[w]->arrive_and_wait();
  return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float __ldcg(const float* p) { return *p; }
// the L2 prefetches: their byte offsets in the pool, for the test to check
#include <mutex>
static const char* g_pf_base;
static std::mutex g_pf_mutex;
static std::vector<long long> g_pf;
inline void mlcc_prefetch_l2(const void* p) {
  std::lock_guard<std::mutex> hold(g_pf_mutex);
  g_pf.push_back((const char*)p - g_pf_base);
}
"""

# every thread of the block stays for the whole grid; blocks run in `order`
RUNNER = r"""
template <class Body>
void run_grid(unsigned threads, std::vector<unsigned> order, Body body) {
  blockDim = {threads, 1, 1};
  std::barrier<> block(threads), done(threads);
  g_block = &block;
  for (unsigned w = 0; w < threads / 32; ++w) g_warp[w] = new std::barrier<>(32);
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned b : order) { blockIdx = {b, 0, 0}; body(); done.arrive_and_wait(); }
    });
  for (auto& th : workers) th.join();
  for (unsigned w = 0; w < threads / 32; ++w) delete g_warp[w];
}
std::vector<unsigned> shuffled(unsigned n, unsigned seed) {
  std::vector<unsigned> order(n);
  for (unsigned b = 0; b < n; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  return order;
}
template <class T>
void load(std::vector<T>& v, const char* path) {
  FILE* f = fopen(path, "rb"); fread(v.data(), sizeof(T), v.size(), f); fclose(f);
}
template <class T>
void save(const T* v, size_t n, const char* path) {
  FILE* f = fopen(path, "wb"); fwrite(v, sizeof(T), n, f); fclose(f);
}
"""


def decode_spec(hq: int, hkv: int, d: int, rows: int, window: int = -1, sinks: int = 0,
                capacity: int = 1040, dtype: str = "float16", rotary: int = 0) -> KernelSpec:
    """qkv_attention of `rows` static decode rows over a cache of `capacity` positions (a ring
    of `capacity` slots with a window); rotate_half over the first `rotary` features (all
    when 0)."""
    return KernelSpec(
        "qkv_attention", (((rows, (hq + 2 * hkv) * d), dtype),), (((rows, hq * d), dtype),),
        (("batched", False), ("num_q_heads", hq), ("rope_scaling", None),
         ("rope_style", "rotate_half"), ("rope_theta", 10000.0), ("rotary_dim", rotary or d),
         ("scale", None)),
        (("capacity", capacity), ("dtype", dtype), ("head_dim", d), ("kv_heads", hkv),
         ("page_size", 16), ("pages", capacity // 16), ("pages_per_seq", capacity // 16),
         ("ring", window > 0), ("sinks", sinks), ("window", window)))


def driver(spec: KernelSpec, arrays: dict, tmp_path, seed: int, splits: int,
           warps: int = WARPS) -> str:
    kv = dict(spec.kv)
    rows, hq, hkv, d = spec.inputs[0][0][0], spec.attr("num_q_heads"), kv["kv_heads"], kv[
        "head_dim"]
    ct = C_TYPES[kv["dtype"]]
    reads = "".join(f'  load({b}, "{tmp_path}/{b}.bin");\n' for b in arrays)
    args = "qkv.data(), y.data(), seq_info.data(), page_table.data(), {pool}.data()"
    append_threads = max(32, min(d // 2, APPEND_THREADS))
    return f"""
static std::vector<{ct}> qkv({arrays["qkv"].size}), y({arrays["y"].size});
static std::vector<{ct}> pool({arrays["pool"].size}), pool_append;
static std::vector<int> seq_info(2), page_table({arrays["page_table"].size});
int main() {{
{reads}  pool_append = pool;
  run_grid({append_threads}, shuffled({rows * hkv}, {seed}),
           [] {{ a0_qkv_attention_append({args.format(pool="pool_append")}); }});
  g_pf_base = reinterpret_cast<const char*>(pool.data());
  run_grid({warps * 32}, shuffled({rows * hq * splits}, {seed + 1}),
           [] {{ k0_qkv_attention_decode({args.format(pool="pool")}); }});
  save(y.data(), y.size(), "{tmp_path}/y.out");
  save(pool.data(), pool.size(), "{tmp_path}/pool.out");
  save(pool_append.data(), pool_append.size(), "{tmp_path}/pool_append.out");
  save(k0_qkv_attention_cnt, {rows * hq}, "{tmp_path}/cnt.out");
  save(g_pf.data(), g_pf.size(), "{tmp_path}/prefetch.out");
  return 0;
}}
"""


def run_emulated(tmp_path, spec: KernelSpec, arrays: dict, seed: int, **options) -> dict:
    kernel = gen_decode_attention(spec, "k0_qkv_attention", **options)
    splits = static_splits(spec, **{k: v for k, v in options.items()
                                    if k in ("chunk", "max_splits")})
    blocks = spec.inputs[0][0][0] * spec.attr("num_q_heads") * splits  # rows x heads x splits
    assert f"T.thread_binding(T.int64({blocks})," in kernel.launcher
    append = gen_qkv_attention(spec, "a0_qkv_attention", flash=False).device_source
    append = append[:append.index("__device__ __forceinline__ int a0_qkv_attention_attend")]
    source = (SHIM + append + kernel.device_source + RUNNER
              + driver(spec, arrays, tmp_path, seed, splits, options.get("warps", WARPS)))
    (tmp_path / "k.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-pthread", "-o",
                           str(tmp_path / "k"), str(tmp_path / "k.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for b, a in arrays.items():
        a.tofile(tmp_path / f"{b}.bin")
    subprocess.run([str(tmp_path / "k")], check=True, timeout=600)
    dt = arrays["pool"].dtype
    out = {b: np.fromfile(tmp_path / f"{b}.out", dt).reshape(arrays["pool"].shape)
           for b in ("pool", "pool_append")}
    out["y"] = np.fromfile(tmp_path / "y.out", dt).reshape(arrays["y"].shape)
    out["cnt"] = np.fromfile(tmp_path / "cnt.out", np.uint32)
    out["prefetch"] = np.fromfile(tmp_path / "prefetch.out", np.int64)
    return out


def visible(kv: dict, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, pool slots) the query at position `p` sees: all up to it, or the window and
    the sinks; slots wrap in a ring past the sinks."""
    window, sinks = kv["window"], kv["sinks"]
    j = np.arange(p + 1)
    if window > 0:
        j = j[(j >= p - window + 1) | (j < sinks)]
    slots = j if not kv["ring"] else np.where(
        j < sinks, j, sinks + (j - sinks) % (kv["capacity"] - sinks))
    return j, slots


def cached_slots(spec: KernelSpec, start: int, rows: int) -> set[int]:
    """Pool slots of the positions before the chunk that some row of it sees."""
    kv = dict(spec.kv)
    slots = set()
    for i in range(rows):
        j, at = visible(kv, start + i)
        slots.update(at[j < start].tolist())
    return slots


def check_prefetches(spec: KernelSpec, arrays: dict, offsets: np.ndarray, start: int) -> None:
    """Every L2 prefetch is the start of a 128-byte line of a key or value row of a cached
    position the chunk sees (never one of the chunk's rows, which the kernel writes)."""
    pool = arrays["pool"]
    item = pool.dtype.itemsize
    assert (offsets % item == 0).all() and (offsets >= 0).all() and (offsets < pool.nbytes).all()
    page_no, _, _, in_page, col = np.unravel_index(offsets // item, pool.shape)
    assert ((col * item) % 128 == 0).all(), col
    page_of = np.argsort(arrays["page_table"])  # pool page -> the sequence's page index
    slots = page_of[page_no] * 16 + in_page
    allowed = cached_slots(spec, start, spec.inputs[0][0][0])
    assert set(slots.tolist()) <= allowed, sorted(set(slots.tolist()) - allowed)[:8]


def rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray, dtype) -> np.ndarray:
    """rotate_half rotary of the first 2 * len(inv) features of (n, heads, d) rows in float32,
    rounded to `dtype`, as float64; the other features pass unchanged."""
    half = inv.size
    angle = pos.astype(np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x = x.astype(np.float32)
    lo, hi = x[..., :half], x[..., half:2 * half]
    out = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin, x[..., 2 * half:]], -1)
    return out.astype(dtype).astype(np.float64)


def reference(spec: KernelSpec, arrays: dict, pool: np.ndarray) -> np.ndarray:
    """(rows, hq * d) float64 attention of the rows over `pool` (the pool after the append)."""
    kv = dict(spec.kv)
    hq, hkv, d, page = spec.attr("num_q_heads"), kv["kv_heads"], kv["head_dim"], kv["page_size"]
    rows, start = arrays["qkv"].shape[0], int(arrays["seq_info"][0])
    inv = inv_freq_table(spec).astype(np.float32)
    pos = np.arange(start, start + rows)
    q = rope(arrays["qkv"].reshape(rows, -1, d)[:, :hq], pos, inv, arrays["qkv"].dtype)
    out = np.zeros((rows, hq, d))
    for i, p in enumerate(pos):
        _, slots = visible(kv, p)
        rows_kv = pool[arrays["page_table"][slots // page], :, :, slots % page, :]
        keys, values = (rows_kv[:, 0].astype(np.float64), rows_kv[:, 1].astype(np.float64))
        for h in range(hq):
            g = h // (hq // hkv)
            s = keys[:, g] @ q[i, h] / np.sqrt(d)
            w = np.exp(s - s.max())
            out[i, h] = w @ values[:, g] / w.sum()
    return out.reshape(rows, hq * d)


CASES = [  # (id, hq, hkv, d, rows, window, sinks, capacity, start, dtype, options, rotary)
    ("7b_at_0", 32, 32, 128, 1, -1, 0, 1040, 0, "float16", {}),
    ("7b_at_1", 32, 32, 128, 1, -1, 0, 1040, 1, "float16", {}),
    ("7b_at_100", 32, 32, 128, 1, -1, 0, 1040, 100, "float16", {}),
    pytest.param(("7b_at_1000", 32, 32, 128, 1, -1, 0, 1040, 1000, "float16", {}),
                 marks=pytest.mark.slow),
    ("gqa_32_8_at_300", 32, 8, 128, 1, -1, 0, 1040, 300, "float16", {}),
    ("d64_3_rows_at_200", 4, 2, 64, 3, -1, 0, 512, 200, "float16", {}),
    ("window_ring_wrapped", 4, 2, 64, 2, 40, 4, 64, 530, "float16", {"solo": 0}),
    ("window_ring_wrapped_solo", 4, 2, 64, 2, 40, 4, 64, 530, "float16", {}),
    ("float32_2_rows", 4, 2, 64, 2, -1, 0, 512, 77, "float32", {}),
    ("float32_d128", 2, 1, 128, 1, -1, 0, 512, 150, "float32", {}),
    ("one_split", 4, 4, 128, 1, -1, 0, 512, 300, "float16", {"max_splits": 1}),
    # three rounds of 32 positions in one block, the last one partial
    ("one_split_three_rounds", 4, 4, 128, 1, -1, 0, 512, 80, "float16",
     {"max_splits": 1, "solo": 0}),
    ("head_dim_8", 8, 8, 8, 1, -1, 0, 512, 70, "float16", {}),  # the GPU parity models
    ("head_dim_8_float32", 8, 4, 8, 2, -1, 0, 512, 40, "float32", {}),
    ("empty_split", 4, 2, 64, 2, -1, 0, 64, 8, "float16",
     {"chunk": 1, "max_splits": 4, "solo": 0}),
    ("partial_rotary_d32", 4, 4, 32, 1, -1, 0, 512, 45, "float16", {}, 8),  # as GPT-NeoX
    # sixteen warps, eight positions a lane group a round: 150 positions in one block's round
    ("7b_at_150_16_warps_solo", 32, 32, 128, 1, -1, 0, 1040, 150, "float16",
     {"warps": 16, "unroll": 8, "solo": 256}),
    # eight warps over splits of 64 positions, two rows
    ("gqa_2_rows_at_300_8_warps", 8, 2, 128, 2, -1, 0, 1040, 300, "float16",
     {"warps": 8, "chunk": 64, "solo": 128}),
]


@pytest.mark.parametrize("case", CASES, ids=[(c.values[0] if hasattr(c, "values") else c)[0]
                                              for c in CASES])
def test_decode_attention_on_host_threads_matches_numpy_and_the_append_kernel(tmp_path, case):
    check_case(tmp_path, case)


# The lean attention (`lean_attention`: early first angle, lane groups merged through
# shuffles) on the shapes where it differs: full and partial rotary, GQA, several rows,
# windows with sinks, float32, 8 and 16 warps, a split without positions
LEAN_CASES = ["7b_at_1", "7b_at_100", "gqa_32_8_at_300", "d64_3_rows_at_200",
              "window_ring_wrapped", "float32_2_rows", "head_dim_8_float32", "empty_split",
              "partial_rotary_d32", "7b_at_150_16_warps_solo", "gqa_2_rows_at_300_8_warps"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in LEAN_CASES],
                         ids=[c[0] for c in CASES if c[0] in LEAN_CASES])
def test_the_lean_decode_attention_matches_numpy_and_the_append_kernel(tmp_path, case):
    check_case(tmp_path, case, lean=True)


def check_case(tmp_path, case, lean: bool = False) -> None:
    """The kernel of `case` run on host threads: the pool bytes the append kernel writes, the
    NumPy reference's output and the GPU benchmark's validation."""
    _, hq, hkv, d, rows, window, sinks, capacity, start, dtype, options, *rotary = case
    spec = decode_spec(hq, hkv, d, rows, window, sinks, capacity, dtype, *rotary)
    assert use_decode(spec)
    if lean:
        spec = decode_attention.mark_lean(spec)
        assert decode_attention.lean(spec)
    kv = dict(spec.kv)
    rng = np.random.default_rng(start + rows + hq)
    arrays = {"qkv": rng.standard_normal((rows, (hq + 2 * hkv) * d)).astype(dtype),
              "y": np.zeros((rows, hq * d), dtype),
              "seq_info": np.array([start, 0], np.int32),
              "page_table": rng.permutation(kv["pages"]).astype(np.int32),
              "pool": rng.standard_normal((kv["pages"], 2, hkv, 16, d)).astype(dtype)}
    out = run_emulated(tmp_path, spec, arrays, seed=start, **options)
    # the pool: exactly the append kernel's bytes, and only the new rows changed
    assert np.array_equal(out["pool"].view(np.uint8), out["pool_append"].view(np.uint8))
    changed = np.argwhere((out["pool"] != arrays["pool"]).any(-1))
    assert len({(p, s) for p, _, _, s in changed}) <= rows
    assert (out["cnt"] == 0).all(), out["cnt"]
    check_prefetches(spec, arrays, out["prefetch"], start)
    if case[0] in ("7b_at_100", "one_split_three_rounds", "one_split"):
        assert len(out["prefetch"]) > 0  # more than one round a block: the next ones prefetched
    expected = reference(spec, arrays, out["pool_append"])
    tolerance = 2e-3 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(out["y"].astype(np.float64), expected, atol=tolerance, rtol=0)
    if dtype == "float16" and d == 128:  # the GPU benchmark's validation accepts it too
        bench = load_bench()
        config = {"shape": (hq, hkv, d, window, sinks), "kv": kv,
                  "inv_freq": inv_freq_table(spec).astype(np.float32).tolist()}
        inputs = {k: arrays[k] for k in ("qkv", "page_table", "seq_info")}
        errors = bench.check(pytest.importorskip("torch"), config, inputs, out["y"],
                             out["pool"], start, device="cpu")
        assert errors["k_err"] < 2e-3 and errors["v_err"] == 0, errors
        assert errors["y_err"] < 2e-3, errors


def test_the_empty_split_case_has_a_split_without_positions():
    # position 8 sees 9 positions: 4 splits of 3, the last one empty
    spec = decode_spec(4, 2, 64, 2, capacity=64)
    splits = static_splits(spec, chunk=1, max_splits=4)
    assert splits == 4
    ranges = split_ranges(9, splits, chunk=1, solo=0)
    assert len(ranges) == 4 and ranges[-1][0] >= ranges[-1][1], ranges
    assert sum(e - b for b, e in ranges if e > b) == 9


def test_splits_follow_the_static_context_and_the_position():
    assert static_splits(decode_spec(32, 32, 128, 1, capacity=4096)) == MAX_SPLITS
    assert static_splits(decode_spec(32, 32, 128, 1, capacity=64)) == 64 // CHUNK
    # a window bounds the visible positions: 40 + 4 -> two splits of 32
    assert static_splits(decode_spec(4, 2, 64, 1, 40, 4, 4096)) == 2
    # the benchmark's positions: 33 to 161 visible positions -> one block up to SOLO (160),
    # then 6 active splits
    assert len(split_ranges(33, MAX_SPLITS)) == 1 and len(split_ranges(161, MAX_SPLITS)) == 6
    assert len(split_ranges(SOLO, MAX_SPLITS)) == 1 and len(split_ranges(SOLO + 1, MAX_SPLITS)) > 1
    assert [len(split_ranges(n, MAX_SPLITS)) for n in (1, 32, 4096)] == [1, 1, MAX_SPLITS]
    assert len(split_ranges(33, MAX_SPLITS, solo=0)) == 2
    # from WIDE visible positions on, splits take at least two rounds (64 positions)
    assert len(split_ranges(WIDE - 1, MAX_SPLITS)) == -(-(WIDE - 1) // CHUNK)
    assert len(split_ranges(WIDE, MAX_SPLITS)) == WIDE // (2 * CHUNK)
    assert len(split_ranges(301, MAX_SPLITS)) == 5 and len(split_ranges(1001, MAX_SPLITS)) == 16
    assert len(split_ranges(2049, MAX_SPLITS)) == MAX_SPLITS


def test_cached_positions_are_loaded_before_the_wait_and_nothing_else():
    # with pdl the kernel starts while the qkv GEMV ahead of it finishes: the first round's
    # pool rows (written by earlier launches) may be loaded, the chunk's rows may not
    kernel = gen_decode_attention(decode_spec(32, 32, 128, 1, capacity=4096), "k0")
    assert kernel.self_waiting == ("k0_decode",)
    body = kernel.device_source[kernel.device_source.index("int k0_decode("):]
    body = body[body.index("{"):]
    assert body.count(GRID_WAIT) == 1
    before = body[:body.index(GRID_WAIT)]
    assert "pool + k0_row(page_table, j, 0, g)" in before
    assert before.count("reinterpret_cast<const uint4*>") == 2  # a key and a value word
    for later in ("qkv", "kv_s[0][0] +", "mlcc_put(", "__syncthreads", "q_s[c", "_ws +"):
        assert later not in before, later


def test_the_next_rounds_cached_lines_are_brought_into_l2_before_the_wait(monkeypatch):
    # 8 warps x 4 positions x 2 lane groups = 64 positions a round: the next two rounds'
    # pool rows (2 lines of key, 2 of value at d = 128 in float16) are prefetched while the
    # block waits; the chunk's rows are skipped (they come from shared memory)
    spec = decode_spec(32, 32, 128, 1, capacity=4096)
    kernel = gen_decode_attention(spec, "k0", warps=8, unroll=4)
    body = kernel.device_source[kernel.device_source.index("int k0_decode("):]
    before = body[:body.index(GRID_WAIT)]
    assert before.count("mlcc_prefetch_l2(pool + at)") == 1
    assert "const int p0 = t_begin + 64;" in before and "p0 + 128 < t_end" in before
    assert "x < (p1 - p0) * 4" in before and "if (j >= start) continue;" in before
    assert "prefetch.global.L2" in device_source([kernel])  # the helper, shared by all kernels
    monkeypatch.setattr(decode_attention, "PREFETCH_ROUNDS", 0)
    off = gen_decode_attention(spec, "k0", warps=8, unroll=4).device_source
    assert "mlcc_prefetch_l2(pool" not in off


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_decode_attention_compiles_for_sm90_with_128_bit_loads_and_no_spills(tmp_path):
    specs = [decode_spec(32, 32, 128, 1, capacity=4096), decode_spec(32, 8, 128, 4, 256, 4, 784),
             decode_spec(8, 4, 64, 1, dtype="float32")]
    kernels = [gen_decode_attention(s, f"k{i}") for i, s in enumerate(specs)]
    probes = "".join(
        f"__global__ void p{i}(const {t}* q, {t}* y, const int* s, const int* pt, {t}* pool) "
        f"{{ k{i}_decode(q, y, s, pt, pool); }}\n"
        for i, t in enumerate(["half", "half", "float"]))
    report = cubin_report(tmp_path, device_source(kernels) + probes)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert len(spills) == 3 and all(int(s) == 0 for s in spills), report
    for probe, text in entry_ptx(tmp_path, ["p0", "p1", "p2"]).items():
        # keys and values of UNROLL positions: 2 x UNROLL 16-byte loads a round
        assert len(re.findall(r"ld(\.global)?\.v4\.[ubf]32", text)) >= 2 * UNROLL, probe
        assert "atom.global.add.u32" in text and "ld.global.cg.f32" in text, probe


def test_the_lean_attention_takes_its_angle_before_the_wait_and_merges_warps_by_shuffles():
    spec = decode_spec(32, 32, 128, 1, capacity=4096)
    lean = decode_attention.mark_lean(spec)
    assert decode_attention.mark_lean(lean) == lean and not decode_attention.lean(spec)
    plain = gen_decode_attention(spec, "k0").device_source
    body = gen_decode_attention(lean, "k0").device_source
    body = body[body.index("int k0_decode("):]
    before, after = body[body.index("{"):].split(GRID_WAIT)
    # the thread's first pair: its frequency read first, its cosine and sine before the wait
    assert before.index("const float inv0 = k0_invf[threadIdx.x % 64];") < before.index(
        "seq_info")
    assert "k0_angle_of(inv0," in before and "k0_rope2(" not in after
    assert after.count("k0_rot2(") == 2  # the query's pair and a chunk row's key pair
    # 8 warps: one partial state a warp (16 lane groups without shuffles)
    assert "__shfl_xor_sync(0xffffffffu, m, o)" in after and "part_acc[8][128]" in after
    assert "part_acc[16][128]" in plain and "__shfl_xor_sync(0xffffffffu, m, o)" not in plain
    # partial rotary (GPT-NeoX) keeps the late angle; its warps still merge by shuffles
    neox = gen_decode_attention(decode_attention.mark_lean(
        decode_spec(4, 4, 32, 1, rotary=8)), "k1").device_source
    assert "k1_angle_of(" not in neox and "__shfl_xor_sync(0xffffffffu, m, o)" in neox
    # only one-launch decode attentions are marked
    prefill = decode_spec(32, 32, 128, 64)
    assert not use_decode(prefill) and decode_attention.mark_lean(prefill) == prefill


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_lean_attention_compiles_without_spills_in_the_shared_memory_it_declares(tmp_path):
    """ptxas's static shared memory of each block is what smem_bytes says, the figure the
    qkv GEMV's early release is decided on (codegen.releases_attention)."""
    specs = [decode_spec(32, 32, 128, 1, capacity=4096), decode_spec(32, 8, 128, 4, 256, 4, 784),
             decode_spec(8, 4, 64, 1, dtype="float32"), decode_spec(4, 4, 32, 1, rotary=8)]
    specs += [decode_attention.mark_lean(s) for s in specs]
    kernels = [gen_decode_attention(s, f"k{i}") for i, s in enumerate(specs)]
    types = {"float16": "half", "float32": "float"}
    probes = "".join(
        f"__global__ void probe{i}(const {types[dict(s.kv)['dtype']]}* q, "
        f"{types[dict(s.kv)['dtype']]}* y, const int* s, const int* pt, "
        f"{types[dict(s.kv)['dtype']]}* pool) {{ k{i}_decode(q, y, s, pt, pool); }}\n"
        for i, s in enumerate(specs))
    stats = sorted(probe_stats(cubin_report(tmp_path, device_source(kernels) + probes)))
    assert [i for i, *_ in stats] == list(range(len(specs)))
    for (i, spills, registers, smem), spec in zip(stats, specs):
        assert spills == 0, (i, spills, registers)
        assert smem <= decode_attention.smem_bytes(spec) < smem + 16, (i, smem)
    # the 7B attention: 9.4 KB of shared memory, 5.2 KB lean
    assert (stats[0][3], stats[4][3]) == (9348, 5188), (stats[0], stats[4])


def test_the_7b_decode_step_attends_in_one_launch_and_prefill_keeps_two():
    from test_cuda_codegen import lowered

    from mlcc.backends.cuda.codegen import kernel_for, library_parts

    _, plans, _, _ = library_parts(lowered("llama2_7b", "q4f16_1"), {"params": []})
    expected = {"decode": ["_decode"], "prefill": ["_append", "_flash"]}
    for plan in plans:
        (spec,) = {c.spec for c in plan.calls if c.spec.op == "qkv_attention"}
        launcher = kernel_for(spec, "k0_qkv_attention").launcher
        calls = re.findall(r'call_extern\("int32", "k0_qkv_attention(_\w+)"', launcher)
        assert calls == expected[plan.name], (plan.name, calls)
