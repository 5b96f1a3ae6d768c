"""Passes: structure after each pass, and numerics before vs after through the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import build_tiny_llama, random_params

from mlcc import ir
from mlcc.errors import MlccError
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.quantize import QuantizeWeights, stored_params
from mlcc.quant import get_scheme


def ops_of(module: ir.Module, fn: str = "prefill") -> list[str]:
    return [n.op for n in module.function(fn).nodes]


def stored_arrays(module: ir.Module, params: dict, scheme_name: str) -> dict[str, np.ndarray]:
    """Parameters as convert_weight would store them (quantized by the scheme's own code)."""
    scheme = get_scheme(scheme_name)
    out = {}
    for name, parts in stored_params(module, scheme_name).items():
        p = module.param(name)

        class View:
            pass

        view = View()
        view.name, view.shape, view.kind = name, tuple(p.type.shape), p.annotations["kind"]
        out.update(scheme.convert(view, torch.from_numpy(params[name])))
    return out


def run_sequence(module, params, prompt, decode_tokens, chunk):
    """Feed `prompt` in chunks of `chunk` then decode; return the logits of every step."""
    cache = ir.KVCacheState(module.function("decode").inputs[1].type)
    logits = []
    for start in range(0, len(prompt), chunk):
        piece = np.array(prompt[start:start + chunk], np.int32)
        (out,) = ir.interpret(module, "prefill", [piece, cache], params)
    logits.append(out)
    for token in decode_tokens:
        (out,) = ir.interpret(module, "decode", [np.array([token], np.int32), cache], params)
        logits.append(out)
    return logits


@pytest.mark.parametrize("level", ["O0", "O1", "O2", "O3"])
@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1", "q4f16_1"])
def test_pipeline_preserves_numerics(level, quant, tmp_path):
    module = ir.verify(build_tiny_llama())
    params = random_params(module)
    scheme = get_scheme(quant)
    reference = run_passes(module, [ConvertModelDType(scheme.model_dtype),
                                    QuantizeWeights(quant)]).module
    passes = build_pipeline(parse_opt(level), scheme.model_dtype, quant, prefill_chunk_size=4)
    compiled = run_passes(module, passes, dump_dir=tmp_path / "dump").module
    stored = stored_arrays(module, params, quant)
    prompt, decode = [3, 7, 1, 0, 39, 12, 5, 8, 2], [4, 9, 30]
    ref = run_sequence(reference, stored, prompt, decode, chunk=4)
    got = run_sequence(compiled, stored, prompt, decode, chunk=4)
    tol = 1e-5 if scheme.model_dtype == "float32" else 2e-2
    for step, (a, b) in enumerate(zip(ref, got)):
        np.testing.assert_allclose(b, a, atol=tol, rtol=tol, err_msg=f"step {step}")
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps[0] == "00-input.txt" and dumps[-1].endswith("plan_memory.txt")
    assert len(dumps) == len(passes) + 1


def test_fusions_by_level():
    module = build_tiny_llama()
    o0 = run_passes(module, build_pipeline(parse_opt("O0"), "float32", "q0f32", 4)).module
    o2 = run_passes(module, build_pipeline(parse_opt("O2"), "float32", "q4f32_1", 4)).module
    for m in (o0, o2):
        assert "attention" not in ops_of(m) and "rope" not in ops_of(m)
        assert ops_of(m).count("qkv_attention") == 2
    assert "add_rms_norm" not in ops_of(o0) and ops_of(o2).count("add_rms_norm") == 4
    assert "last_row" in ops_of(o2) and "last_row" not in ops_of(o0)
    assert "linear" not in ops_of(o2) and "embedding" not in ops_of(o2)
    assert ops_of(o2).count("q_linear") == 4 * 2 + 1  # 4 per layer + tied lm_head
    names = [p.name for p in o2.params]
    assert "model.embed_tokens.q_weight" in names and "model.embed_tokens.weight" not in names
    assert dict(o2.attrs["kv_layout"])["page_size"] == 16


def test_opt_knobs():
    assert parse_opt("O0;fuse_add_norm=1").enabled("fuse_add_norm")
    assert not parse_opt("O3;lm_head_last_row=0").enabled("lm_head_last_row")
    with pytest.raises(MlccError, match="not understood"):
        parse_opt("O2;warp_speed=1")


def test_memory_plan_never_overlaps_live_values():
    module = build_tiny_llama()
    m = run_passes(module, build_pipeline(parse_opt("O2"), "float32", "q0f32", 8)).module
    for fn in m.functions:
        plan = dict(fn.attrs["memory_plan"])
        nodes = fn.nodes
        first, last, size = {}, {}, {}
        for i, node in enumerate(nodes):
            for v in node.inputs:
                last[v.name] = i
            for v in node.outputs:
                first[v.name] = i
                if v.name in plan:
                    n = 1
                    for d in v.shape:
                        n *= 8 if isinstance(d, ir.Sym) else d
                    size[v.name] = n * np.dtype(v.dtype).itemsize
        names = list(plan)
        reshapes = {n.output.name: n.inputs[0].name for n in nodes if n.op == "reshape"}
        for a in names:
            for b in names:
                if a >= b or reshapes.get(a) == b or reshapes.get(b) == a:
                    continue
                live = not (last.get(a, first[a]) < first[b] or last.get(b, first[b]) < first[a])
                disjoint = (plan[a] + size[a] <= plan[b]) or (plan[b] + size[b] <= plan[a])
                assert not live or disjoint, f"{fn.name}: {a} and {b} overlap while both live"
        assert fn.attrs["workspace_bytes"] >= max(plan[n] + size[n] for n in names)


def test_sliding_window_ring_layout():
    module = build_tiny_llama(window=8, sinks=2, capacity=10_000)
    m = run_passes(module, build_pipeline(parse_opt("O2"), "float32", "q0f32", 4)).module
    layout = dict(m.attrs["kv_layout"])
    assert layout["ring"] and layout["capacity"] == 16 and layout["sinks"] == 2
