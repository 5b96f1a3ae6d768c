"""NumPy models of the tensor-core GEMM's data movement (mlcc.backends.cuda.gemm), checked here.

Without a GPU the kernel cannot run, so its arithmetic and index maps are modelled lane by lane
with the formulas of the generated CUDA: the int4 -> half dequantization bit trick, the XOR
swizzle of the shared tiles (every write lands once, every ldmatrix phase is free of bank
conflicts), the ldmatrix + mma.m16n8k16 fragment layouts and the epilogue map (one tile's
product equals x @ W.T), and the ring/commit-group schedule of the K loop (each step computes on
the data of that step, and nothing in flight or being written overlaps what is being read).
"""

from __future__ import annotations

import numpy as np
import pytest

from mlcc.backends.cuda.gemm import BK, THREADS, TileConfig

CONFIGS = [TileConfig(128, 128, 2, 4, 2), TileConfig(128, 128, 4, 4, 2),
           TileConfig(128, 128, 2, 3, 1), TileConfig(128, 64, 4, 4, 2),
           TileConfig(64, 128, 2, 4, 2), TileConfig(128, 64, 4, 2, 3),
           TileConfig(64, 64, 2, 4, 2)]
LANES = np.arange(32)


def swz(r, c):
    """mlcc_tc_swz: offset in halves of (row r, column c) in a tile of 32-half rows."""
    return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3)


def dequant8(w: int, scale: np.float16) -> np.ndarray:
    """mlcc_tc_q4_dequant8: the eight halves in k order from one packed word."""
    t = [(w & 0xF) | ((w << 12) & 0xF0000), ((w >> 8) & 0xF) | ((w << 4) & 0xF0000),
         ((w >> 16) & 0xF) | ((w >> 4) & 0xF0000), ((w >> 24) & 0xF) | ((w >> 12) & 0xF0000)]
    words = np.array([(v | 0x64006400) & 0xFFFFFFFF for v in t], dtype=np.uint32)
    halves = words.view(np.float16)  # little endian: low half first
    return (halves - np.float16(1031)) * scale


def test_dequant_trick_equals_code_minus_7_times_scale_for_all_codes():
    rng = np.random.default_rng(0)
    scales = np.concatenate([rng.random(200).astype(np.float16) * np.float16(0.05),
                             np.array([1e-7, 6e-5, 0.5, 3.0, -0.02, 65000 / 8], np.float16)])
    for code in range(16):
        word = sum(code << (4 * j) for j in range(8))
        for scale in scales:
            got = dequant8(word, np.float16(scale))
            expected = np.float16(np.float32(code - 7) * np.float32(scale))
            assert got.dtype == np.float16 and np.array_equal(got, np.full(8, expected))


def test_dequant_trick_keeps_k_order_within_a_word():
    rng = np.random.default_rng(1)
    for word in rng.integers(0, 2**32, 50, dtype=np.uint64):
        w = int(word)
        codes = np.array([(w >> (4 * j)) & 15 for j in range(8)], dtype=np.float32)
        expected = ((codes - 7) * np.float32(np.float16(0.01))).astype(np.float16)
        assert np.array_equal(dequant8(w, np.float16(0.01)), expected)


@pytest.mark.parametrize("rows", [64, 128])
def test_swizzle_is_a_bijection_and_ldmatrix_phases_hit_eight_bank_groups(rows):
    offsets = {swz(r, c) for r in range(rows) for c in range(0, 32, 8)}
    assert offsets == set(range(0, rows * 32, 8))
    for base in range(0, rows, 8):
        for c in range(0, 32, 8):
            groups = {(swz(base + i, c) * 2 // 16) % 8 for i in range(8)}
            assert len(groups) == 8, (base, c)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.tag)
def test_copy_and_dequant_maps_write_every_chunk_once(config):
    # cp.async: thread tid, chunk i -> v = tid + i * THREADS, row v >> 2, column (v & 3) * 8
    for rows in (config.bm, config.bn):
        v = np.arange(THREADS)[:, None] + np.arange(rows * 4 // THREADS)[None, :] * THREADS
        dst = swz(v >> 2, (v & 3) * 8)
        assert sorted(dst.ravel().tolist()) == list(range(0, rows * 32, 8))
    # q4: thread -> feature tid / (4 / per_thread), words b_word .. b_word + per_thread - 1
    per_thread = config.bn * 4 // THREADS
    tid = np.arange(THREADS)
    b_row, b_word = tid // (4 // per_thread), (tid % (4 // per_thread)) * per_thread
    dst = [swz(r, (w + j) * 8) for r, w in zip(b_row, b_word) for j in range(per_thread)]
    assert sorted(dst) == list(range(0, config.bn * 32, 8))


def ldmatrix_x4(tile: np.ndarray, addresses: np.ndarray) -> np.ndarray:
    """(32 lanes, 4 regs, 2 halves): lane l gives the row address of row l % 8 of matrix l / 8;
    register i of lane t holds matrix i, row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1."""
    flat = tile.ravel()
    out = np.zeros((32, 4, 2), dtype=tile.dtype)
    for t in range(32):
        for i in range(4):
            row_start = addresses[i * 8 + t // 4]
            out[t, i] = flat[row_start + 2 * (t % 4): row_start + 2 * (t % 4) + 2]
    return out


def mma16816(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """PTX m16n8k16 row.col fragments: a (32, 4, 2), b (32, 2, 2), acc (32, 4) float32."""
    A, B = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
    for t in range(32):
        g, q = t // 4, 2 * (t % 4)
        A[g, q:q + 2], A[g + 8, q:q + 2] = a[t, 0], a[t, 1]
        A[g, q + 8:q + 10], A[g + 8, q + 8:q + 10] = a[t, 2], a[t, 3]
        B[q:q + 2, g], B[q + 8:q + 10, g] = b[t, 0], b[t, 1]
    C = A @ B
    for t in range(32):
        g, q = t // 4, 2 * (t % 4)
        acc[t] += [C[g, q], C[g, q + 1], C[g + 8, q], C[g + 8, q + 1]]


def swizzled(tile: np.ndarray) -> np.ndarray:
    out = np.zeros(tile.size, tile.dtype)
    for r in range(tile.shape[0]):
        for c in range(0, BK, 8):
            out[swz(r, c): swz(r, c) + 8] = tile[r, c:c + 8]
    return out.reshape(tile.shape)


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[3:5] + CONFIGS[6:],
                         ids=lambda c: c.tag)
def test_fragment_maps_of_one_k_step_give_the_tile_product(config):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((config.bm, BK)).astype(np.float16)
    w = rng.standard_normal((config.bn, BK)).astype(np.float16)
    As, Bs = swizzled(x), swizzled(w)
    y = np.zeros((config.bm, config.bn), np.float32)
    mt, nt = config.warp_m // 16, config.warp_n // 8
    for warp in range(8):
        wm = (warp % config.warps_m) * config.warp_m
        wn = (warp // config.warps_m) * config.warp_n
        acc = np.zeros((mt, nt, 32, 4), np.float32)
        for h in (0, 1):
            # a_ld / b_ld of the kernel, in halves; fragment i (pair p) is 16 rows further
            a_ld = swz(wm + (LANES & 15), h * 16 + (LANES >> 4) * 8)
            b_ld = swz(wn + (LANES >> 4) * 8 + (LANES & 7), h * 16 + ((LANES >> 3) & 1) * 8)
            af = [ldmatrix_x4(As, a_ld + i * 512) for i in range(mt)]
            bfr = []
            for p in range(nt // 2):
                r = ldmatrix_x4(Bs, b_ld + p * 512)
                bfr += [r[:, 0:2], r[:, 2:4]]
            for i in range(mt):
                for j in range(nt):
                    mma16816(acc[i, j], af[i], bfr[j])
        g, t2 = LANES >> 2, (LANES & 3) * 2
        for i in range(mt):
            for j in range(nt):
                for h in range(2):
                    rows, cols = wm + i * 16 + h * 8 + g, wn + j * 8 + t2
                    y[rows, cols], y[rows, cols + 1] = acc[i, j, :, 2 * h], acc[i, j, :, 2 * h + 1]
    expected = x.astype(np.float32) @ w.astype(np.float32).T
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 128])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.tag)
def test_k_loop_schedule_reads_each_step_once_and_never_a_slot_in_flight(config, steps):
    S, ahead = config.stages, config.ahead
    ring = [None] * S                 # step whose activations a ring slot holds (when landed)
    groups: list[list[tuple[int, int]]] = []  # commit groups: (slot, step) copies in flight
    pending: list[tuple[int, int]] = []
    regs: dict[int, int] = {}        # q4: register slot -> K step whose packed words it holds
    b_buffers = [None, None]

    def commit():
        groups.append(list(pending))
        pending.clear()

    def wait(n):  # cp.async.wait_group n: all but the newest n groups have landed
        for group in groups[:max(0, len(groups) - n)]:
            for slot, step in group:
                ring[slot] = step
            group.clear()

    def in_flight():
        return {slot for group in groups for slot, _ in group}

    for t in range(min(ahead, steps)):
        regs[t] = t
    for st in range(S - 1):
        if st < steps:
            pending.append((st % S, st))
        commit()
    b_buffers[0] = regs[0]
    if ahead < steps:
        regs[0] = ahead
    for kt0 in range(0, steps, ahead):  # the loop body is unrolled `ahead` times
        for u in range(ahead):
            kt = kt0 + u
            if kt >= steps:
                continue
            wait(S - 2)
            # __syncthreads: everything below may overlap other warps' compute of step kt
            written = set()
            if kt + S - 1 < steps:
                pending.append(((kt + S - 1) % S, kt + S - 1))
                written.add(("a", (kt + S - 1) % S))
            commit()
            if kt + 1 < steps:
                slot = (u + 1) % ahead
                assert regs[slot] == kt + 1
                b_buffers[(kt + 1) & 1] = regs[slot]
                written.add(("b", (kt + 1) & 1))
                if kt + 1 + ahead < steps:
                    regs[slot] = kt + 1 + ahead
            assert ring[kt % S] == kt and kt % S not in in_flight()
            assert b_buffers[kt & 1] == kt
            assert ("a", kt % S) not in written and ("b", kt & 1) not in written


@pytest.mark.parametrize("split", [False, True])
def test_generated_source_uses_the_modelled_formulas(split):
    from mlcc.backends.cuda.gemm import HELPERS, gemm_tc_kernel
    from mlcc.backends.cuda.linear import LinearShape
    from mlcc.backends.plan import KernelSpec
    from mlcc.ir.types import Sym

    rows = Sym("seq_len")
    spec = KernelSpec("q_linear", (((rows, 4096), "float16"), ((4096, 512), "uint32"),
                                   ((4096, 128), "float16")), (((rows, 4096), "float16"),),
                      (("bits", 4), ("group_size", 32), ("in_features", 4096)))
    config = TileConfig(128, 64, 4, 3, 2, split)
    text = " ".join(gemm_tc_kernel(LinearShape(spec), "k", config).device_source.split())
    helpers = " ".join(HELPERS.split())
    for formula in [
        "return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3);",
        "t[0] = (w & 0xFu) | ((w << 12) & 0xF0000u) | 0x64006400u;",
        "t[3] = ((w >> 24) & 0xFu) | ((w >> 12) & 0xF0000u) | 0x64006400u;",
        "a_ld[h] = mlcc_tc_swz(wm + (lane & 15), h * 16 + (lane >> 4) * 8) * 2;",
        "b_ld[h] = mlcc_tc_swz(wn + (lane >> 4) * 8 + (lane & 7), h * 16 + ((lane >> 3) & 1) * 8)",
        "mlcc_tc_ldsm4(af[i], a_base + a_ld[h] + i * 1024);",
        "mlcc_tc_ldsm4(r, b_base + b_ld[h] + p * 1024);",
        "const int wm = (warp % 4) * 32;", "const int wn = (warp / 4) * 32;",
        "const int v = tid + i * 256, r = v >> 2;", "mlcc_tc_swz(r, (v & 3) * 8)",
        "const int b_row = tid / 4, b_word = (tid % 4) * 1;",
        "wq[0] = __ldg(reinterpret_cast<const unsigned*>(w_src) + (0) * 4); sq[0] = s_src[0];",
        "wq[1] = __ldg(reinterpret_cast<const unsigned*>(w_src) + (1) * 4); sq[1] = s_src[1];",
        "wq[0] = __ldg(reinterpret_cast<const unsigned*>(w_src) + (2) * 4); sq[0] = s_src[2];",
        ("for (int kt0 = 0; kt0 < 128; kt0 += 2) { { const int kt = kt0 + 0; "
        "mlcc_tc_cp_wait<1>(); __syncthreads(); if (kt + 2 < 128)"),
        "const int slot = (kt + 2) % 3;",
        ("if (kt + 1 < 128) { { const half2 sc = __half2half2(sq[1]); "
        "*reinterpret_cast<uint4*>(Bs + ((kt + 1) & 1) * 2048"),
        ("if (kt + 3 < 128) { wq[1] = __ldg(reinterpret_cast<const unsigned*>(w_src) + "
        "(kt + 3) * 4); sq[1] = s_src[kt + 3]; }"),
        "const int kt = kt0 + 1;", "const half2 sc = __half2half2(sq[0]);",
        "const unsigned b_base = bs0 + (kt & 1) * 4096;",
        "const long long row = m0 + wm + i * 16 + h * 8 + g;",
        "const long long col = n0 + wn + j * 8 + t2;",
    ]:
        assert formula in text or formula in helpers, formula
