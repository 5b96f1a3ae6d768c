"""The sparse_moe pass: the dense expert pattern becomes dispatch / grouped linears / reduce.

The dense formulation (every expert over every row, `moe_combine` skipping weights of 0) is the
reference: the rewritten module runs through the interpreter on the same inputs and must give
the same numbers, with router logits full of ties (integers in a small range), for top_k = 1,
2 and E, in float32, float16 and the group-quantized modes. The pass also must leave patterns
it cannot prove equal alone, and reach a whole Mixtral model at every optimization level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcc import ir
from mlcc.frontend.mixtral import MixtralConfig, build_mixtral
from mlcc.ir import Sym
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.moe import SparseMoE
from mlcc.passes.quantize import QuantizeWeights
from mlcc.quant import get_scheme

N = Sym("n")
HIDDEN, INTER = 40, 24  # q4 pads K = 40 and 24 to its groups of 32, q3 pads 24 to 40
ROUTINGS = [(5, 2), (4, 1), (4, 4), (6, 3)]


def dense_moe_module(experts: int, top_k: int, bias: bool = False) -> ir.Module:
    """x, router logits -> moe_route -> E dense SwiGLU experts -> moe_combine."""
    mb = ir.ModuleBuilder("moe")
    gate_up = [mb.add_param(f"e{e}.gate_up_proj.weight", (2 * INTER, HIDDEN), "float32",
                            kind="linear") for e in range(experts)]
    down = [mb.add_param(f"e{e}.down_proj.weight", (HIDDEN, INTER), "float32", kind="linear")
            for e in range(experts)]
    b_down = mb.add_param("down_bias", (HIDDEN,), "float32", kind="bias") if bias else None
    with mb.function("f") as b:
        x = b.input("x", (N, HIDDEN), "float32")
        logits = b.input("logits", (N, experts), "float32")
        weights = b.emit("moe_route", logits, top_k=top_k)
        outs = []
        for e in range(experts):
            act = b.silu_mul(b.linear(x, gate_up[e]))
            outs.append(b.emit("linear", act, down[e], b_down) if bias and e == 0
                        else b.linear(act, down[e]))
        b.output(b.emit("moe_combine", weights, *outs))
    return ir.verify(mb.finish())


def legalized(module: ir.Module, quantization: str) -> ir.Module:
    scheme = get_scheme(quantization)
    passes = [ConvertModelDType(scheme.model_dtype), QuantizeWeights(quantization)]
    return run_passes(module, passes).module


def stored_params(module: ir.Module, quantization: str, seed: int) -> dict[str, np.ndarray]:
    """Random float weights of `module` (before legalization), stored as convert_weight does."""
    scheme, rng = get_scheme(quantization), np.random.default_rng(seed)
    arrays = {}
    for p in module.params:
        w = torch.from_numpy(rng.standard_normal(p.type.shape).astype(np.float32) * 0.3)
        arrays.update(scheme.convert(_ParamView(p), w))
    return arrays


class _ParamView:
    def __init__(self, p: ir.Param) -> None:
        self.name, self.shape, self.kind = p.name, tuple(p.type.shape), p.annotations["kind"]


def tied_logits(rng: np.random.Generator, n: int, experts: int) -> np.ndarray:
    """Integers in [-1, 1]: most rows hold ties, some rows are all equal."""
    logits = rng.integers(-1, 2, (n, experts)).astype(np.float32)
    logits[0] = 0.0
    return logits


def ops_of(module: ir.Module) -> list[str]:
    return [node.op for node in module.function("f").nodes]


@pytest.mark.parametrize("quantization", ["q0f32", "q0f16", "q4f16_1", "q3f16_1", "q4f32_1"])
@pytest.mark.parametrize(("experts", "top_k"), ROUTINGS)
def test_sparse_moe_equals_the_dense_experts(experts, top_k, quantization):
    source = dense_moe_module(experts, top_k)
    dense = legalized(source, quantization)
    sparse = run_passes(dense, [SparseMoE()]).module
    linear = "q_moe_linear" if quantization[1] != "0" else "moe_linear"
    assert ops_of(sparse) == ["moe_route", "moe_dispatch", linear, "silu_mul", linear,
                              "moe_reduce"]
    params = stored_params(source, quantization, seed=experts * 10 + top_k)
    dtype = get_scheme(quantization).model_dtype
    rng = np.random.default_rng(7)
    for n in (1, 3, 17):
        x = rng.standard_normal((n, HIDDEN)).astype(dtype)
        logits = tied_logits(rng, n, experts).astype(dtype)  # inputs take the model dtype
        (want,) = ir.interpret(dense, "f", [x, logits], params)
        (have,) = ir.interpret(sparse, "f", [x, logits], params)
        assert have.dtype == want.dtype == np.dtype(dtype)
        # float32: the same sums over fewer rows (BLAS may block them differently); float16:
        # the same roundings, so at most one float16 step where a float32 sum straddles one.
        tol = 1e-6 if dtype == "float32" else float(np.abs(want).max()) * 2**-10
        np.testing.assert_allclose(have.astype(np.float32), want.astype(np.float32),
                                   rtol=1e-5 if dtype == "float32" else 0, atol=tol)


def test_every_chosen_expert_gets_one_slot_per_row():
    """Ties pick the lower expert, as moe_route does; top_k = E uses every slot."""
    experts = 4
    for top_k in (1, 2, experts):
        module = run_passes(dense_moe_module(experts, top_k), [SparseMoE()]).module
        fn = module.function("f")
        at = next(i for i, node in enumerate(fn.nodes) if node.op == "moe_dispatch")
        probe = module.with_function(fn.replace(nodes=fn.nodes[:at + 1],
                                                outputs=fn.nodes[at].outputs))
        logits = np.array([[1, 1, 1, 1], [0, 2, 2, 0], [3, -1, 3, 3]], np.float32)
        x = np.zeros((3, HIDDEN), np.float32)
        slot_rows, offsets, row_slots = ir.interpret(probe, "f", [x, logits], {})
        chosen = {1: [[0], [1], [0]], 2: [[0, 1], [1, 2], [0, 2]],
                  experts: [[0, 1, 2, 3]] * 3}[top_k]
        for row, experts_of_row in enumerate(chosen):
            for j, e in enumerate(experts_of_row):
                slot = row_slots[row, j]
                assert offsets[e] <= slot < offsets[e + 1]
                assert slot_rows.reshape(-1)[slot] == row
        assert offsets[-1] == 3 * top_k


def test_patterns_that_differ_are_left_dense():
    with_bias = run_passes(dense_moe_module(3, 2, bias=True), [SparseMoE()]).module
    assert "moe_combine" in ops_of(with_bias) and "moe_dispatch" not in ops_of(with_bias)


def test_printed_ir_after_the_pass():
    sparse = run_passes(dense_moe_module(2, 1), [SparseMoE()]).module
    text = ir.print_module(sparse)
    assert "moe_dispatch(%" in text and "top_k=1" in text
    assert "f32[n, 1, 48]" in text and "f32[n, 1, 24]" in text and "f32[n, 1, 40]" in text
    assert text.count("@e0.gate_up_proj.weight, @e1.gate_up_proj.weight") == 1


TINY = {"model_type": "mixtral", "vocab_size": 103, "hidden_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 40,
        "max_position_embeddings": 64, "num_local_experts": 5, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "prefill_chunk_size": 4}


@pytest.mark.parametrize("opt", ["O0", "O2"])
@pytest.mark.parametrize("quantization", ["q0f32", "q4f16_1"])
def test_pipeline_leaves_no_dense_expert(opt, quantization):
    config = MixtralConfig.from_hf(TINY)
    module = build_mixtral(config)
    scheme = get_scheme(quantization)
    passes = build_pipeline(parse_opt(opt), scheme.model_dtype, quantization, 4)
    lowered = run_passes(module, passes).module
    for fn in lowered.functions:
        ops = [node.op for node in fn.nodes]
        assert "moe_combine" not in ops and ops.count("moe_dispatch") == 2, fn.name
        experts_read = [v.name for node in fn.nodes if node.op in ("linear", "q_linear")
                        for v in node.inputs if ".experts." in v.name]
        assert not experts_read, f"{fn.name}: dense expert projections {experts_read[:2]}"
