"""The TMA decode GEMV (mlcc.backends.cuda.gemv_tma) and its folded-norm forms run on the CPU,
every thread a host thread.

The generated device functions are compiled with g++ against the shims of the integer-dot
GEMV's emulation (test_cuda_gemv_dp2a_emulated), with host stand-ins for the bulk-copy helpers
of mlcc.backends.cuda.chain, written from the PTX documentation:
- the block's dynamic shared memory is one host buffer, and a shared address is an offset in it;
- an mbarrier completes its phase once its expected arrivals have arrived and the bytes that
  `mbarrier.arrive.expect_tx` announced have landed; `try_wait.parity P` returns once the
  phase of parity P has completed (the number of completed phases has the other parity);
- a bulk copy lands when issued (checked against the kernel's buffers and 16-byte alignment)
  and counts its bytes off its barrier;
- `bar.sync 1, N` is a barrier of N threads, the consumer warps (the producer warp has left).

Checked against NumPy:
- the plain kernel, one and four K slices, with a producer warp or without, against the
  integer-dot definition (test_cuda_gemv_dp2a_emulated.group_reference and its bound);
- the producer of a folded norm (`residual`): its sums bit for bit the plain kernel's float16
  results plus the residual, rounded as add_rms_norm rounds; each block's sum of squares in the
  kernel's order (lane 0 of each warp over its features, or one thread a feature and a warp
  butterfly, then the warps in order) in float32;
- the consumers (`norm`, the plain and the GLU modes): bit for bit the same kernel without the
  norm on the row normalized by the norm's definition (test_cuda_norm_fold_emulated.normalized).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_cuda_gemm_emulated import SHIM
from test_cuda_gemv_dp2a_emulated import INT_HOST, group_reference, rounding_bound
from test_cuda_gemv_glu_emulated import HALF2, buffer_io, common_helpers
from test_cuda_gemv_persistent import q_linear_spec
from test_cuda_glu_emulated import c_expf, silu_mul
from test_cuda_norm_fold_emulated import normalized

from mlcc.backends.cuda import gemv_tma, glu
from mlcc.backends.cuda.gemv import glu_buffers
from mlcc.backends.cuda.gemv_tma import TmaConfig
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.cuda.norm_fold import RowNorm

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
EPS = 1e-5

TMA_HOST = r"""
#include <atomic>
#include <algorithm>
#include <map>
using std::min;
#define MLCC_CHAIN_HELPERS
static unsigned char* g_dsmem;  // the running block's dynamic shared memory
static size_t g_dsmem_bytes;
struct EmuBar { int count = 0, arrived = 0; long long tx = 0; unsigned phases = 0; };
static std::map<unsigned, EmuBar> g_bars;
static std::mutex g_bar_mutex;
static std::barrier<>* g_named;
static int g_named_threads;
inline unsigned mlcc_chain_smem(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < g_dsmem || c > g_dsmem + g_dsmem_bytes) { fprintf(stderr, "not shared\n"); abort(); }
  return (unsigned)(c - g_dsmem);
}
inline void mlcc_emu_init(unsigned bar, int count) {
  std::lock_guard<std::mutex> lock(g_bar_mutex);
  if (bar % 8) { fprintf(stderr, "misaligned mbarrier\n"); abort(); }
  g_bars[bar] = EmuBar{count, 0, 0, 0};
}
inline EmuBar& emu_bar(unsigned bar) {
  auto it = g_bars.find(bar);
  if (it == g_bars.end()) { fprintf(stderr, "mbarrier %u not initialized\n", bar); abort(); }
  return it->second;
}
inline void emu_complete(EmuBar& b) {
  if (b.arrived == b.count && b.tx == 0) { b.phases += 1; b.arrived = 0; }
}
inline void mlcc_chain_expect(unsigned bar, unsigned bytes) {
  std::lock_guard<std::mutex> lock(g_bar_mutex);
  EmuBar& b = emu_bar(bar);
  b.tx += bytes; b.arrived += 1;
  emu_complete(b);
}
inline void mlcc_chain_arrive(unsigned bar) {
  std::lock_guard<std::mutex> lock(g_bar_mutex);
  EmuBar& b = emu_bar(bar);
  b.arrived += 1;
  emu_complete(b);
}
inline void mlcc_chain_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  if (dst % 16 || reinterpret_cast<size_t>(src) % 16 || bytes % 16) {
    fprintf(stderr, "misaligned bulk copy\n"); abort();
  }
  if (dst + bytes > g_dsmem_bytes) { fprintf(stderr, "bulk copy past shared memory\n"); abort(); }
  check_global(src, bytes, "bulk copy");
  memcpy(g_dsmem + dst, src, bytes);
  std::lock_guard<std::mutex> lock(g_bar_mutex);
  EmuBar& b = emu_bar(bar);
  b.tx -= bytes;
  if (b.tx < 0) { fprintf(stderr, "more bytes than expected\n"); abort(); }
  emu_complete(b);
}
inline void mlcc_chain_wait(unsigned bar, unsigned parity) {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(g_bar_mutex);
      if ((emu_bar(bar).phases & 1u) != parity) return;
    }
    std::this_thread::yield();
  }
}
inline void __syncwarp() { g_warps[threadIdx.x >> 5].bar->arrive_and_wait(); }
inline void mlcc_chain_sync(int id, int threads) {
  if (id != 1 || threads != g_named_threads) { fprintf(stderr, "named barrier\n"); abort(); }
  g_named->arrive_and_wait();
}
"""


def host_source(kernel) -> str:
    """The kernel's device function with its inline mbarrier PTX replaced by the stand-ins."""
    text = re.sub(r'asm volatile\("mbarrier\.init\.shared::cta\.b64 \[%0\], (\w+);" ::"r"\((.*?)\)'
                  r'\s*: "memory"\);', r"mlcc_emu_init(\2, \1);", kernel.device_source)
    text = text.replace('asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");', "")
    assert "mbarrier.init" not in text and "fence.mbarrier_init" not in text
    return text


def driver(name: str, buffers: list[tuple], written: tuple[str, ...], blocks: int,
           threads: int, consumers: int, smem: int) -> str:
    reads, spans, args, write_back = buffer_io(buffers, written, 1)
    return f"""
template <class T> std::vector<T> load(const char* path) {{
  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T)); fread(v.data(), 1, n, f); fclose(f); return v;
}}
int main(int argc, char** argv) {{
  {" ".join(reads)}
  {" ".join(spans)}
  std::vector<unsigned char> dsmem({smem});
  g_dsmem = dsmem.data(); g_dsmem_bytes = dsmem.size();
  for (unsigned bx = 0; bx < {blocks}; ++bx) {{
    std::fill(dsmem.begin(), dsmem.end(), 0xFF);  // what no copy or store wrote reads as NaN
    g_bars.clear();
    std::barrier<> block({threads}), named({consumers});
    g_block = &block; g_named = &named; g_named_threads = {consumers};
    for (unsigned w = 0; w < {threads // 32}; ++w) g_warps[w].bar = new std::barrier<>(32);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < {threads}; ++t)
      pool.emplace_back([&, t] {{
        threadIdx = {{t, 0, 0}}; blockIdx = {{bx, 0, 0}}; blockDim = {{{threads}, 1, 1}};
        {name}_dev({args}, dsmem.data());
      }});
    for (auto& th : pool) th.join();
    for (unsigned w = 0; w < {threads // 32}; ++w) delete g_warps[w].bar;
  }}
{chr(10).join(write_back)}
  return 0;
}}
"""


def launch_of(kernel) -> tuple[int, int, int]:
    """(blocks, threads, dynamic shared bytes) of the kernel's launcher."""
    text = kernel.launcher
    blocks = int(re.search(r'T\.thread_binding\(T\.int64\((\d+)\), thread="blockIdx\.x"\)',
                           text).group(1))
    threads = int(re.search(r'T\.thread_binding\((\d+), thread="threadIdx\.x"\)', text).group(1))
    smem = int(re.search(r"T\.alloc_buffer\(\((\d+),\)", text).group(1))
    return blocks, threads, smem


def emulate(tmp_path: Path, kernel, buffers: list[tuple], arrays: dict,
            written: tuple[str, ...], consumers: int) -> dict:
    """Run `kernel` over its launch; `arrays` gives every buffer (outputs pre-filled with NaN
    or a sentinel); returns the written buffers."""
    blocks, threads, smem = launch_of(kernel)
    shim = SHIM.replace("static Warp g_warps[8];", "static Warp g_warps[32];")
    half2 = HALF2.replace("static float g_lanes[8][32];", "static float g_lanes[32][32];")
    source = (shim + half2 + INT_HOST + common_helpers() + TMA_HOST + host_source(kernel)
              + driver(kernel.name, buffers, written, blocks, threads, consumers, smem))
    folder = tmp_path / kernel.name
    folder.mkdir()
    (folder / "k.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-w", "-pthread",
                           "-o", str(folder / "k"), str(folder / "k.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = []
    for b, _, _ in buffers:
        paths.append(folder / f"{b}.bin")
        np.ascontiguousarray(arrays[b]).tofile(paths[-1])
    done = subprocess.run([str(folder / "k"), *map(str, paths)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return {b: np.fromfile(folder / f"{b}.bin", arrays[b].dtype).reshape(arrays[b].shape)
            for b in written}


def q4_inputs(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.05 + 0.001).astype(np.float16)
    return qw, qs


def expected_ssq(sums: np.ndarray, cfg: TmaConfig, rows: int) -> np.ndarray:
    """Each block's float32 sum of squares of its sums, in the kernel's order."""
    n = sums.shape[0]
    blocks = -(-n // rows)
    out = np.zeros(blocks, np.float32)
    sq = sums.astype(np.float32) ** 2
    for b in range(blocks):
        part = sq[b * rows:min(n, (b + 1) * rows)]
        warps = np.zeros(cfg.warps, np.float32)
        if cfg.ks == 1:  # lane 0 of warp `team` over its features in chunk order
            for f in range(len(part)):
                team = (f % cfg.chunk) % cfg.teams
                warps[team] = np.float32(warps[team] + part[f])
        else:  # one thread a feature, a butterfly in each warp
            lanes = np.zeros(cfg.warps * 32, np.float32)
            lanes[:len(part)] = part
            lanes = lanes.reshape(cfg.warps, 32)
            for o in (16, 8, 4, 2, 1):
                lanes = (lanes + lanes[:, np.arange(32) ^ o]).astype(np.float32)
            warps = lanes[:, 0]
        total = np.float32(0)
        for w in range(cfg.warps):
            total = np.float32(total + warps[w])
        out[b] = total
    return out


# (N, K, config): one K slice with a producer warp (the 7B qkv and o_proj form), four slices
# with 16 consumer warps (down behind the GLU), and no producer warp (all chunks issued by one
# thread before the wait); N = 300 gives 3 features a block and a partial chunk, N = 800 a
# partial last block (7 features, 114 blocks)
CASES = [
    (300, 256, TmaConfig(1, 8, 8, depth=3)),
    (800, 512, TmaConfig(1, 8, 8, depth=2)),
    (300, 8448, TmaConfig(4, 4, 8, depth=2)),
    (270, 256, TmaConfig(1, 8, 8)),
]


def case_id(c) -> str:
    return f"n{c[0]}k{c[1]}_ks{c[2].ks}t{c[2].teams}d{c[2].depth}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tma_gemv_and_its_folded_norm_producer(tmp_path, case):
    n, k, cfg = case
    rng = np.random.default_rng(n + k)
    s = LinearShape(q_linear_spec(1, n, k))
    assert gemv_tma.fits(s, cfg, residual=True)
    consumers = cfg.warps * 32
    x = (rng.standard_normal((1, k)) * 0.5).astype(np.float16)
    qw, qs = q4_inputs(rng, n, k)
    plain = gemv_tma.gemv_tma_kernel(s, "plain", cfg)
    y = emulate(tmp_path, plain, s.buffers,
                {"x": x, "qw": qw, "qs": qs, "y": np.full((1, n), np.nan, np.float16)},
                ("y",), consumers)["y"]
    reference, magnitude = group_reference(x, qw, qs, k)
    assert not np.isnan(y).any()
    assert (np.abs(y.astype(np.float64) - reference)
            <= rounding_bound(reference, magnitude, k, "float16")).all()
    # the producer of a folded norm: sums bit for bit, and each block's sum of squares
    producer = gemv_tma.gemv_tma_kernel(s, "producer", cfg, residual=True)
    blocks = gemv_tma.blocks(s, cfg)
    res = rng.standard_normal((1, n)).astype(np.float16)
    buffers = s.buffers[:-1] + [("res", (1, n), "float16"), ("sum_out", (1, n), "float16"),
                                ("ssq", (1, blocks), "float32")]
    got = emulate(tmp_path, producer, buffers,
                  {"x": x, "qw": qw, "qs": qs, "res": res,
                   "sum_out": np.full((1, n), np.nan, np.float16),
                   "ssq": np.full((1, blocks), np.nan, np.float32)},
                  ("sum_out", "ssq"), consumers)
    sums = (y.astype(np.float32) + res.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(got["sum_out"], sums)
    rows = gemv_tma.layout(s, cfg).rows
    np.testing.assert_array_equal(got["ssq"][0], expected_ssq(sums[0], cfg, rows))


# (K, N of the consumer, parts: blocks of the producer, weight offset, GLU mode)
CONSUMER_CASES = [
    (256, 300, 128, 0.0, False),
    (512, 270, 37, 1.0, False),
    (256, 2 * 300, 128, 0.0, True),
]


@pytest.mark.parametrize("case", CONSUMER_CASES,
                         ids=lambda c: f"k{c[0]}n{c[1]}p{c[2]}" + ("_glu" if c[4] else ""))
def test_tma_gemv_consumer_normalizes_as_it_stages(tmp_path, case):
    k, n, parts, offset, glu_mode = case
    rng = np.random.default_rng(k + n + parts)
    sums = (rng.standard_normal((1, k)) * 2).astype(np.float16)
    ssq = np.zeros((1, parts), np.float32)
    chunks = np.array_split(sums[0].astype(np.float32) ** 2, parts)
    ssq[0] = [np.float32(c.sum(dtype=np.float32)) for c in chunks]
    w = (rng.standard_normal(k) * 0.3 + 1).astype(np.float16)
    qw, qs = q4_inputs(rng, n, k)
    row = normalized(sums, ssq, w, offset)
    norm = RowNorm(parts, k, EPS, offset)
    norm_buffers = [("x", (1, k), "float16"), ("ssq", (1, parts), "float32"),
                    ("nw", (k,), "float16")]
    if glu_mode:
        s = LinearShape(glu.linear_spec(glu_spec(n, k)))
        plain = gemv_tma.gemv_tma_glu_kernel(s, "plain", glu.SILU_MUL)
        folded = gemv_tma.gemv_tma_glu_kernel(s, "folded", glu.SILU_MUL, norm=norm,
                                              buffers=norm_buffers + glu_buffers(s)[1:])
        plain_buffers, out_n, consumers = glu_buffers(s), n // 2, gemv_tma.GLU_CHUNK * 32
    else:
        s = LinearShape(q_linear_spec(1, n, k))
        cfg = gemv_tma.default_config(s)
        plain = gemv_tma.gemv_tma_kernel(s, "plain", cfg)
        folded = gemv_tma.gemv_tma_kernel(s, "folded", cfg, norm=norm,
                                          buffers=norm_buffers + s.buffers[1:])
        plain_buffers, out_n, consumers = s.buffers, n, cfg.warps * 32
    y0 = np.full((1, out_n), np.nan, np.float16)
    expected = emulate(tmp_path, plain, plain_buffers,
                       {"x": row, "qw": qw, "qs": qs, "y": y0}, ("y",), consumers)["y"]
    got = emulate(tmp_path, folded, norm_buffers + plain_buffers[1:],
                  {"x": sums, "ssq": ssq, "nw": w, "qw": qw, "qs": qs, "y": y0},
                  ("y",), consumers)["y"]
    assert not np.isnan(expected).any()
    np.testing.assert_array_equal(got, expected)
    if glu_mode:  # and the plain GLU mode itself against NumPy's silu_mul of its two halves
        gate, _ = group_reference(row, qw[:out_n], qs[:out_n], k)
        up, _ = group_reference(row, qw[out_n:], qs[out_n:], k)
        gate_up = np.concatenate([gate, up], axis=1).astype(np.float16)
        want = silu_mul(gate_up, c_expf())
        assert np.abs(expected.astype(np.float32) - want.astype(np.float32)).max() < 0.05


def glu_spec(n: int, k: int):
    """A one-row q4 gate_up + silu_mul spec of N = n (gate and up rows) over K = k."""
    from mlcc.backends.plan import KernelSpec

    base = q_linear_spec(1, n, k)
    return KernelSpec(glu.OP, base.inputs, (((1, n // 2), "float16"),),
                      base.attrs + ((glu.WEIGHTS_ATTR, "q4"),))
