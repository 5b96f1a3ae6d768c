"""The GLU mode of the persistent decode GEMV (decode linear_silu_mul) run on the CPU.

The generated device function of mlcc.backends.cuda.gemv is compiled with g++ against the shim
of the tensor-core GEMM's emulation (test_cuda_gemm_emulated: `__shared__` arrays shared by a
block's threads, __syncthreads a barrier, global loads bounds- and alignment-checked, half and
half2 as _Float16), with every thread of a block a host thread and blocks run in turn. Added
here: the half2 intrinsics the nibble dots use (__hfma2 rounded once, as the hardware's fused
multiply-add), warp shuffles exchanged at a per-warp barrier, and the helpers of kernels.py's
COMMON_SOURCE as generated, except that the inline PTX lop3 of mlcc_q4_dot8_lop3 cannot run on
the host: its macro MLCC_LOP3_OR is replaced by the plain C it computes, (w & mask) | 0x64006400
(lop3 with immLut 0xEA is (a & b) | c). Each case runs the fused kernel and the plain
persistent GEMV of the same gate_up weight and launch (several tiles per warp, partial last
tiles), then checks:

    bit for bit   fused == silu_mul of the plain GEMV's float16 gate_up, in silu_mul's CUDA
                  arithmetic (float32 g / (1 + expf(-g)) * u, rounded) with the C library expf
    independent   fused against NumPy alone: gate and up rows dequantized, float32 sums over
                  K, rounded to float16, silu_mul in float32 with NumPy's exp, rounded. The
                  GEMV sums pairs of products in float16, so the gate_up values may differ
                  from NumPy's in the last bits; the outputs agree within the persistent GEMV
                  tests' parity tolerance, and to 1 ulp where the rounded gate_up agree

The plain GEMV's source must stay what it was before the GLU mode existed (compared with the
commit before it), and the 7B decode kernel (22016 x 4096 at the database's launch) compiles
for sm_90 without spills and in no more registers than the plain kernel with as many weight
rows per tile, and its launch fits an SM's registers in one wave.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_cuda_gemm_emulated import SHIM
from test_cuda_gemv_persistent import launched, ptxas, q_linear_spec, sweep_module
from test_cuda_glu_emulated import c_expf, silu_mul, ulps

from mlcc.backends.cuda import gemv, glu, tuning
from mlcc.backends.cuda.kernels import COMMON_SOURCE, GRID_WAIT
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.ir.quant_ops import dequantize_group

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
ROOT = Path(__file__).resolve().parents[2]
BEFORE_GLU = "599aff1fea177fa1f41e32281d5acdfdda0137d5"  # the last gemv.py without a GLU mode
C_HOST = {"float16": "half", "float32": "float", "uint32": "unsigned"}

HALF2 = r"""
#include <cmath>
thread_local Dim3 blockDim;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float __half2float(half h) { return (float)h; }
inline half __float2half(float v) { return (half)v; }
inline half2 __halves2half2(half a, half b) { return {a, b}; }
inline float2 __half22float2(half2 h) { return {(float)h.x, (float)h.y}; }
// one rounding, as the hardware's fma: the double product of two halves is exact
inline half2 __hfma2(half2 a, half2 b, half2 c) {
  return {(half)((double)a.x * (double)b.x + (double)c.x),
          (half)((double)a.y * (double)b.y + (double)c.y)};
}
static float g_lanes[8][32];
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
  g_lanes[w][l] = v;
  g_warps[w].bar->arrive_and_wait();
  const float other = g_lanes[w][l ^ o];
  g_warps[w].bar->arrive_and_wait();
  return other;
}
"""
LOP3_HOST = "#define MLCC_LOP3_OR(out, in, mask) ((out) = ((in) & (mask##u)) | 0x64006400u)"


def common_helpers() -> str:
    """COMMON_SOURCE for the host: no CUDA headers, the shim's mlcc_f32 / mlcc_put, the lop3
    macro in plain C."""
    lines = []
    skip_macro = False
    for line in COMMON_SOURCE.splitlines():
        if skip_macro:  # the asm line continuing the PTX macro
            skip_macro = line.endswith("\\")
            continue
        if line.startswith("#include") or re.search(r" (mlcc_f32|mlcc_put)\(", line):
            continue
        if line.startswith("#define MLCC_LOP3_OR"):
            lines.append(LOP3_HOST)
            skip_macro = line.endswith("\\")
            continue
        lines.append(line)
    return "\n".join(lines)


def buffer_io(buffers: list[tuple], written: tuple[str, ...], first: int):
    """A host driver's buffer handling, one file per buffer from argv[first] on: the loads,
    the spans registered for the load checks, the kernel's arguments and the write-backs of
    the `written` buffers."""
    reads = [f"std::vector<{C_HOST[dt]}> {b}_v = load<{C_HOST[dt]}>(argv[{i + first}]);"
             for i, (b, _, dt) in enumerate(buffers)]
    spans = [f"g_buffers.emplace_back((const char*){b}_v.data(), "
             f"(const char*)({b}_v.data() + {b}_v.size()));" for b, _, _ in buffers]
    args = ", ".join(f"{b}_v.data()" for b, _, _ in buffers)
    names = [b for b, _, _ in buffers]
    write_back = [f'  {{ FILE* f = fopen(argv[{names.index(b) + first}], "wb"); '
                  f'fwrite({b}_v.data(), sizeof({b}_v[0]), {b}_v.size(), f); fclose(f); }}'
                  for b in written]
    return reads, spans, args, write_back


def driver(kernels: list, buffers: list[tuple], launch=None,
           written: tuple[str, ...] = ("y",)) -> str:
    """main(argv): kernel index, then one file per buffer; the `written` buffers (y by
    default, the last) are written back to their files. `launch(kernel)` gives (grid, warps);
    the persistent GEMV's launcher by default."""
    launch = launch or (lambda kernel: launched(kernel)[:2])
    reads, spans, args, write_back = buffer_io(buffers, written, 2)
    runs = []
    for i, kernel in enumerate(kernels):
        grid, warps = launch(kernel)
        call = f"[&] {{ {kernel.name}_dev({args}); }}"
        runs.append(f"  if (which == {i}) run({grid}, {warps}, {call});")
    return f"""
#include <functional>
template <class T> std::vector<T> load(const char* path) {{
  FILE* f = fopen(path, "rb"); fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T)); fread(v.data(), 1, n, f); fclose(f); return v;
}}
void run(unsigned grid, unsigned warps, const std::function<void()>& body) {{
  for (unsigned bx = 0; bx < grid; ++bx) {{
    std::barrier<> block(warps * 32);
    g_block = &block;
    for (unsigned w = 0; w < warps; ++w) g_warps[w].bar = new std::barrier<>(32);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < warps * 32; ++t)
      threads.emplace_back([&, t] {{
        threadIdx = {{t, 0, 0}}; blockIdx = {{bx, 0, 0}}; blockDim = {{warps * 32, 1, 1}};
        body();
      }});
    for (auto& th : threads) th.join();
    for (unsigned w = 0; w < warps; ++w) delete g_warps[w].bar;
  }}
}}
int main(int argc, char** argv) {{
  const int which = atoi(argv[1]);
  {" ".join(reads)}
  {" ".join(spans)}
{chr(10).join(runs)}
{chr(10).join(write_back)}
  return 0;
}}
"""


def build(tmp_path: Path, kernels: list, buffers: list[tuple], prelude: str = "",
          launch=None, written: tuple[str, ...] = ("y",)) -> Path:
    """The host program running `kernels` (after `prelude`, more host stand-ins)."""
    source = (SHIM + HALF2 + common_helpers() + "\n" + prelude
              + "".join(k.device_source for k in kernels)
              + driver(kernels, buffers, launch, written))
    (tmp_path / "gemv.cpp").write_text(source)
    done = subprocess.run(["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-w", "-pthread",
                           "-o", str(tmp_path / "gemv"), str(tmp_path / "gemv.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "gemv"


def run(binary: Path, which: int, inputs: list[Path], shape: tuple[int, int],
        ydt: str = "float16") -> np.ndarray:
    """Kernel `which` of the host program on the input files: y as `ydt`."""
    out = binary.with_suffix(f".y{which}.bin")
    np.full(shape, np.nan, ydt).tofile(out)  # every element must be written
    done = subprocess.run([str(binary), str(which), *map(str, inputs), str(out), str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.fromfile(out, ydt).reshape(shape)
    assert not np.isnan(got).any(), f"{int(np.isnan(got).sum())} outputs never written"
    return got


# (I, K, rows, dot, pairs per tile, bias, rotate, pingpong, blocks per SM, warps): SMS = 2, so
# warps run several tiles each; pairs 2 and 3 leave partial last tiles at I = 40 and 96 / 5
CASES = [
    (40, 64, 1, "mlcc_q4_dot8", 1, False, True, False, 2, 4),
    (40, 64, 3, "mlcc_q4_dot8_lop3", 3, True, True, False, 1, 4),
    (96, 64, 3, "mlcc_q4_dot8", 1, False, False, True, 2, 8),
    (96, 4096, 1, "mlcc_q4_dot8_lop3", 1, False, True, False, 3, 8),  # the 7B gate_up launch
    (96, 4096, 3, "mlcc_q4_dot8", 2, True, True, True, 2, 4),
    (40, 4096, 3, "mlcc_q4_dot8_lop3", 1, False, True, True, 2, 8),
    (96, 4096, 1, "mlcc_q4_dot8", 5, False, True, False, 1, 4),
]


def case_id(c) -> str:
    return f"i{c[0]}k{c[1]}m{c[2]}_{c[3][12:] or 'dot8'}_p{c[4]}" + ("_b" if c[5] else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_glu_gemv_equals_gemv_then_silu_mul(tmp_path, case):
    out_n, k, rows, dot, pairs, bias, rotate, pingpong, per_sm, warps = case
    n = 2 * out_n
    s = LinearShape(q_linear_spec(rows, n, k, bias=bias))
    launch = {"dot": dot, "rotate": rotate, "pingpong": pingpong, "sms": 2}
    fused = gemv.gemv_q4_persistent_kernel(s, "fused", per_sm, warps, pairs, glu=glu.SILU_MUL,
                                           **launch)
    # the plain kernel with the same weight rows per tile, so the same sums per feature
    plain = gemv.gemv_q4_persistent_kernel(s, "plain", per_sm, warps, 2 * pairs, **launch)
    grid, _, stride = launched(fused)
    assert grid == gemv.persistent_grid(n, 2 * pairs, per_sm, warps, 2)
    assert stride < gemv.tile_count(out_n, pairs)  # warps loop over more than one tile
    binary = build(tmp_path, [fused, plain], s.buffers)

    rng = np.random.default_rng(out_n * k + rows)
    x = rng.standard_normal((rows, k)).astype(np.float16)
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    arrays = [x, qw, qs] + ([(rng.standard_normal(n) * 0.5).astype(np.float16)] if bias else [])
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    got = run(binary, 0, paths, (rows, out_n))
    gate_up = run(binary, 1, paths, (rows, n))

    unfused = silu_mul(gate_up, c_expf())
    assert np.array_equal(got.view(np.uint16), unfused.view(np.uint16)), \
        f"{int((got.view(np.uint16) != unfused.view(np.uint16)).sum())} outputs differ"

    w = dequantize_group(qw, qs, 4, 32, k).astype(np.float16).astype(np.float32)
    x_w = x.astype(np.float32) @ w.T + (arrays[-1].astype(np.float32) if bias else 0)
    reference_gu = x_w.astype(np.float16)
    reference = silu_mul(reference_gu, np.exp)
    same = (reference_gu[:, :out_n] == gate_up[:, :out_n]) & (reference_gu[:, out_n:]
                                                              == gate_up[:, out_n:])
    assert ulps(got, reference)[same].max(initial=0) <= 1
    scale = np.abs(x_w).max()  # the GEMV's parity tolerance is relative to the largest sum
    assert np.abs(gate_up.astype(np.float32) - x_w).max() / scale < 2e-3
    expected = silu_mul(x_w, np.exp).astype(np.float32)
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=4e-3,
                               atol=4e-3 * np.abs(expected).max())


def test_glu_mode_refuses_what_it_cannot_pair():
    odd = LinearShape(q_linear_spec(1, 81, 64))
    with pytest.raises(Exception, match=r"^\[compile\] g: the GLU mode .* got N = 81, float16"):
        gemv.gemv_q4_persistent_kernel(odd, "g", 2, 8, 1, glu=glu.SILU_MUL)
    f32 = LinearShape(q_linear_spec(1, 80, 64, ydt="float32"))
    with pytest.raises(Exception, match=r"N = 80, float32; keep silu_mul apart"):
        gemv.gemv_q4_persistent_kernel(f32, "g", 2, 8, 1, glu=glu.SILU_MUL)


def test_plain_gemv_source_is_unchanged_by_the_glu_mode(tmp_path):
    text = subprocess.run(["git", "show", f"{BEFORE_GLU}:mlcc/backends/cuda/gemv.py"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if text.returncode != 0:
        pytest.skip(f"commit {BEFORE_GLU[:7]} is not in this checkout ({text.stderr.strip()})")
    (tmp_path / "gemv_before_glu.py").write_text(text.stdout)
    spec = importlib.util.spec_from_file_location("gemv_before_glu",
                                                  tmp_path / "gemv_before_glu.py")
    before = importlib.util.module_from_spec(spec)
    sys.modules["gemv_before_glu"] = before
    spec.loader.exec_module(before)
    compared = 0
    for n, k in [(12288, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (96, 64)]:
        for rows, rpw, pingpong, dot in [(1, 1, False, "mlcc_q4_dot8"),
                                         (3, 2, True, "mlcc_q4_dot8_lop3"),
                                         (16, 1, False, "mlcc_q4_dot8_lop3")]:
            s = LinearShape(q_linear_spec(rows, n, k, ydt="float32" if n == 32000 else "float16",
                                          bias=n == 96))
            old = before.gemv_q4_persistent_kernel(s, "k", 3, 8, rpw, dot=dot, pingpong=pingpong)
            new = gemv.gemv_q4_persistent_kernel(s, "k", 3, 8, rpw, dot=dot, pingpong=pingpong)
            # since then the only addition: the pdl wait after the first weight loads
            lines = new.device_source.split("\n")
            kept = [line for line in lines if GRID_WAIT not in line]
            assert len(lines) - len(kept) == 1, (n, k, rows)
            assert replace(new, device_source="\n".join(kept)) == old, (n, k, rows)
            compared += 1
    assert compared == 15


def test_7b_decode_glu_kernel_compiles_without_spills(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    n, k = 22016, 4096
    gate_up = q_linear_spec(1, n, k)
    fused = KernelSpec(glu.OP, gate_up.inputs, (((1, n // 2), "float16"),),
                       tuple(sorted(gate_up.attrs + ((glu.WEIGHTS_ATTR, "q4"),))))
    config = glu.glu_gemv_config(n, k)
    launch = {"dot": config.dot, "rotate": config.rotate, "pingpong": config.pingpong}
    kernels = [glu.gen_linear_silu_mul(fused, "glu7b"),
               gemv.gemv_q4_persistent_kernel(LinearShape(gate_up), "plain7b",
                                              config.blocks_per_sm, config.warps,
                                              2 * config.rows_per_warp, **launch)]
    assert "sum_u" in kernels[0].device_source and f"{config.dot}(v.x" in kernels[0].device_source
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    used = dict(re.findall(r"entry function 'g_(\w+)'.*?Used (\d+) registers", done.stderr,
                           flags=re.DOTALL))
    assert done.stderr.count(" 0 bytes spill stores") == 2, done.stderr
    # registers are allocated in units of 8 a thread: the fused kernel costs no occupancy
    assert -(-int(used["glu7b"]) // 8) <= -(-int(used["plain7b"]) // 8), used
    # the launch fits an SM at once (65536 registers): one wave of persistent blocks
    assert int(used["glu7b"]) * config.warps * 32 * config.blocks_per_sm <= 65536, used
    print(f"7B decode GLU GEMV ({config}): {used} registers")
    assert tuning.persistent_config(n, k).warps == config.warps


# --- the benchmark harness ----------------------------------------------------------------


def test_sweep_glu_variants_generate_and_keep_the_other_sets():
    sweep = sweep_module()
    chosen = sweep.glu_variants()
    assert len({v["name"] for v in chosen}) == len(chosen)
    fused = [v for v in chosen if v.get("glu")]
    assert len(fused) >= 6 and all(v["prologue"] == "none" for v in fused)
    assert {(v["n"], v["k"]) for v in fused if v["rows"] == 1} == {sweep.GLU_SHAPE}
    for v in chosen:
        kernel = sweep.kernel_of(v)
        assert ("sum_u" in kernel.device_source) == bool(v.get("glu")), v["name"]
        assert f"(1, {sweep.out_width(v)})" in kernel.launcher or v["rows"] != 1
    assert not any(v.get("glu") for v in sweep.variants() + sweep.lean2_variants())


def test_sweep_validates_glu_outputs_against_silu_of_the_reference(monkeypatch):
    """measure() on the CPU with a stand-in kernel: the right fused outputs pass and are
    timed; the plain gate_up's gate half (silu_mul missing) fails."""
    import tvm

    from mlcc.ir.registry import get_op

    sweep = sweep_module()
    monkeypatch.setattr(sweep, "time_variant", lambda *args: 1.0)
    rng = np.random.default_rng(5)
    n, k, rows = 96, 64, 2
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    qs = (rng.random((n, k // 32)) * 0.05).astype(np.float16)
    dev = tvm.cpu()
    copies = [(qw, qs, tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev))]
    v = next(v for v in sweep.glu_variants() if v["n"] == n)
    x_seen = []

    def fused(x, qw_dev, qs_dev, y):
        x_seen.append(x.numpy())
        gate_up = sweep.reference(qw, qs, x_seen[-1]).astype(np.float16)
        y.copyfrom(get_op("silu_mul").reference(None, [gate_up], {})[0].astype(np.float16))

    def gate_only(x, qw_dev, qs_dev, y):
        y.copyfrom(sweep.reference(qw, qs, x.numpy())[:, :n // 2].astype(np.float16))

    good = sweep.measure(None, {v["name"]: fused}, v, copies, dev, rng)
    assert x_seen[0].shape == (rows, k) and good["rel_err"] < 5e-3 and good["us"] == 1.0
    bad = sweep.measure(None, {v["name"]: gate_only}, v, copies, dev, rng)
    assert bad["rel_err"] > 1e-2 and "us" not in bad


def test_sweep_glu_variants_compile_without_spills(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    sweep = sweep_module()
    kernels = [sweep.kernel_of(v) for v in sweep.glu_variants()]
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr


@pytest.mark.parametrize("k", [64, 4096])
def test_lop3_pairs_dot_rounds_exactly_like_mlcc_q4_dot8(tmp_path, k):
    """mlcc_q4_dot8_lop3_pairs only changes how the nibbles become half2 (exactly in both), so
    the persistent GEMV gives mlcc_q4_dot8's results bit for bit; mlcc_q4_dot8_lop3 (four
    products summed in float16) does not, which is what this comparison would catch."""
    n, rows = 96, 2
    s = LinearShape(q_linear_spec(rows, n, k))
    dots = ("mlcc_q4_dot8", "mlcc_q4_dot8_lop3_pairs", "mlcc_q4_dot8_lop3")
    kernels = [gemv.gemv_q4_persistent_kernel(s, f"k{i}", 2, 4, 1, dot=dot, sms=2)
               for i, dot in enumerate(dots)]
    binary = build(tmp_path, kernels, s.buffers)
    rng = np.random.default_rng(k)
    arrays = [(rng.standard_normal((rows, k)) * 3).astype(np.float16),
              rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32),
              (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"in{i}.bin")
        a.tofile(paths[-1])
    dot8, pairs, fours = (run(binary, i, paths, (rows, n)) for i in range(3))
    assert np.array_equal(pairs.view(np.uint16), dot8.view(np.uint16))
    assert not np.array_equal(fours.view(np.uint16), dot8.view(np.uint16))
