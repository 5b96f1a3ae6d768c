"""Where the TMA GEMV (mlcc.backends.cuda.gemv_tma, knob `tma_gemv`, on at O2) replaces a
decode GEMV, and what its text and launch carry.

On the Llama-2-7B decode plan it takes the one-row q4 GEMVs whose slice fits a block's shared
memory, or the gate_up + silu_mul GEMV whose ring of slots fits, and whose kernel ahead is
latency-bound: qkv and gate_up (behind a norm) and o_proj (behind the decode attention, which
then releases it at its start); down, behind the GLU GEMV, takes it with 16 consumer warps and
is released when the GLU ends; not the output projection (32000 rows); prefill, batch decode
and models whose scale rows are not whole 16-byte units keep their kernels. The kernel's values were checked on an
H200 against a float32 reference and against the one-shot GEMVs (benchmarks/results/
2026-11-30-h200-c and -d, the 7B logits bit for bit); here builds compile the 7B kernels with
nvcc.
"""

from __future__ import annotations

import shutil
from collections import Counter
from itertools import pairwise

import pytest
from test_cuda_glu_plan import lowered, plans, tiny_config

from mlcc.backends.cuda import codegen, decode_attention, gemv_tma, glu
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.passes import parse_opt

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def shape(spec) -> LinearShape:
    """The linear of a q_linear or a linear_silu_mul spec."""
    return LinearShape(glu.linear_spec(spec) if spec.op == glu.OP else spec)


def marked(plan) -> Counter:
    return Counter((c.spec.op, shape(c.spec).n, shape(c.spec).k) for c in plan.calls
                   if gemv_tma.marked(c.spec))


def test_the_7b_decode_gemvs_behind_light_kernels_are_marked(decode7b, monkeypatch):
    tma = gemv_tma.mark(decode7b)
    # qkv, o_proj and the gate_up + silu_mul GEMV behind light kernels; down behind the GLU
    assert marked(tma) == {("q_linear", 12288, 4096): 32, ("q_linear", 4096, 4096): 32,
                           (glu.OP, 22016, 4096): 32, ("q_linear", 4096, 11008): 32}
    pairs = list(zip(tma.calls, tma.calls[1:]))
    ahead = {c.spec.op for c, d in pairs if gemv_tma.released_early(d.spec)}
    assert ahead == {"rms_norm", "add_rms_norm", "qkv_attention"}
    behind_glu = [d.spec for c, d in pairs if gemv_tma.marked(d.spec)
                  and not gemv_tma.released_early(d.spec)]
    assert len(behind_glu) == 32 and {shape(s).k for s in behind_glu} == {11008}
    assert all(c.spec.op == glu.OP for c, d in pairs if d.spec in behind_glu)
    module = lowered("llama2_7b", "q4f16_1", "max_batch_size=4")
    others = {name: plan for name, plan in plans(module).items() if name != "decode"}
    assert set(others) == {"prefill", "batch_decode"}
    assert not any(marked(gemv_tma.mark(plan)) for plan in others.values())
    again = gemv_tma.mark(gemv_tma.mark(decode7b))
    assert all(len([a for a in c.spec.attrs if a[0] == gemv_tma.ATTR]) <= 1 for c in again.calls)
    monkeypatch.setattr(gemv_tma, "TMA_BEHIND_GLU", False)
    assert ("q_linear", 4096, 11008) not in marked(gemv_tma.mark(decode7b))
    monkeypatch.setattr(gemv_tma, "TMA_GLU", False)
    assert glu.OP not in {op for op, _, _ in marked(gemv_tma.mark(decode7b))}


def test_the_qkv_gemv_releases_a_lean_attention_that_fits_beside_it():
    """With `lean_attention` the decode attention's block (5,188 bytes of shared memory) fits
    on an SM beside a block of the 7B qkv GEMV (225,888), so the GEMV releases it at its start;
    the default attention's 9,348 bytes do not fit, and o_proj is not followed by it."""
    module = lowered("llama2_7b", "q4f16_1")

    def parts(**knobs):
        built, plans_, _, _ = codegen.library_parts(module, {"params": []}, fuse_glu=True,
                                                    **knobs)
        names = codegen.kernel_names(plans_)
        decode = next(p for p in plans_ if p.name == "decode")
        qkv = next(c.spec for c in decode.calls
                   if c.spec.op == "q_linear" and LinearShape(c.spec).n == 12288)
        attention = next(c.spec for c in decode.calls if c.spec.op == "qkv_attention")
        early = codegen.early_release(plans_, built)
        return qkv, attention, f"{names[qkv]}_dev" in early

    qkv, attention, released = parts(tma_gemv=True, lean_attention=True)
    assert decode_attention.lean(attention) and released
    assert gemv_tma.room_beside(qkv) == 233472 - (225888 + 1024) - 1024  # 5,536
    assert decode_attention.smem_bytes(attention) == 5200
    assert codegen.releases_attention(qkv, attention)
    qkv, attention, released = parts(tma_gemv=True)
    assert not decode_attention.lean(attention) and not released
    assert decode_attention.smem_bytes(attention) == 9360 > gemv_tma.room_beside(qkv)
    # a qkv GEMV not on the TMA kernel (not marked) never releases it
    unmarked = KernelSpec(qkv.op, qkv.inputs, qkv.outputs,
                          tuple(a for a in qkv.attrs if a[0] != gemv_tma.ATTR), qkv.kv)
    assert not codegen.releases_attention(unmarked, decode_attention.mark_lean(attention))
    # without the TMA GEMV nothing releases the attention early; the knob is on from O2
    qkv, attention, released = parts(lean_attention=True)
    assert decode_attention.lean(attention) and released is False
    assert parse_opt("O2").enabled("lean_attention") and parse_opt("O3").enabled("lean_attention")
    assert not parse_opt("O1").enabled("lean_attention")
    assert not parse_opt("O2;lean_attention=0").enabled("lean_attention")


def test_the_attention_releases_the_o_proj_gemv_at_its_start(decode7b):
    """With pdl a multi-block kernel ahead of a TMA GEMV releases it at its start; the one-row
    norms ahead of qkv keep releasing it after their own wait."""
    built, plans_, _, _ = codegen.library_parts(lowered("llama2_7b", "q4f16_1"), {"params": []},
                                                fuse_glu=True, tma_gemv=True)
    early = codegen.early_release(plans_, built)
    late = codegen.wait_release(built, early)
    assert any(f.endswith("_qkv_attention_decode") for f in early)
    assert {f.split("_", 1)[1] for f in late} == {"rms_norm_dev", "add_rms_norm_dev"}
    # the GLU GEMV ahead of down's TMA GEMV releases it when it ends
    glu_kernel = next(k for k in built if k.name.endswith("_linear_silu_mul"))
    assert not set(glu_kernel.device_functions()) & early
    plain, plain_plans, _, _ = codegen.library_parts(lowered("llama2_7b", "q4f16_1"),
                                                     {"params": []}, fuse_glu=True)
    assert not any("attention" in f for f in codegen.early_release(plain_plans, plain))


def test_slices_fit_one_block_an_sm(decode7b):
    for call in gemv_tma.mark(decode7b).calls:
        if not gemv_tma.marked(call.spec) or call.spec.op == glu.OP:
            continue
        s = LinearShape(call.spec)
        lay = gemv_tma.layout(s, gemv_tma.default_config(s))
        assert gemv_tma.ONE_PER_SM <= lay.total <= gemv_tma.MAX_SMEM
        assert -(-s.n // lay.rows) <= 132
        assert lay.weights == 0 and lay.scales % 16 == 0 and lay.bars % 8 == 0

    def config(n: int, k: int) -> gemv_tma.TmaConfig:
        spec = KernelSpec("q_linear", (((1, k), "float16"), ((n, k // 8), "uint32"),
                                       ((n, k // 32), "float16")), (((1, n), "float16"),),
                          (("bits", 4), ("group_size", 32), ("in_features", k)))
        return gemv_tma.default_config(LinearShape(spec))

    # 94 features a block keep 3 chunks in flight, 32 keep 2 (the measured picks)
    assert config(12288, 4096) == gemv_tma.TmaConfig(1, 8, 8, depth=3)
    assert config(4096, 4096) == gemv_tma.TmaConfig(1, 8, 8, depth=2)
    assert config(4096, 11008) == gemv_tma.TmaConfig(4, 2, 8, depth=2)
    # behind the GLU: the same slices, chunks and depth with 16 consumer warps
    down = next(c.spec for c in gemv_tma.mark(decode7b).calls
                if gemv_tma.marked(c.spec) and not gemv_tma.released_early(c.spec))
    assert gemv_tma.config_of(down) == gemv_tma.TmaConfig(4, 4, 8, depth=2)
    kernel = gemv_tma.gemv_tma_rule(down, "k1")
    assert "T.thread_binding(544" in kernel.launcher  # 16 consumer warps and the producer
    assert "mlcc_chain_sync(1, 512);" in kernel.device_source
    small = gemv_tma.stream_config(LinearShape(KernelSpec(
        "q_linear", (((1, 256), "float16"), ((256, 32), "uint32"), ((256, 8), "float16")),
        (((1, 256), "float16"),), (("bits", 4), ("group_size", 32), ("in_features", 256)))))
    assert small == gemv_tma.TmaConfig(1, 16, 16, depth=2)  # chunks of whole teams


def test_the_glu_mode_streams_through_a_ring_of_slots(decode7b):
    """The 7B gate_up (84 features a block) through 6 slots of 8 features (their gate and up
    rows), 2 in flight: the producer refills a slot once its 8 consumer warps have released it;
    each consumer warp takes one feature of a chunk and releases the slot after its sums."""
    spec = next(c.spec for c in gemv_tma.mark(decode7b).calls
                if c.spec.op == glu.OP and gemv_tma.marked(c.spec))
    lay = gemv_tma.glu_layout(shape(spec))
    assert (lay.rows, lay.slots) == (84, 6) and lay.total <= gemv_tma.MAX_SMEM
    assert lay.slot == 8 * 2 * (2048 + 256)
    kernel = glu.gen_linear_silu_mul(spec, "k1")
    body = kernel.device_source[kernel.device_source.index("k1_dev("):]
    producer = body[body.index("if (warp == 8)"):body.index("mlcc_grid_wait();")]
    assert producer.index("mlcc_chain_wait(empty") < producer.index("mlcc_chain_wait(full") \
        < producer.index("mlcc_chain_copy(")
    assert "(c - 2)" in producer and producer.count("mlcc_chain_copy(") == 4
    consumers = body[body.index("mlcc_grid_wait();"):]
    assert consumers.index("mlcc_chain_wait(full") < consumers.index("mlcc_chain_arrive(empty") \
        < consumers.index("mlcc_put(y, fb + f,")
    assert "expf(" in consumers  # silu_mul of the float16-rounded g and u
    assert "T.thread_binding(288" in kernel.launcher and "(1, 11008)" in kernel.launcher


def test_the_kernel_copies_before_its_wait_and_stages_after(decode7b):
    """The default kernel: barriers set up, then the producer warp's copies (each after the
    chunk `depth` before it landed), then the consumers' wait, staging and multiplies; without
    depth one thread issues every copy before the wait."""
    call = next(c for c in gemv_tma.mark(decode7b).calls if gemv_tma.marked(c.spec))
    kernel = gemv_tma.gemv_tma_rule(call.spec, "k1_q_linear")
    lay = gemv_tma.layout(LinearShape(call.spec), gemv_tma.default_config(LinearShape(call.spec)))
    assert kernel.min_blocks == 1
    assert f'T.alloc_buffer(({lay.total},), "uint8", scope="shared.dyn")' in kernel.launcher
    assert "smem.data))" in kernel.launcher
    body = kernel.device_source[kernel.device_source.index("k1_q_linear_dev("):]
    assert body.index("mbarrier.init") < body.index("if (warp == 8)") \
        < body.index("mlcc_chain_copy(") < body.index("mlcc_grid_wait();") \
        < body.index("xg[gi] =") < body.rindex("mlcc_chain_wait(")
    bulk = gemv_tma.gemv_tma_kernel(LinearShape(call.spec), "k2", gemv_tma.TmaConfig(1, 8, 16))
    body = bulk.device_source[bulk.device_source.index("k2_dev("):]
    assert "if (warp ==" not in body
    assert body.index("mbarrier.init") < body.index("mlcc_chain_copy(") \
        < body.index("mlcc_grid_wait();") < body.index("xg[gi] =") < body.index("mlcc_chain_wait(")


def test_small_models_run_it_where_scale_rows_are_whole_units(tmp_path):
    """K = 64 or 96 (the tiny GPU-test models): a row's scales are 4 or 6 bytes, not a whole
    16-byte unit a bulk copy can move, so they keep their GEMVs; K = 256 (llama64) does not."""
    def tma_kernels(name: str) -> list[str]:
        module = lowered(tiny_config(tmp_path, name), "q4f16_1", "prefill_chunk_size=128")
        built, _, _, _ = codegen.library_parts(module, {}, fuse_glu=True, tma_gemv=True)
        return [k.name for k in built if "mbarrier.init" in k.device_source]

    assert tma_kernels("llama") == []
    # qkv (512 x 256), o_proj (256 x 256), the gate_up + silu_mul GEMV and the decode logits
    # (120 x 256), each behind a norm or the attention, and down (256 x 256, 16 consumer
    # warps) behind the GLU
    assert len(tma_kernels("llama64")) == 5
    assert parse_opt("O2").enabled("tma_gemv") and parse_opt("O3").enabled("tma_gemv")
    assert not parse_opt("O1").enabled("tma_gemv")
    assert not parse_opt("O2;tma_gemv=0").enabled("tma_gemv")


def test_below_sm_90_the_builder_turns_it_off(tmp_path, monkeypatch):
    module = lowered(tiny_config(tmp_path, "llama64"), "q4f16_1", "prefill_chunk_size=128")
    monkeypatch.setattr(codegen, "compile_library", lambda *args, **kwargs: None)
    logs: list[str] = []
    codegen.build(module, tmp_path / "lib.so", {}, archs=("sm_80",), log=logs.append,
                  fuse_glu=True, tma_gemv=True)
    assert any(line.startswith("tma_gemv off") and "sm_80" in line for line in logs)
    logs.clear()
    codegen.build(module, tmp_path / "lib.so", {}, log=logs.append, fuse_glu=True,
                  tma_gemv=True, pdl=False)
    assert any(line.startswith("tma_gemv off") and "pdl" in line for line in logs)


@needs_nvcc
def test_the_7b_kernels_compile(tmp_path, decode7b):
    marked_specs = {c.spec for c in gemv_tma.mark(decode7b).calls if gemv_tma.marked(c.spec)}
    specs = {spec for spec in marked_specs if spec.op == "q_linear"}
    kernels = [gemv_tma.gemv_tma_rule(spec, f"k{i}_q_linear") for i, spec in enumerate(specs)]
    kernels += [glu.gen_linear_silu_mul(spec, "g0") for spec in marked_specs - specs]
    kernels.append(gemv_tma.gemv_tma_glu_kernel(shape(next(iter(marked_specs - specs))), "g1",
                                                glu.SILU_MUL, depth=4, stream_only=True))
    probe = gemv_tma.gemv_tma_kernel(LinearShape(next(iter(specs))), "probe",
                                     gemv_tma.TmaConfig(stream_only=True))
    # with a producer warp: 2 (K = 4096) or 4 K slices, chunks of 4 features, 4 in flight
    depth = []
    for i, spec in enumerate(specs):
        ks = 2 if LinearShape(spec).k == 4096 else 4
        cfg = gemv_tma.TmaConfig(ks, 8 // ks, 4, depth=4)
        depth.append(gemv_tma.gemv_tma_kernel(LinearShape(spec), f"d{i}", cfg))
    codegen.compile_library(kernels + [probe] + depth, "", "", tmp_path / "tma.so")
    assert (tmp_path / "tma.so").stat().st_size > 0


def test_k_slice_sums_stay_inside_their_rows(decode7b):
    """With K slices each warp stores its feature sums in `red`, which the mbarriers follow; a
    last chunk that is not full (32 rows in chunks of 10 or 12) must not store past the
    block's rows (an unguarded store broke the decode step on an H200 with chunks of 10)."""
    down = next(c.spec for c in gemv_tma.mark(decode7b).calls
                if gemv_tma.marked(c.spec) and not gemv_tma.released_early(c.spec))
    s = LinearShape(down)
    for cfg in (gemv_tma.TmaConfig(4, 5, 10, depth=2), gemv_tma.TmaConfig(4, 6, 12, depth=2),
                gemv_tma.config_of(down)):
        lay = gemv_tma.layout(s, cfg)
        assert lay.rows == 32 and lay.bars >= lay.red + lay.rows * cfg.ks * 4
        body = gemv_tma.gemv_tma_kernel(s, "k1", cfg).device_source
        assert "if (lane == 0 && f < nrows) red[f * KS + slice] = total;" in body
        assert "if (lane == 0) red[" not in body


def test_a_producer_warp_keeps_depth_chunks_in_flight(decode7b):
    """With depth, an extra warp issues the copies (chunk c after chunk c - depth landed) and
    never waits for the kernel ahead; the consumers meet on a named barrier without it."""
    spec = next(c.spec for c in gemv_tma.mark(decode7b).calls
                if dict(c.spec.attrs).get(gemv_tma.ATTR))
    cfg = gemv_tma.TmaConfig(2, 4, 4, depth=3)
    kernel = gemv_tma.gemv_tma_kernel(LinearShape(spec), "k1", cfg)
    body = kernel.device_source[kernel.device_source.index("k1_dev("):]
    producer = body[body.index("if (warp == 8)"):body.index("mlcc_grid_wait();")]
    assert "mlcc_chain_wait(bars + 8 * (c - 3), 0u);" in producer
    assert producer.index("mlcc_chain_wait(") < producer.index("mlcc_chain_copy(")
    assert "return 0;" in producer and "__syncthreads" not in body[body.index("if (warp"):]
    assert body.count("mlcc_chain_sync(1, 256);") == 2  # after the staging, before the sums
    assert 'thread="threadIdx.x"' in kernel.launcher and "T.thread_binding(288" in kernel.launcher


def folded_7b(**knobs):
    """The 7B library's kernels and plans with the O2 knobs (tma_fold included)."""
    module = lowered("llama2_7b", "q4f16_1")
    knobs = {"fuse_glu": True, "tma_gemv": True, "lean_attention": True, "tma_fold": True,
             **knobs}
    built, plans_, _, _ = codegen.library_parts(module, {"params": []}, **knobs)
    return built, plans_


@pytest.mark.parametrize("knob", ["tma_fold", "fold_norms"])
def test_each_layer_norm_between_two_tma_gemvs_is_folded(knob):
    """With tma_fold (on at O2) or fold_norms, each add_rms_norm between two TMA GEMVs is
    folded: o_proj (behind the attention) and down (behind the GLU) add the residual and write
    one partial sum of squares a block; the GLU and qkv GEMVs behind them normalize as they
    stage and are released at their producer's start, and qkv still releases the lean
    attention. The norm before the output projection (a GEMV too large for the TMA kernel)
    stays."""
    from mlcc.backends.cuda import norm_fold

    built, plans_ = folded_7b(**{"tma_fold": knob == "tma_fold", knob: True})
    decode = next(p for p in plans_ if p.name == "decode")
    kinds = Counter((c.spec.op, dict(c.spec.attrs).get(gemv_tma.ATTR)) for c in decode.calls)
    assert kinds[(norm_fold.PRODUCER, gemv_tma.BEHIND_LIGHT)] == 32  # o_proj
    assert kinds[(norm_fold.PRODUCER, gemv_tma.BEHIND_GLU)] == 31  # down, but the last
    assert kinds[("q_linear", gemv_tma.BEHIND_GLU)] == 1
    assert kinds[("rms_linear_silu_mul", gemv_tma.BEHIND_FOLD)] == 32
    assert kinds[("rms_q_linear", gemv_tma.BEHIND_FOLD)] == 31
    assert kinds[("add_rms_norm", None)] == 1 and kinds[("rms_norm", None)] == 1
    producers = [c.spec for c in decode.calls if c.spec.op == norm_fold.PRODUCER]
    # one partial sum a block: 128 blocks of 32 features for o_proj and down
    assert {p.outputs[1][0] for p in producers} == {(1, 128)}
    names = codegen.kernel_names(plans_)
    early = codegen.early_release(plans_, built)
    calls = decode.calls
    for here, after in pairwise(calls):
        if after.spec.op in norm_fold.CONSUMERS.values():
            assert here.spec.op == norm_fold.PRODUCER
            assert f"{names[here.spec]}_dev" in early  # released at the producer's start
        if here.spec.op == "rms_q_linear":
            assert after.spec.op == "qkv_attention"
            assert f"{names[here.spec]}_dev" in early  # ... which releases the lean attention
            assert gemv_tma.room_beside(here.spec) == 5536
    source = {k.name: k.device_source for k in built}
    producer = source[names[producers[0]]]
    assert "ssq[blockIdx.x] = part;" in producer and "rsm[f]" in producer
    consumer = source[names[next(c.spec for c in calls if c.spec.op == "rms_q_linear")]]
    assert "first_w" in consumer and "mlcc_chain_copy" in consumer
    # without the TMA GEMV, fold_norms folds between block GEMVs (none marked) and tma_fold
    # folds nothing
    _, plain = folded_7b(tma_gemv=False, tma_fold=False, fold_norms=True)
    decode = next(p for p in plain if p.name == "decode")
    assert not any(gemv_tma.marked(c.spec) for c in decode.calls)
    assert any(c.spec.op == norm_fold.PRODUCER for c in decode.calls)
    _, plain = folded_7b(tma_gemv=False)
    decode = next(p for p in plain if p.name == "decode")
    assert sum(c.spec.op == "add_rms_norm" for c in decode.calls) == 64
    assert parse_opt("O2").enabled("tma_fold") and not parse_opt("O1").enabled("tma_fold")
