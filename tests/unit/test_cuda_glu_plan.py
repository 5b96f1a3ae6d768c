"""Where the CUDA backend folds silu_mul into the gate_up GEMM or GEMV (mlcc.backends.cuda.glu).

On the Llama-2-7B plans the fusion replaces each layer's (gate_up, silu_mul) pair in prefill
(the tensor-core GEMM's GLU mode) and in decode (the persistent GEMV's GLU mode, launched from
the tuning database's gate_up record); the fused call reads the linear's inputs and writes what
the down projection reads. It declines when another call reads the gate_up values, for float32
activations and values, odd gate_up widths, float16 weights at decode rows, where the
tensor-core GEMV would run the gate_up and for batch_decode rows, and the `fuse_glu_gemm` knob
reaches the CUDA builder. The tiny models the GPU parity tests build (tests/gpu/cuda_cases.py)
fuse too, so the fused kernels run there. The GLU expression is the silu_mul kernels' text.
Kernel text is generated (no TVM build).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from mlcc.backends.cuda import codegen, gemm, gemv, gemv_tc, glu, kernels, tuning
from mlcc.backends.cuda.glu import OP, fuse_glu, linear_spec
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import (
    BufferRef,
    EntryPlan,
    KernelCall,
    KernelSpec,
    plan_entry,
    workspace_range,
    writes_over_inputs,
)
from mlcc.interface.compile import load_model_config, parse_overrides
from mlcc.ir.types import Sym
from mlcc.passes import build_pipeline, layout, parse_opt, run_passes
from mlcc.quant import get_scheme

TESTS = Path(__file__).resolve().parents[1]
STORIES = TESTS.parent.parent / "shared" / "models" / "stories260K"


def lowered(model, quantization: str, overrides: str | None = None):
    arch, config, quant, _ = load_model_config(model, quantization, None)
    if overrides:
        config = config.with_overrides(**parse_overrides(overrides))
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    return run_passes(arch.build_module(config), passes).module


def plans(module) -> dict[str, EntryPlan]:
    return {fn.name: plan_entry(fn, module) for fn in module.functions}


def ops(plan: EntryPlan) -> list[str]:
    return [c.spec.op for c in plan.calls]


@pytest.mark.parametrize("entry,rows", [("prefill", Sym("seq_len")), ("decode", 1)])
def test_one_fused_call_per_layer_in_prefill_and_decode(llama7b, entry, rows):
    before = plans(llama7b)[entry]
    after = fuse_glu(before)
    assert ops(after).count(OP) == 32 and "silu_mul" not in ops(after)
    assert len(after.calls) == len(before.calls) - 32
    old = before.calls
    for i, call in enumerate(c for c in old if c.spec.op == "silu_mul"):
        at = old.index(call)
        gate_up, fused = old[at - 1], [c for c in after.calls if c.spec.op == OP][i]
        assert fused.buffers == gate_up.buffers[:3] + [call.buffers[1]]
        assert fused.spec.inputs == gate_up.spec.inputs
        assert fused.spec.outputs == call.spec.outputs == (((rows, 11008), "float16"),)
        assert dict(fused.spec.attrs)["glu_weights"] == "q4"
        assert linear_spec(fused.spec) == gate_up.spec  # the linear it runs is the unfused one
        assert "layers" in gate_up.buffers[1].name and "gate_up_proj" in gate_up.buffers[1].name
    # everything else is the unfused plan, in order
    kept = [c for c in old if c.spec.op != "silu_mul" and c not in
            [old[old.index(s) - 1] for s in old if s.spec.op == "silu_mul"]]
    assert [c for c in after.calls if c.spec.op != OP] == kept


@pytest.mark.parametrize("entry", ["prefill", "decode"])
def test_fused_call_never_writes_over_what_it_reads(llama7b, entry):
    # The memory plan keeps a gate_up's input alive through its silu_mul, so the GLU kernel's
    # output (silu_mul's) never lands on the activations it is still reading. Before, the 7B
    # plans put both at one offset and the fused kernels raced with themselves on the H200
    # (benchmarks/results/2026-11-29-h200-f).
    plan = plans(llama7b)[entry]
    bounds = dict(plan.bounds)
    assert bounds.get("seq_len", 0) > 1
    fused = [c for c in fuse_glu(plan).calls if c.spec.op == OP]
    assert len(fused) == 32
    for call in fused:
        x, h = (workspace_range(b, bounds) for b in (call.buffers[0], call.buffers[-1]))
        assert x[1] <= h[0] or h[1] <= x[0], (call.buffers[0], call.buffers[-1])
        assert not writes_over_inputs(call, bounds)


def test_fusion_declines_a_plan_that_shares_input_and_output(monkeypatch, llama7b):
    # Planned as two kernels (no pair rule), silu_mul's output takes its gate_up's input bytes;
    # the fusion must then leave the pair as two calls rather than build a racing kernel.
    monkeypatch.setattr(layout, "FUSABLE_PAIRS", frozenset())
    bounds = dict(llama7b.attrs["symbol_bounds"])
    module = llama7b
    for fn in llama7b.functions:
        module = module.with_function(layout.plan_function(fn, bounds))
    for entry in ("prefill", "decode"):
        plan = plans(module)[entry]
        pairs = [(a, b) for a, b in zip(plan.calls, plan.calls[1:]) if b.spec.op == "silu_mul"]
        shared = [a for a, b in pairs
                  if writes_over_inputs(KernelCall(a.spec, a.buffers[:3] + [b.buffers[-1]]),
                                        bounds)]
        assert shared, f"{entry}: the two-kernel plan no longer overlaps; the test lost its case"
        after = fuse_glu(plan)
        assert ops(after).count("silu_mul") == len(shared)
        assert not any(writes_over_inputs(c, bounds) for c in after.calls if c.spec.op == OP)


def test_library_parts_fuses_only_with_the_flag(llama7b):
    _, off, _, _ = codegen.library_parts(llama7b, {"params": []})
    built, on, _, _ = codegen.library_parts(llama7b, {"params": []}, fuse_glu=True)
    assert all(OP not in ops(p) for p in off)
    assert {p.name: ops(p).count(OP) for p in on} == {"prefill": 32, "decode": 32}
    fused = {("seq_len" in k.launcher): k for k in built if k.name.endswith(OP)}
    assert len(fused) == 2
    assert "mma.sync" in fused[True].device_source and "(seq_len, 11008)" in fused[True].launcher
    decode = fused[False]
    assert "xs_rows" in decode.device_source and "(1, 11008)" in decode.launcher
    assert "mma.sync" not in decode.device_source


def test_knob_reaches_the_cuda_builder(monkeypatch, llama7b):
    from mlcc.backends import build_model_library

    seen = []
    monkeypatch.setattr(codegen, "build",
                        lambda *args, **kwargs: seen.append(kwargs["fuse_glu"]) or {})
    for opt in ("O2", "O1", "O0", "O2;fuse_glu_gemm=0", "O0;fuse_glu_gemm=1", None):
        build_model_library(llama7b, Path("x.so"), {}, device="cuda",
                            opt=None if opt is None else parse_opt(opt))
    assert seen == [True, True, False, False, True, True]


def test_no_fusion_when_another_call_reads_the_gate_up_values(llama7b):
    prefill = plans(llama7b)["prefill"]
    calls = list(prefill.calls)
    at = next(i for i, c in enumerate(calls) if c.spec.op == "silu_mul")
    gate_up = calls[at - 1].buffers[3]
    copy = dataclasses.replace(gate_up, name="copy")
    reader = KernelCall(KernelSpec("scale", ((gate_up.shape, "float16"),),
                                   ((gate_up.shape, "float16"),), (("factor", 2.0),)),
                        [gate_up, copy])
    calls.insert(at + 5, reader)
    fused = fuse_glu(dataclasses.replace(prefill, calls=calls))
    assert ops(fused).count(OP) == 31
    kept = fused.calls.index(next(c for c in fused.calls if c.spec.op == "silu_mul"))
    assert fused.calls[kept - 1].spec.op == "q_linear"
    assert fused.calls[kept - 1].buffers[3] == gate_up


def gate_up_pair(rows, dtype: str = "float16") -> list[KernelCall]:
    spec = KernelSpec("q_linear", (((rows, 256), dtype), ((512, 32), "uint32"),
                                   ((512, 8), "float16")), (((rows, 512), dtype),),
                      (("bits", 4), ("group_size", 32), ("in_features", 256)))
    refs = [BufferRef("x", (rows, 256), dtype, "workspace"),
            BufferRef("w.q_weight", (512, 32), "uint32", "arg", "w.q_weight"),
            BufferRef("w.q_scale", (512, 8), "float16", "arg", "w.q_scale"),
            BufferRef("gu", (rows, 512), dtype, "workspace", offset=1 << 20),
            BufferRef("h", (rows, 256), dtype, "workspace", offset=2 << 20)]
    silu = KernelSpec("silu_mul", (((rows, 512), dtype),), (((rows, 256), dtype),), ())
    return [KernelCall(spec, refs[:4]), KernelCall(silu, refs[3:])]


@pytest.mark.parametrize("rows,dtype,fuses", [
    (Sym("seq_len"), "float16", True),
    (Sym("seq_len"), "float32", False),  # the tensor-core GEMM takes float16 activations only
    (Sym("batch"), "float16", False),  # batch_decode: the tensor-core GEMV's rows
    (1, "float16", True),  # decode: the persistent GEMV's GLU mode
    (4, "float16", True),
    (1, "float32", False),
    (64, "float16", True),  # a static prefill chunk still runs on the GEMM
])
def test_fuses_exactly_the_calls_a_glu_mode_takes(rows, dtype, fuses):
    # bounds as plan_entry records them: the views' bytes at the largest row counts
    plan = EntryPlan("prefill", [], gate_up_pair(rows, dtype),
                     bounds=(("batch", 8), ("seq_len", 8)))
    assert ops(fuse_glu(plan)) == ([OP] if fuses else ["q_linear", "silu_mul"])
    # without a bound the views may overlap: the pair stays two kernels
    unbounded = EntryPlan("prefill", [], gate_up_pair(rows, dtype))
    assert ops(fuse_glu(unbounded)) == ([OP] if fuses and isinstance(rows, int)
                                        else ["q_linear", "silu_mul"])


def test_float32_models_keep_silu_mul():
    for plan in plans(lowered(STORIES, "q0f32")).values():
        assert OP not in ops(fuse_glu(plan))
    assert ops(fuse_glu(plans(lowered(STORIES, "q4f16_1"))["prefill"])).count(OP) == 5


def tiny_config(folder: Path, name: str) -> Path:
    """config.json of a tests/gpu/cuda_cases.py model (the sizes that matter to the GEMM)."""
    sys.path.insert(0, str(TESTS / "gpu"))
    try:
        from cuda_cases import TINY, WIDE
    finally:
        sys.path.remove(str(TESTS / "gpu"))
    arch = "mistral" if name.startswith("mistral") else "llama"
    config = {**TINY, **(WIDE if name.endswith("64") else {"num_key_value_heads": 2})}
    if arch == "mistral":
        config["sliding_window"] = 40 if name.endswith("64") else 8
    config.update(model_type=arch, architectures=[f"{arch.capitalize()}ForCausalLM"])
    (folder / name).mkdir()
    (folder / name / "config.json").write_text(json.dumps(config))
    return folder / name


@pytest.mark.parametrize("name", ["llama", "mistral", "llama64", "mistral64"])
def test_gpu_parity_models_run_the_fused_kernel(tmp_path, name):
    model = tiny_config(tmp_path, name)
    for quantization in ("q0f16", "q4f16_1"):
        module = lowered(model, quantization, "prefill_chunk_size=4")
        counts = {n: ops(fuse_glu(p)).count(OP) for n, p in plans(module).items()}
        # decode fuses on the q4 GEMV only (float16 weights keep the plain GEMV and silu_mul)
        expected = {"prefill": 2, "decode": 2 if quantization == "q4f16_1" else 0}
        assert counts == expected, (quantization, counts)


def decode_pair(n: int = 512, k: int = 256, rows: int = 1, ydt: str = "float16",
                weights: str = "q4") -> list[KernelCall]:
    """(gate_up, silu_mul) at decode rows: q_linear of n x k, or a float16 linear."""
    x = BufferRef("x", (rows, k), "float16", "workspace")
    gu = BufferRef("gu", (rows, n), ydt, "workspace", offset=4096)
    h = BufferRef("h", (rows, n // 2), ydt, "workspace", offset=8192)
    if weights == "q4":
        spec = KernelSpec("q_linear", (((rows, k), "float16"), ((n, k // 8), "uint32"),
                                       ((n, k // 32), "float16")), (((rows, n), ydt),),
                          (("bits", 4), ("group_size", 32), ("in_features", k)))
        refs = [x, BufferRef("w.q_weight", (n, k // 8), "uint32", "arg", "w.q_weight"),
                BufferRef("w.q_scale", (n, k // 32), "float16", "arg", "w.q_scale"), gu]
    else:
        spec = KernelSpec("linear", (((rows, k), "float16"), ((n, k), "float16")),
                          (((rows, n), ydt),), ())
        refs = [x, BufferRef("w", (n, k), "float16", "arg", "w"), gu]
    silu = KernelSpec("silu_mul", (((rows, n), ydt),), (((rows, n // 2), ydt),), ())
    return [KernelCall(spec, refs), KernelCall(silu, [gu, h])]


@pytest.mark.parametrize("pair,fuses", [
    (decode_pair(), True),
    (decode_pair(n=514), True),  # I = 257: the GEMV pairs any I
    (decode_pair(n=513), False),  # no whole (gate, up) split
    (decode_pair(ydt="float32"), False),  # float32 gate_up values
    (decode_pair(weights="f16"), False),  # float16 weights: the plain GEMV has no GLU mode
    (decode_pair(k=48), False),  # K not whole groups of 32: no q4 GEMV
])
def test_decode_fusion_follows_the_q4_gemv(pair, fuses):
    plan = EntryPlan("decode", [], pair)
    assert ops(fuse_glu(plan)) == ([OP] if fuses else [c.spec.op for c in pair])


def test_decode_fusion_leaves_the_tensor_core_gemv_its_shapes(monkeypatch):
    plan = EntryPlan("decode", [], decode_pair(rows=4))
    assert ops(fuse_glu(plan)) == [OP]
    # where the database measured the tensor-core GEMV fastest it keeps the gate_up
    monkeypatch.setattr(gemv_tc, "gemv_q4_tc_rule", lambda spec, name: object())
    assert ops(fuse_glu(plan)) == ["q_linear", "silu_mul"]


def test_glu_expression_is_the_silu_mul_kernels():
    text = glu.SILU_MUL.format(g="g", u="u")
    for width in (64, 60):  # the vectorized kernel and the scalar one
        spec = KernelSpec("silu_mul", (((1, 2 * width), "float16"),),
                          (((1, width), "float16"),), ())
        assert text in kernels.gen_elementwise(spec, "s").device_source, width
    s = LinearShape(decode_pair(n=512, rows=Sym("seq_len"))[0].spec)
    prefill = gemm.gemm_tc_kernel(s, "g", gemm.choose_tile(s, True), glu=True).device_source
    assert glu.SILU_MUL.format(g="gv.x", u="uv.x") in prefill


FAKE_DB = {"best": {f"{2 * i},4096": {"kind": "persistent", "blocks_per_sm": 3, "warps": 8,
                                      "rows_per_warp": rpw, "rotate": False, "pingpong": True,
                                      "dot": "mlcc_q4_dot8_lop3"}
                    for i, rpw in ((64, 1), (128, 2), (192, 3), (256, 4))}}


# (I, output features per tile, blocks per SM): a record of one row per tile gives a tile of
# one pair (two rows) and two thirds of the blocks; two rows keep their launch; three rows give
# one pair; four rows two pairs; the unmeasured shape halves the heuristic's two blocks
@pytest.mark.parametrize("i,pairs,blocks", [(64, 1, 2), (128, 1, 3), (192, 1, 3), (256, 2, 3),
                                            (320, 1, 1)])
def test_decode_launch_comes_from_the_gate_up_record(monkeypatch, i, pairs, blocks):
    monkeypatch.setattr(tuning, "_database", lambda: FAKE_DB)
    config = glu.glu_gemv_config(2 * i, 4096)
    assert (config.rows_per_warp, config.blocks_per_sm) == (pairs, blocks)
    if i == 320:  # not measured: the persistent heuristic's other settings
        assert config.warps == tuning.PersistentConfig().warps
    else:
        assert (config.warps, config.rotate, config.pingpong,
                config.dot) == (8, False, True, "mlcc_q4_dot8_lop3")
    call = fuse_glu(EntryPlan("decode", [], decode_pair(n=2 * i, k=4096))).calls[0]
    kernel = glu.gen_linear_silu_mul(call.spec, "d")
    source = kernel.device_source
    # a tile loads `pairs` gate rows and their up rows; ceil(I / pairs) tiles
    assert f"uint4 wa[{2 * pairs}][4], wb[{2 * pairs}][4];" in source
    assert f"while (tile < {-(-i // pairs)})" in source
    assert f"(fq < {i} ? fq : {i - 1}LL) + (q < {pairs} ? 0LL : {i}LL)" in source
    assert f"{config.dot}(v.x" in source
    assert ("if (tile >=" in source) == config.pingpong  # the buffers used in turn
    grid = gemv.persistent_grid(2 * i, 2 * pairs, config.blocks_per_sm, config.warps)
    assert f"T.int64({grid})" in kernel.launcher and f"(1, {i})" in kernel.launcher
