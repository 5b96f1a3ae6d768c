"""The tensor-core prefill attention (mlcc.backends.cuda.attention.flash_source) without a GPU.

* The tile and visibility logic is the kernel's own C++ (`visibility_source`), compiled here
  with the host compiler and run over random chunk starts, chunk lengths, windows and sinks:
  the (query, key) pairs it lets through must be exactly those the CPU kernel
  (mlcc.backends.llvm.attention) attends to, every visited key tile must hold one of them,
  every key it reads must be at or before the chunk's last position, and a visited row it does
  not read must be invisible.
* A NumPy model of the kernel's loop (those tiles, online softmax in float32, P rounded to
  float16) agrees with dense float32 attention to float16 accuracy.
* The kernels compile with nvcc for sm_90 (7B shape, GQA, sliding window with sinks, head
  dims 64 and 80) without spills and within 48 KB of static shared memory; which specs take the
  tensor-core path. Numbers on the GPU: benchmarks/cuda/attention_bench.py and tests/gpu.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from nvcc_probe import cubin_report, probe_stats

from mlcc.backends.cuda.attention import (
    TILE,
    gen_qkv_attention,
    use_flash,
    visibility_source,
)
from mlcc.backends.cuda.codegen import device_source
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

# (window, sinks): -1 = no window, as the kv_layout records it
CONFIGS = [(-1, 0), (1, 0), (8, 0), (8, 4), (100, 4), (64, 64), (130, 70), (4096, 4), (3, 200)]


def attention_spec(hq: int = 32, hkv: int = 32, d: int = 128, window: int = -1, sinks: int = 0,
                   rows=None, dtype: str = "float16", batched: bool = False) -> KernelSpec:
    rows = Sym("seq_len") if rows is None else rows
    ring = window > 0
    capacity = -(-(sinks + window + 512) // 16) * 16 if ring else 4096
    return KernelSpec(
        "qkv_attention", (((rows, (hq + 2 * hkv) * d), dtype),), (((rows, hq * d), dtype),),
        (("batched", batched), ("num_q_heads", hq), ("rope_scaling", None),
         ("rope_style", "rotate_half"), ("rope_theta", 10000.0), ("rotary_dim", d),
         ("scale", None)),
        (("capacity", capacity), ("dtype", dtype), ("head_dim", d), ("kv_heads", hkv),
         ("page_size", 16), ("pages", capacity // 16), ("pages_per_seq", capacity // 16),
         ("ring", ring), ("sinks", sinks), ("window", window)))


def reference_visible(pos: int, j: np.ndarray, window: int, sinks: int) -> np.ndarray:
    """The CPU kernel's rule: j in range(pos + 1) and (j >= lo or j < sinks)."""
    lo = max(pos - (window - 1), 0) if window > 0 else 0
    return (j >= 0) & (j <= pos) & ((j >= lo) | (j < sinks))


HARNESS = r"""
#include <cstdio>
#define MLCC_ATTN_HD inline
%s
// one case: for every query tile, the visited key tiles; per query row and key, whether it is
// visible; per key of a visited tile, whether it is loaded (1) or zero-filled (2)
template <class Tiles, class At, class Vis, class Load, class Full>
void run(FILE* out, long long start, long long n, Tiles tiles, At at, Vis vis, Load load,
         Full full) {
  for (long long q0 = 0; q0 < n; q0 += %d) {
    const long long p0 = start + q0, p1 = start + (q0 + %d < n ? q0 + %d : n - 1);
    long long sink_tiles, first;
    const long long count = tiles(p0, p1, &sink_tiles, &first);
    fprintf(out, "T %%lld", q0);
    for (long long t = 0; t < count; ++t) fprintf(out, " %%lld", at(t, sink_tiles, first));
    fprintf(out, "\nF");
    for (long long t = 0; t < count; ++t)
      fprintf(out, " %%d", full(p0, p1, at(t, sink_tiles, first) * %d) ? 1 : 0);
    fprintf(out, "\n");
    for (long long i = q0; i <= p1 - start; ++i) {
      fprintf(out, "V %%lld", i);
      for (long long t = 0; t < count; ++t)
        for (long long j = at(t, sink_tiles, first) * %d; j < (at(t, sink_tiles, first) + 1) * %d;
             ++j)
          if (vis(start + i, j)) fprintf(out, " %%lld", j);
      fprintf(out, "\n");
    }
    fprintf(out, "L");
    for (long long t = 0; t < count; ++t)
      for (long long j = at(t, sink_tiles, first) * %d; j < (at(t, sink_tiles, first) + 1) * %d;
           ++j)
        fprintf(out, " %%lld:%%d", j, load(p0, p1, j) ? 1 : 2);
    fprintf(out, "\n");
  }
}
int main() {
  FILE* out = stdout;
%s
  return 0;
}
"""


def random_cases(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(config index, chunk start, chunk length), chunks starting anywhere after earlier ones."""
    cases = []
    for c in range(len(CONFIGS)):
        for _ in range(6):
            cases.append((c, int(rng.integers(0, 400)), int(rng.integers(1, 200))))
        cases += [(c, 0, 1), (c, 0, 64), (c, 64, 64), (c, 5, 130)]
    return cases


def run_harness(tmp_path: Path, cases: list[tuple[int, int, int]]) -> list[str]:
    helpers = "\n".join(visibility_source(f"c{i}", w, s) for i, (w, s) in enumerate(CONFIGS))
    calls = "\n".join(
        f'  fprintf(out, "C {c} {start} {n}\\n"); run(out, {start}, {n}, c{c}_tiles, '
        f"c{c}_tile_at, c{c}_visible, c{c}_loaded, c{c}_full);" for c, start, n in cases)
    source = HARNESS % (helpers, TILE, TILE - 1, TILE - 1, TILE, TILE, TILE, TILE, TILE, calls)
    (tmp_path / "tiles.cpp").write_text(source)
    exe = tmp_path / "tiles"
    done = subprocess.run(["g++", "-O1", "-std=c++17", "-o", str(exe), str(tmp_path / "tiles.cpp")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")


def parse_cases(lines: list[str]) -> list[dict]:
    """Per case: {"case": (c, start, n), "tiles": {q0: [...]}, "visible": {i: set}, "loads":
    {q0: {j: 1 | 2}}}."""
    cases, q0 = [], None
    for line in lines:
        if not line:
            continue
        tag, *rest = line.split(" ")
        if tag == "C":
            cases.append({"case": tuple(int(x) for x in rest), "tiles": {}, "visible": {},
                          "loads": {}, "full": {}})
        elif tag == "T":
            q0 = int(rest[0])
            cases[-1]["tiles"][q0] = [int(x) for x in rest[1:]]
        elif tag == "F":
            cases[-1]["full"][q0] = [x == "1" for x in rest]
        elif tag == "V":
            cases[-1]["visible"][int(rest[0])] = {int(x) for x in rest[1:]}
        else:
            cases[-1]["loads"][q0] = {int(a): int(b) for a, b in (x.split(":") for x in rest)}
    return cases


@pytest.fixture(scope="module")
def tile_plans(tmp_path_factory) -> list[dict]:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    cases = random_cases(np.random.default_rng(7))
    plans = parse_cases(run_harness(tmp_path_factory.mktemp("flash_tiles"), cases))
    assert [p["case"] for p in plans] == cases
    return plans


def test_visible_pairs_equal_the_cpu_kernel(tile_plans):
    for plan in tile_plans:
        c, start, n = plan["case"]
        window, sinks = CONFIGS[c]
        for i in range(n):
            keys = np.arange(start + n + TILE)
            expected = set(keys[reference_visible(start + i, keys, window, sinks)].tolist())
            assert plan["visible"][i] == expected, (plan["case"], i)


def test_visited_tiles_are_ascending_and_none_is_empty(tile_plans):
    for plan in tile_plans:
        n = plan["case"][2]
        for q0, tiles in plan["tiles"].items():
            assert tiles == sorted(set(tiles)) and tiles, (plan["case"], q0)
            rows = range(q0, min(q0 + TILE, n))
            seen = set().union(*(plan["visible"][i] for i in rows))
            for t in tiles:
                assert seen & set(range(t * TILE, (t + 1) * TILE)), (plan["case"], q0, t)


def test_loaded_rows_cover_visible_keys_and_stay_within_the_written_range(tile_plans):
    for plan in tile_plans:
        c, start, n = plan["case"]
        window, sinks = CONFIGS[c]
        for q0, loads in plan["loads"].items():
            rows = range(q0, min(q0 + TILE, n))
            seen = set().union(*(plan["visible"][i] for i in rows))
            assert all(loads[j] == 1 for j in seen), (plan["case"], q0)
            last_query = start + rows[-1]
            for j, kind in loads.items():
                if kind == 1:
                    # written (at or before the tile's last query) and, in a ring, not yet
                    # overwritten: within the window of the tile's first query, or a sink
                    assert 0 <= j <= last_query, (plan["case"], q0, j)
                    assert window <= 0 or j >= start + q0 - window + 1 or j < sinks


def test_unmasked_tiles_are_fully_visible_to_every_row(tile_plans):
    unmasked = 0
    for plan in tile_plans:
        n = plan["case"][2]
        for q0, tiles in plan["tiles"].items():
            rows = range(q0, min(q0 + TILE, n))
            for t, full in zip(tiles, plan["full"][q0]):
                if full:
                    unmasked += 1
                    keys = set(range(t * TILE, (t + 1) * TILE))
                    assert all(keys <= plan["visible"][i] for i in rows), (plan["case"], q0, t)
    assert unmasked > 20, unmasked


def flash_model(q, k, v, start: int, tiles: dict, window: int, sinks: int, scale: float):
    """The kernel's loop in NumPy: online softmax in float32 over the visited key tiles, P
    rounded to float16 (its sum too), O rescaled by exp(m_old - m_new) each tile."""
    n, d = q.shape
    out = np.zeros((n, d), np.float32)
    for q0, visited in tiles.items():
        rows = np.arange(q0, min(q0 + TILE, n))
        m = np.full(len(rows), -1.0e30, np.float32)
        l = np.zeros(len(rows), np.float32)
        o = np.zeros((len(rows), d), np.float32)
        for t in visited:
            keys = np.arange(t * TILE, (t + 1) * TILE)
            kt = np.where((keys < len(k))[:, None], k[np.minimum(keys, len(k) - 1)], 0)
            vt = np.where((keys < len(v))[:, None], v[np.minimum(keys, len(v) - 1)], 0)
            s = (q[rows].astype(np.float32) @ kt.T.astype(np.float32)) * np.float32(scale)
            mask = np.stack([reference_visible(start + i, keys, window, sinks) for i in rows])
            s = np.where(mask, s, -np.inf).astype(np.float32)
            top = np.maximum(m, s.max(axis=1))
            keep = np.exp(m - top)
            p = np.exp(s - top[:, None]).astype(np.float16)
            l = l * keep + p.astype(np.float32).sum(axis=1)
            o = o * keep[:, None] + p.astype(np.float32) @ vt.astype(np.float32)
            m = top
        out[rows] = o / l[:, None]
    return out.astype(np.float16)


def test_numpy_model_of_the_loop_equals_dense_attention(tile_plans):
    rng = np.random.default_rng(3)
    d, scale = 128, 1.0 / np.sqrt(128)
    worst = 0.0
    for plan in tile_plans[::3]:
        c, start, n = plan["case"]
        window, sinks = CONFIGS[c]
        q = rng.standard_normal((n, d)).astype(np.float16)
        k = (rng.standard_normal((start + n, d)) * 2).astype(np.float16)
        v = rng.standard_normal((start + n, d)).astype(np.float16)
        got = flash_model(q, k, v, start, plan["tiles"], window, sinks, scale)
        keys = np.arange(start + n)
        for i in range(n):
            mask = reference_visible(start + i, keys, window, sinks)
            s = (k[mask].astype(np.float64) @ q[i].astype(np.float64)) * scale
            w = np.exp(s - s.max())
            expected = (w / w.sum()) @ v[mask].astype(np.float64)
            worst = max(worst, float(np.abs(got[i] - expected).max()))
    # float16 P (relative 2^-11) and the float16 output: a few 1e-3 on outputs of size ~1
    assert worst < 4e-3, worst


def test_prefill_chunks_in_float16_take_the_tensor_core_path():
    assert use_flash(attention_spec())
    assert use_flash(attention_spec(hkv=8, window=4096, sinks=4))
    assert use_flash(attention_spec(rows=5)) and use_flash(attention_spec(d=80))
    assert not use_flash(attention_spec(rows=1)) and not use_flash(attention_spec(rows=4))
    assert not use_flash(attention_spec(dtype="float32"))
    assert not use_flash(attention_spec(d=256)) and not use_flash(attention_spec(d=72))
    assert not use_flash(attention_spec(rows=Sym("batch"), batched=True))
    flash = gen_qkv_attention(attention_spec(), "k0_qkv_attention")
    assert "k0_qkv_attention_flash" in flash.launcher and "_attend" not in flash.launcher
    assert "(seq_len + T.int64(63)) // T.int64(64) * T.int64(32)" in flash.launcher
    old = gen_qkv_attention(attention_spec(), "k0_qkv_attention", flash=False)
    assert "k0_qkv_attention_attend" in old.launcher and "_flash" not in old.launcher


NVCC_CASES = {  # name: spec
    "llama2_7b": attention_spec(),
    "gqa_32_8": attention_spec(hkv=8),
    "window_sinks": attention_spec(hkv=8, window=4096, sinks=4),
    "d64_window": attention_spec(hq=8, hkv=2, d=64, window=100, sinks=0),
    "d80": attention_spec(hq=32, hkv=32, d=80),
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_flash_kernels_compile_for_sm90_without_spills(tmp_path):
    kernels = [gen_qkv_attention(spec, f"k{i}_qkv_attention", ldmatrix=i % 2 == 1)
               for i, spec in enumerate(list(NVCC_CASES.values()) * 2)]
    probes = "".join(
        f"__global__ void probe{i}(const half* a, half* y, const int* s, const int* t, half* p, "
        f"long long n) {{ k{i}_qkv_attention_flash(a, y, s, t, p, n); }}\n"
        for i in range(len(kernels)))
    report = cubin_report(tmp_path, device_source(kernels) + probes)
    stats = probe_stats(report)
    assert len(stats) == len(kernels), report
    for index, spills, registers, smem in stats:
        name = list(NVCC_CASES)[index % len(NVCC_CASES)]
        assert spills == 0, (name, report)
        assert smem <= 48 * 1024 and registers <= 255, (name, smem, registers)


def load_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "attention_bench.py"
    spec = importlib.util.spec_from_file_location("attention_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_check_accepts_exact_attention_and_rejects_a_missing_window():
    """The benchmark's validation on the CPU: a pool and output written the way the kernels
    must write them (a ring that has wrapped) pass; an output that ignores the window fails."""
    torch = pytest.importorskip("torch")
    bench = load_bench()
    config = {"shape": bench.CONFIGS["window"], "kv": bench.kv_layout("window")}
    hq, hkv, d, window, sinks = config["shape"]
    kv = config["kv"]
    config["inv_freq"] = (1.0 / 10000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32).tolist()
    start, n = 1000, 40
    inputs = bench.make_inputs(np.random.default_rng(0), config, start, n)
    pos = np.arange(start, start + n)
    heads = inputs["qkv"].reshape(n, hq + 2 * hkv, d)
    pool, table = inputs["pool"].copy(), inputs["page_table"]
    slots = np.where(pos < sinks, pos, sinks + (pos - sinks) % (kv["capacity"] - sinks))
    inv = np.asarray(config["inv_freq"], np.float32)
    pool[table[slots // 16], 0, :, slots % 16] = bench.rotate(heads[:, hq:hq + hkv], pos, inv)
    pool[table[slots // 16], 1, :, slots % 16] = heads[:, hq + hkv:]
    keys = np.arange(start + n)
    key_slots = np.where(keys < sinks, keys, sinks + (keys - sinks) % (kv["capacity"] - sinks))
    rows = pool[table[key_slots // 16], :, :, key_slots % 16].astype(np.float64)
    q = bench.rotate(heads[:, :hq], pos, inv).astype(np.float64)
    outputs = {}
    for name, win in (("exact", window), ("no_window", -1)):
        y = np.zeros((n, hq, d))
        for i in range(n):
            mask = reference_visible(int(pos[i]), keys, win, sinks if win > 0 else 0)
            for h in range(hq):
                s = rows[mask, 0, h // (hq // hkv)] @ q[i, h] / np.sqrt(d)
                w = np.exp(s - s.max())
                y[i, h] = (w / w.sum()) @ rows[mask, 1, h // (hq // hkv)]
        outputs[name] = bench.check(torch, config, inputs, y.reshape(n, -1).astype(np.float16),
                                    pool, start, device="cpu")
    assert outputs["exact"]["k_err"] < 1e-2 and outputs["exact"]["v_err"] == 0
    assert outputs["exact"]["y_err"] < 2e-3, outputs["exact"]
    assert outputs["no_window"]["y_err"] > 0.1, outputs["no_window"]
    assert outputs["exact"]["gflop"] == pytest.approx(4 * n * (window + sinks) * d * hq / 1e9)


def test_benchmark_validate_calls_launchers_as_the_runtime_does():
    """`validate` on the CPU with a launcher emulated in NumPy (append into the ring, dense
    attention): arguments in the library's order, errors near zero; a launcher that drops the
    sinks is reported."""
    torch = pytest.importorskip("torch")
    import tvm

    bench = load_bench()
    config = {"shape": bench.CONFIGS["window"], "kv": bench.kv_layout("window")}
    hq, hkv, d, window, sinks = config["shape"]
    config["inv_freq"] = (1.0 / 10000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32).tolist()
    doc = {"configs": {"window": config}, "cases": []}

    def launcher(drop_sinks: bool):
        def run(qkv, y, seq_info, table, pool):
            x, start, pages = qkv.numpy(), int(seq_info.numpy()[0]), pool.numpy()
            n, t = x.shape[0], table.numpy()
            pos = np.arange(start, start + n)
            heads = x.reshape(n, hq + 2 * hkv, d)
            slots = bench.slot_of(pos, config["kv"])
            pages[t[slots // 16], 0, :, slots % 16] = bench.rotate(
                heads[:, hq:hq + hkv], pos, np.asarray(config["inv_freq"], np.float32))
            pages[t[slots // 16], 1, :, slots % 16] = heads[:, hq + hkv:]
            pool.copyfrom(pages)
            keys = np.arange(start + n)
            cache = bench.gather(pages, t, keys, config["kv"]).astype(np.float64)
            q = bench.rotate(heads[:, :hq], pos, np.asarray(config["inv_freq"], np.float32))
            out = np.zeros((n, hq, d))
            for i in range(n):
                mask = reference_visible(int(pos[i]), keys, window, 0 if drop_sinks else sinks)
                for h in range(hq):
                    g = h // (hq // hkv)
                    s = cache[0, g, mask] @ q[i, h].astype(np.float64) / np.sqrt(d)
                    w = np.exp(s - s.max())
                    out[i, h] = (w / w.sum()) @ cache[1, g, mask]
            y.copyfrom(out.reshape(n, -1).astype(np.float16))
        return run

    lib = {"window_good": launcher(False), "window_no_sinks": launcher(True)}
    rows = bench.validate(torch, tvm, lib, tvm.cpu(), doc, ["w", "window", 300, 20],
                          ("good", "no_sinks"), reference_device="cpu")
    assert rows[0]["ok"] and rows[0]["y_err"] < 2e-3, rows[0]
    assert not rows[1]["ok"], rows[1]
