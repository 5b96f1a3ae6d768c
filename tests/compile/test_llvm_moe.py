"""CPU kernels of the sparse mixture of experts against the IR interpreter, and the lowered plan.

Each case builds the dense expert pattern, legalizes it for a quantization mode, runs the
sparse_moe pass, compiles one kernel per node (router, dispatch, grouped linears, activation,
reduction) and runs them in order on router logits full of ties; every intermediate must match
the interpreter's (routing exactly), for top_k = 1, 2 and E, one row (decode: a static row
count) and several (prefill: the symbolic n). The plan of a whole tiny Mixtral must hold no
dense per-expert projection: expert weights are read only by the grouped kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from llvm_cache import TARGET, tensors

from mlcc import ir
from mlcc.backends.llvm.codegen import fallback_rule, parse_functions
from mlcc.backends.plan import KernelSpec, plan_entry
from mlcc.frontend.mixtral import MixtralConfig, build_mixtral
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.passes.moe import SparseMoE
from mlcc.quant import get_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_passes_moe import (
    HIDDEN,
    TINY,
    dense_moe_module,
    legalized,
    stored_params,
    tied_logits,
)

# (quantization, experts, top_k); about 7 s each (one build), the other modes are marked slow
CASES = [("q0f32", 5, 2), ("q0f32", 4, 1), ("q0f32", 4, 4), ("q4f16_1", 5, 2)]
CASES += [pytest.param(*case, marks=pytest.mark.slow)
          for case in [("q0f16", 5, 2), ("q3f16_1", 4, 4), ("q4f32_1", 4, 1)]]


def spec_of(node: ir.Node) -> KernelSpec:
    """The KernelSpec the plan gives this node (every input of these ops is a tensor)."""
    shapes = lambda values: tuple((tuple(v.type.shape), v.type.dtype) for v in values)
    return KernelSpec(node.op, shapes(node.inputs), shapes(node.outputs),
                      tuple(sorted(node.attrs.items())))


def sparse_module(quantization: str, experts: int, top_k: int, rows) -> ir.Module:
    dense = legalized(dense_moe_module(experts, top_k), quantization)
    module = run_passes(dense, [SparseMoE()]).module
    if rows == "n":
        return module
    fn = module.function("f")
    # The same graph with a static row count, as a decode entry has: rebuild it on 1 row.
    sub = {ir.Sym("n"): rows}
    remap: dict[int, ir.Value] = {}

    def fixed(value: ir.Value) -> ir.Value:
        if value.kind == "param":
            return value
        if id(value) not in remap:
            shape = tuple(sub.get(d, d) for d in value.type.shape)
            remap[id(value)] = ir.Value(value.name, ir.TensorType(value.type.dtype, shape),
                                        value.kind)
        return remap[id(value)]

    nodes = [ir.Node(n.op, tuple(map(fixed, n.inputs)), tuple(map(fixed, n.outputs)), n.attrs)
             for n in fn.nodes]
    fn = fn.replace(inputs=tuple(map(fixed, fn.inputs)), nodes=tuple(nodes),
                    outputs=tuple(map(fixed, fn.outputs)))
    return ir.verify(module.with_function(fn))


def run_kernels(module: ir.Module, args: list[np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Compile one kernel per node and run the function's nodes in order."""
    fn = module.function("f")
    names = {id(node): f"k{i}_{node.op}" for i, node in enumerate(fn.nodes)}
    source = "\n\n".join(fallback_rule(spec_of(node), names[id(node)], True) for node in fn.nodes)
    lib = tvm.compile(parse_functions(source), target=TARGET)
    n = args[0].shape[0]
    env = {id(v): tensors(a)[0] for v, a in zip(fn.inputs, args)}
    results = {}
    for node in fn.nodes:
        ins = [tensors(params[v.name])[0] if v.kind == "param" else env[id(v)]
               for v in node.inputs]
        outs = []
        for v in node.outputs:
            shape = tuple(n if isinstance(d, ir.Sym) else d for d in v.type.shape)
            outs.append(tensors(np.full(shape, 7, v.type.dtype))[0])  # junk: must be overwritten
        lib[names[id(node)]](*ins, *outs)
        for v, t in zip(node.outputs, outs):
            env[id(v)] = t
            results[v.name] = t.numpy()
    return results


def interpret_all(module: ir.Module, args: list[np.ndarray], params: dict) -> dict:
    fn = module.function("f")
    values = [v for node in fn.nodes for v in node.outputs]
    probe = module.with_function(fn.replace(outputs=tuple(values)))
    return dict(zip([v.name for v in values], ir.interpret(probe, "f", args, params)))


@pytest.mark.parametrize("rows", ["n", 1])
@pytest.mark.parametrize(("quantization", "experts", "top_k"), CASES)
def test_moe_kernels_equal_the_interpreter(quantization, experts, top_k, rows):
    module = sparse_module(quantization, experts, top_k, rows)
    params = stored_params(dense_moe_module(experts, top_k), quantization, seed=experts + top_k)
    dtype = get_scheme(quantization).model_dtype
    fn, rng = module.function("f"), np.random.default_rng(3)
    for n in ((1, 3, 17) if rows == "n" else (rows,)):
        args = [rng.standard_normal((n, HIDDEN)).astype(dtype),
                tied_logits(rng, n, experts).astype(dtype)]
        got, want = run_kernels(module, args, params), interpret_all(module, args, params)
        for node in fn.nodes:
            for v in node.outputs:
                have, expected = got[v.name], want[v.name]
                if v.type.dtype == "int32":
                    np.testing.assert_array_equal(have, expected, err_msg=f"{node.op} n={n}")
                    continue
                if node.op == "moe_route":  # the same experts; exp() may differ by an ulp
                    np.testing.assert_array_equal(have != 0, expected != 0, err_msg=f"n={n}")
                # float16 results may differ by one float16 step where a float32 sum straddles
                # a rounding boundary (LLVM contracts products into FMAs).
                scale = float(np.abs(expected).max()) + 1e-6
                tol = 2e-5 if dtype == "float32" else 2 ** -9
                np.testing.assert_allclose(have.astype(np.float32), expected.astype(np.float32),
                                           rtol=0, atol=tol * scale,
                                           err_msg=f"{node.op} {v.name} n={n}")


@pytest.mark.parametrize("quantization", ["q0f32", "q4f16_1"])
def test_mixtral_plan_reads_experts_only_in_grouped_kernels(quantization):
    config = MixtralConfig.from_hf(TINY)
    scheme = get_scheme(quantization)
    passes = build_pipeline(parse_opt("O2"), scheme.model_dtype, quantization, 4)
    module = run_passes(build_mixtral(config), passes).module
    grouped = "q_moe_linear" if quantization != "q0f32" else "moe_linear"
    for fn in module.functions:
        plan = plan_entry(fn, module)
        ops = [call.spec.op for call in plan.calls]
        assert ops.count(grouped) == 2 * config.num_hidden_layers, fn.name
        assert "moe_combine" not in ops
        for call in plan.calls:
            experts = [b.name for b in call.buffers if ".experts." in b.name]
            if call.spec.op == grouped:
                # one weight (two stored parts when quantized) per expert, all in one call
                per_expert = 2 if grouped == "q_moe_linear" else 1
                assert len(experts) == per_expert * config.num_local_experts
            else:
                assert not experts, f"{fn.name}: {call.spec.op} reads {experts[:2]}"
        for call in plan.calls:
            if call.spec.op in ("linear", "q_linear"):
                # what remains dense: attention projections, the router, the output head
                assert call.spec.outputs[0][0][-1] in (
                    config.num_local_experts, config.vocab_size, config.hidden_size,
                    (config.num_attention_heads + 2 * config.num_key_value_heads)
                    * config.head_dim), call.spec
