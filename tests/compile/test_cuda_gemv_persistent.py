"""The persistent q4 decode GEMV (mlcc.backends.cuda.gemv) without a GPU.

What can be shown here: the tile schedule (modelled in NumPy and tied to the generated loop by
its constants) computes every output feature exactly once for any N and grid; the row chunks
fit in shared memory; the rule applies exactly where the one-shot q4 GEMV does; the tuning
database selects either kind; a NumPy emulation of the kernel's arithmetic (half2 pair sums,
rotated word order, float32 accumulation, the warp's butterfly sum) stays within the parity
tolerance of a float64 reference; and the kernels of every Llama-2-7B decode shape, the fused
prologues and batch rows compile with nvcc, stream weights and activations with 128-bit loads
and spill nothing. Numbers from the GPU come from benchmarks/cuda/gemv_sweep.py, which
validates every variant before timing it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from mlcc.backends.cuda import fusion, gemv, linear, tuning
from mlcc.backends.cuda.codegen import compile_library, device_source
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
DECODE_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


def q_linear_spec(rows, n: int, k: int, bits: int = 4, group: int = 32, xdt: str = "float16",
                  ydt: str = "float16", bias: bool = False) -> KernelSpec:
    per_word = 32 // bits
    words, groups = -(-(-(-k // group) * group) // per_word), -(-k // group)
    inputs = (((rows, k), xdt), ((n, words), "uint32"), ((n, groups), "float16"))
    inputs += (((n,), "float16"),) if bias else ()
    return KernelSpec("q_linear", inputs, (((rows, n), ydt),),
                      (("bits", bits), ("group_size", group), ("in_features", k)))


def launched(kernel) -> tuple[int, int, int]:
    """(grid, warps, tile stride) read back from a generated kernel."""
    grid = int(re.search(r"T\.thread_binding\(T\.int64\((\d+)\), thread=\"blockIdx\.x\"",
                         kernel.launcher).group(1))
    threads = int(re.search(r"T\.thread_binding\((\d+), thread=\"threadIdx\.x\"",
                            kernel.launcher).group(1))
    stride = int(re.search(r"tile \+= (\d+);", kernel.device_source).group(1))
    first = int(re.search(r"int tile = blockIdx\.x \* (\d+) \+ warp;",
                          kernel.device_source).group(1))
    assert first == threads // 32
    return grid, threads // 32, stride


# --- schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 31, 4097, 12289, 32001])
@pytest.mark.parametrize("rows_per_warp", [1, 2, 3])
@pytest.mark.parametrize("grid", [1, 5, 264, 100_000])
def test_schedule_computes_every_feature_exactly_once(n, rows_per_warp, grid):
    for warps in (4, 8):
        done = gemv.tile_schedule(n, rows_per_warp, grid, warps)
        counts = np.bincount([f for _, f in done], minlength=n)
        assert counts.shape == (n,) and (counts == 1).all(), (n, rows_per_warp, grid, warps)
        owners = {f: w for w, f in done}  # a tile's features all belong to one warp
        assert all(owners[f] == owners[(f // rows_per_warp) * rows_per_warp] for f in owners)


@pytest.mark.parametrize("n,k,rows_per_warp,blocks_per_sm,warps",
                         [(4097, 4096, 1, 2, 8), (12289, 4096, 3, 3, 4), (33, 11008, 2, 6, 4)])
def test_generated_loop_follows_the_modelled_schedule(n, k, rows_per_warp, blocks_per_sm, warps):
    s = LinearShape(q_linear_spec(1, n, k))
    kernel = gemv.gemv_q4_persistent_kernel(s, "k", blocks_per_sm, warps, rows_per_warp)
    grid, got_warps, stride = launched(kernel)
    assert got_warps == warps and stride == grid * warps
    assert grid == gemv.persistent_grid(n, rows_per_warp, blocks_per_sm, warps)
    assert grid <= blocks_per_sm * gemv.SMS
    assert f"while (tile < {gemv.tile_count(n, rows_per_warp)})" in kernel.device_source
    done = gemv.tile_schedule(n, rows_per_warp, grid, warps)
    assert sorted(f for _, f in done) == list(range(n))


def test_grid_is_persistent_and_never_idle():
    assert gemv.persistent_grid(22016, 1, 2, 8) == 264
    assert gemv.persistent_grid(22016, 1, 3, 8, sms=100) == 300
    assert gemv.persistent_grid(100, 1, 2, 8) == 13  # no block without a tile
    assert gemv.persistent_grid(1, 4, 2, 8) == 1


@pytest.mark.parametrize("rows,k", [(1, 4096), (4, 4096), (16, 4096), (4, 11008), (3, 22016)])
def test_row_chunks_cover_the_rows_and_fit_in_shared_memory(rows, k):
    chunks = gemv.row_chunks(rows, k)
    assert [r for r0, c in chunks for r in range(r0, r0 + c)] == list(range(rows))
    assert max(c for _, c in chunks) * k * 2 + gemv.RED_BYTES <= gemv.SHARED_BYTES
    if rows * k * 2 + gemv.RED_BYTES <= gemv.SHARED_BYTES:
        assert len(chunks) == 1


# --- rules and the database ---------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    q_linear_spec(1, 4096, 4096), q_linear_spec(4, 22016, 4096), q_linear_spec(5, 4096, 4096),
    q_linear_spec(Sym("seq_len"), 4096, 4096), q_linear_spec(1, 4096, 4096, bits=3),
    q_linear_spec(1, 4096, 4096, group=64), q_linear_spec(1, 4096, 4096, xdt="float32"),
    q_linear_spec(1, 64, 48), q_linear_spec(2, 96, 4096, bias=True),
    q_linear_spec(1, 32000, 4096, ydt="float32"),
    KernelSpec("linear", (((1, 64), "float16"), ((32, 64), "float16")), (((1, 32), "float16"),),
               ()),
])
def test_rule_applies_exactly_where_the_one_shot_q4_gemv_does(spec):
    applies = linear.gemv_q4_rule(spec, "k") is not None
    kernel = gemv.gemv_q4_v2_rule(spec, "k")
    assert (kernel is not None) == applies
    if applies:
        assert "xs_rows" in kernel.device_source and "int tile" in kernel.device_source


def test_kernel_refuses_a_layout_it_cannot_read():
    with pytest.raises(MlccError, match=r"^\[compile\] k3: the persistent q4 GEMV needs"):
        gemv.gemv_q4_persistent_kernel(LinearShape(q_linear_spec(1, 64, 64, bits=3)), "k3",
                                       2, 8, 1)


def test_bias_and_float32_logits_reach_the_store():
    bias = gemv.gemv_q4_v2_rule(q_linear_spec(2, 96, 4096, bias=True), "k").device_source
    assert "total + mlcc_f32(b[n])" in bias
    logits = gemv.gemv_q4_v2_rule(q_linear_spec(1, 32000, 4096, ydt="float32"), "k")
    assert "float* __restrict__ y" in logits.device_source


DATABASE = {"best": {"4096,4096": {"kind": "persistent", "blocks_per_sm": 3, "warps": 4,
                                   "rows_per_warp": 2, "rotate": False, "us": 3.0},
                     "22016,4096": {"kind": "block", "warps": 4, "rows_per_warp": 4,
                                    "us": 19.0},
                     "12288,4096": {"warps": 8, "rows_per_warp": 2, "us": 12.0}},
            "best_by_kind": {"block": {"4096,4096": {"kind": "block", "warps": 8,
                                                     "rows_per_warp": 1, "us": 5.0}}}}


def test_database_selects_the_measured_kind_per_shape():
    with mock.patch.object(tuning, "_database", lambda: DATABASE):
        assert tuning.persistent_config(4096, 4096) == tuning.PersistentConfig(3, 4, 2, False)
        assert tuning.gemv_config(4096, 4096) == (8, 1, "mlcc_q4_dot8")  # best_by_kind
        assert tuning.gemv_config(12288, 4096) == (8, 2, "mlcc_q4_dot8")  # record without kind
        assert tuning.persistent_config(22016, 4096) == tuning.PersistentConfig()
        assert tuning.selected_kind(22016, 4096) == "block"
        assert tuning.selected_kind(12288, 4096) == "block"
        assert tuning.selected_kind(4, 4) is None
        pp = dict(DATABASE["best"]["4096,4096"], pingpong=True)
        with mock.patch.dict(DATABASE["best"], {"4096,4096": pp}):
            assert tuning.persistent_config(4096, 4096).pingpong
            kernel = gemv.gemv_q4_tuned_rule(q_linear_spec(1, 4096, 4096), "k")
            assert "if (tile >= 2048) break;" in kernel.device_source
        picked = gemv.gemv_q4_tuned_rule(q_linear_spec(1, 4096, 4096), "k")
        assert "break;" not in picked.device_source
        assert launched(picked)[1] == 4 and "wa[2][4]" in picked.device_source
        assert gemv.gemv_q4_tuned_rule(q_linear_spec(1, 22016, 4096), "k") is None
        assert gemv.gemv_q4_tuned_rule(q_linear_spec(1, 12288, 4096), "k") is None
        assert gemv.gemv_q4_tuned_rule(q_linear_spec(1, 128, 64), "k") is not None


def test_shipped_database_still_reads():
    assert tuning.gemv_config(22016, 4096)[:2] == (4, 4)
    assert isinstance(tuning.persistent_config(22016, 4096), tuning.PersistentConfig)


def bank_conflicts(rotate: bool) -> int:
    """Worst ways of a bank conflict over the 16-byte activation reads of one warp: such reads
    are served a quarter warp (8 lanes, 128 bytes) at a time; lane L reads group g = L (+32 it)
    at half2 word g * 16 + 4 * p_j(L) for its j-th word."""
    worst = 1
    for j in range(4):
        for quarter in range(4):
            banks: dict[int, set[int]] = {}
            for lane in range(8 * quarter, 8 * quarter + 8):
                p = (j + ((lane >> 1) & 3)) & 3 if rotate else j
                first = lane * 16 + 4 * p  # 4-byte words
                for word in range(first, first + 4):
                    banks.setdefault(word % 32, set()).add(word)
            worst = max(worst, max(len(words) for words in banks.values()))
    return worst


def test_rotated_words_read_activations_without_bank_conflicts():
    kernel = gemv.gemv_q4_v2_rule(q_linear_spec(1, 4096, 4096), "k").device_source
    assert "rot = (lane >> 1) & 3" in kernel and "p1 = (rot + 1) & 3" in kernel
    assert "x0 = xq[p0], x1 = xq[p1], x2 = xq[p2], x3 = xq[p3]" in kernel
    assert bank_conflicts(rotate=True) == 1 and bank_conflicts(rotate=False) == 4


# --- arithmetic -----------------------------------------------------------------------------


def emulated_gemv(qw: np.ndarray, qs: np.ndarray, x: np.ndarray, rotate: bool) -> np.ndarray:
    """The kernel's arithmetic for one row: each lane (group g, lane g % 32) takes its four
    words in (rotated) order; a word's eight products are summed in pairs in float16 (fused
    multiply-adds rounded once), then in float32; groups accumulate in float32 per lane; lanes
    are summed by the butterfly of mlcc_warp_sum."""
    n, words = qw.shape
    groups = words // 4
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 15).astype(np.float64) - 7  # (n, words, 8)
    xw = x.astype(np.float64).reshape(words, 8)
    prod = codes * xw  # exact in float64
    def pair(a: int, b: int) -> np.ndarray:  # fma(d_b, x_b, d_a * x_a), d_a * x_a in half
        rounded = prod[:, :, a].astype(np.float16).astype(np.float64)
        return (rounded + prod[:, :, b]).astype(np.float16).astype(np.float32)

    # p = (pair of elements 0/1, pair of 4/5), q = (2/3, 6/7); the word is (p.x+p.y)+(q.x+q.y)
    word_sum = (pair(0, 1) + pair(4, 5)) + (pair(2, 3) + pair(6, 7))
    word_sum = word_sum.reshape(n, groups, 4).astype(np.float32)
    lane = np.arange(groups) % 32
    order = (np.arange(4)[None, :] + (((lane >> 1) & 3)[:, None] if rotate else 0)) & 3
    w = np.take_along_axis(word_sum, np.broadcast_to(order, (n, groups, 4)), axis=2)
    part = ((w[..., 0] + w[..., 1]) + w[..., 2]) + w[..., 3]
    acc = np.zeros((n, 32), np.float32)
    for g in range(groups):  # acc += part * scale is one fused multiply-add
        fused = acc[:, g % 32].astype(np.float64) + part[:, g].astype(np.float64) * qs[:, g]
        acc[:, g % 32] = fused.astype(np.float32)
    for o in (16, 8, 4, 2, 1):
        acc = acc + acc[:, np.arange(32) ^ o]
    return acc[:, 0]


@pytest.mark.parametrize("k", [4096, 11008])
def test_emulated_arithmetic_stays_within_parity_tolerance(k):
    rng = np.random.default_rng(k)
    n = 48
    qw = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
    x = rng.standard_normal(k).astype(np.float16)
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((qw[:, :, None] >> shifts) & 15).reshape(n, k).astype(np.float64) - 7
    exact = (codes * np.repeat(qs.astype(np.float64), 32, axis=1)) @ x.astype(np.float64)
    rotated, plain = emulated_gemv(qw, qs, x, True), emulated_gemv(qw, qs, x, False)
    scale = np.abs(exact).max()
    assert np.abs(rotated - exact).max() / scale < 2e-3
    assert np.abs(plain - exact).max() / scale < 2e-3
    # a word's sum is two float16 pair sums added in float32, so four of them add up exactly
    # in float32 in almost any order: the rotation leaves the results (nearly) unchanged
    assert np.abs(rotated - plain).max() / scale < 1e-6


# --- nvcc -----------------------------------------------------------------------------------


def wrappers(kernels) -> str:
    """A __global__ per kernel, with the launcher's block size as its launch bound, so ptxas
    compiles the device functions as TVM's kernels would."""
    out = []
    for kernel in kernels:
        params = re.search(r"_dev\((.*?)\) \{", kernel.device_source).group(1)
        names = ", ".join(p.split()[-1] for p in params.split(", "))
        threads = re.search(r"T\.thread_binding\((\d+), thread=\"threadIdx\.x\"",
                            kernel.launcher).group(1)
        out.append(f'extern "C" __global__ void __launch_bounds__({threads}) '
                   f'g_{kernel.name}({params}) {{ {kernel.name}_dev({names}); }}')
    return "\n".join(out) + "\n"


def ptxas(kernels, tmp_path: Path, fmt: str) -> subprocess.CompletedProcess:
    src = tmp_path / "k.cu"
    src.write_text("#include <cstdint>\n" + device_source(kernels) + wrappers(kernels))
    return subprocess.run(["nvcc", f"--{fmt}", "-O3", "-std=c++17", "-arch=sm_90", "-w",
                           "-Xptxas", "-v", "-o", str(tmp_path / f"k.{fmt}"), str(src)],
                          capture_output=True, text=True, check=False)


def decode_kernels() -> list:
    return [gemv.gemv_q4_v2_rule(q_linear_spec(1, n, k, ydt="float32" if n == 32000
                                               else "float16"), f"k{n}_{k}")
            for n, k in DECODE_SHAPES]


@needs_nvcc
def test_decode_shapes_stream_128_bit_and_spill_nothing(tmp_path):
    kernels = decode_kernels()
    done = ptxas(kernels, tmp_path, "ptx")
    assert done.returncode == 0, done.stderr[-2000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert re.search(r"ld\.global\.nc\.v4\.u32", ptx), "weights must stream as 128-bit loads"
    assert re.search(r"ld\.shared\.v4\.u32", ptx), "activations must be read 16 bytes at a time"
    assert not re.search(r"ld\.shared\.u32", ptx), "no 4-byte activation reads in the loop"
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr


@needs_nvcc
def test_decode_shapes_build_into_a_library(tmp_path):
    compile_library(decode_kernels(), "", "", tmp_path / "gemv.so")
    assert (tmp_path / "gemv.so").stat().st_size > 10_000


def fused_kernels() -> list:
    config = tuning.PersistentConfig(3, 8, 1, True)
    lin = q_linear_spec(1, 12288, 4096)
    norm = (("norm_eps", 1e-5), ("norm_weight_offset", 0.0))
    rms = KernelSpec("norm_q_linear", (((1, 4096), "float16"), ((4096,), "float16"))
                     + lin.inputs[1:], lin.outputs,
                     tuple(sorted(lin.attrs + norm + (("norm_op", "rms_norm"),))))
    add = KernelSpec("norm_q_linear", (((1, 4096), "float16"), ((1, 4096), "float16"),
                                       ((4096,), "float16")) + lin.inputs[1:],
                     lin.outputs + (((1, 4096), "float16"),),
                     tuple(sorted(lin.attrs + norm + (("norm_op", "add_rms_norm"),))))
    down = q_linear_spec(1, 4096, 11008)
    silu = KernelSpec("silu_mul_q_linear", (((1, 22016), "float16"),) + down.inputs[1:],
                      down.outputs, down.attrs)
    with mock.patch.object(fusion, "gemv_q4_kernel", gemv.fusion_gemv(config)):
        return [fusion.gen_norm_q_linear(rms, "f_rms"), fusion.gen_norm_q_linear(add, "f_add"),
                fusion.gen_silu_mul_q_linear(silu, "f_silu")]


@needs_nvcc
def test_fusion_staging_strings_compile_into_the_persistent_kernel(tmp_path):
    kernels = fused_kernels()
    for kernel in kernels:
        assert "xs_rows" in kernel.device_source and launched(kernel)[0] <= 3 * gemv.SMS
    assert all("mlcc_block_sum(sq, red)" in k.device_source for k in kernels[:2])
    assert "blockIdx.x == 0" in kernels[1].device_source  # the residual sum is written once
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr


@needs_nvcc
def test_batch_rows_reuse_each_weight_word_and_compile(tmp_path):
    kernels = [gemv.gemv_q4_persistent_kernel(LinearShape(q_linear_spec(rows, 4096, k)),
                                              f"b{rows}_{k}", 3, 8, 1)
               for rows, k in ((4, 4096), (16, 4096), (4, 11008))]
    # 4 rows of 4096 in one staging pass, 16 rows in four, 4 rows of 11008 in two
    assert [k.device_source.count("while (tile <") for k in kernels] == [1, 4, 2]
    assert "float acc[4][1]" in kernels[0].device_source
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr


# --- the benchmark harness ----------------------------------------------------------------


def sweep_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "gemv_sweep.py"
    spec = importlib.util.spec_from_file_location("gemv_sweep_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_variants_are_few_named_once_and_generate():
    sweep = sweep_module()
    chosen = sweep.variants()
    assert len(chosen) <= 50 and len({v["name"] for v in chosen}) == len(chosen)
    assert {(v["n"], v["k"]) for v in chosen if v["kind"] == "block"} >= set(DECODE_SHAPES)
    assert {v["prologue"] for v in chosen} == {"none", "rms_norm", "silu_mul"}
    for v in chosen:
        kernel = sweep.kernel_of(v)
        assert kernel.name == v["name"] and f"def {v['name']}(" in kernel.launcher


@pytest.mark.parametrize("prologue", ["rms_norm", "silu_mul"])
def test_sweep_prologue_reference_matches_the_interpreter(prologue):
    from mlcc.ir.registry import get_op

    sweep = sweep_module()
    v = {"rows": 2, "k": 64, "prologue": prologue}
    leading, activations = sweep.prologue_inputs(v, np.random.default_rng(1))
    attrs = {"eps": 1e-5, "weight_offset": 0.0} if prologue == "rms_norm" else {}
    expected = get_op(prologue).reference(None, leading, attrs)[0]
    np.testing.assert_allclose(activations.astype(np.float32), expected.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    qw = np.random.default_rng(2).integers(0, 2**32, (8, 8), dtype=np.uint64).astype(np.uint32)
    qs = np.full((8, 2), 0.5, np.float16)
    codes = ((qw[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).reshape(8, 64)
    np.testing.assert_allclose(sweep.reference(qw, qs, activations),
                               activations.astype(np.float32) @ ((codes - 7.0) * 0.5).T,
                               rtol=1e-5, atol=1e-5)


@needs_nvcc
def test_pingpong_buffers_compile_without_spills_at_k_4096(tmp_path):
    kernels = [gemv.gemv_q4_persistent_kernel(LinearShape(q_linear_spec(1, n, 4096)), f"pp{n}",
                                              2, 8, 1, pingpong=True) for n in (4096, 22016)]
    plain = gemv.gemv_q4_persistent_kernel(LinearShape(q_linear_spec(1, 4096, 4096)), "mv",
                                           2, 8, 1)
    assert all(k.device_source.count("while (tile <") == 1 for k in kernels + [plain])
    assert all(k.device_source.count("mlcc_warp_sum") == 2 for k in kernels)
    assert plain.device_source.count("mlcc_warp_sum") == 1
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr


@needs_nvcc
@pytest.mark.parametrize("model", ["stories260K", "llama2_7b"])
def test_models_compile_with_the_rule_first_in_linear_rules(tmp_path, model):
    from test_cuda_codegen import STORIES, lowered, nvcc

    from mlcc.backends.cuda.codegen import library_parts

    rules = (gemv.gemv_q4_v2_rule,) + linear.LINEAR_RULES
    with mock.patch.object(linear, "LINEAR_RULES", rules):
        built, _, _, _ = library_parts(lowered(STORIES if model == "stories260K" else model,
                                               "q4f16_1"), {"params": []})
    persistent = [k for k in built if "int tile = blockIdx.x" in k.device_source]
    # every distinct decode q_linear whose K is a multiple of 32 (stories260K's down projection
    # has K = 172 and keeps another rule), the float32 logits included
    assert len(persistent) == (4 if model == "stories260K" else 5)
    done = nvcc(device_source(built), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def merged_database(sweep, rows: list[dict], folder: Path) -> dict:
    """The shipped tuning database after `sweep.merge` of a sweep whose timed rows are `rows`."""
    import json

    source = folder / "sweep.json"
    source.write_text(json.dumps({"date": "d", "command": "c", "device": "H200",
                                  "variants": rows}))
    database = folder / "db.json"
    database.write_text(tuning.DATABASE.read_text())
    sweep.merge(source, database)
    return json.loads(database.read_text())


def test_the_sweep_merge_never_records_tma_variants(tmp_path):
    """The TMA GEMV's calls are placed by gemv_tma.mark; a faster TMA row of a sweep must not
    become the database's pick for its shape (or the GLU table's)."""
    gemv_sweep = sweep_module()
    rows = [dict(v, us=1.0 if v["kind"].startswith("tma") else 9.0, gb_s=1.0, rel_err=1e-4)
            for v in gemv_sweep.tma_depth_variants() + gemv_sweep.tma_glu_variants()
            + gemv_sweep.tma_warps_variants()]
    merged = merged_database(gemv_sweep, rows, tmp_path)
    assert not any(r["kind"].startswith("tma") for r in merged["best"].values())
    assert not any(r["kind"].startswith("tma") for r in merged["glu"].values())
    assert {r["kind"] for r in merged["best"].values()} >= {"block"}  # the picks, re-timed
