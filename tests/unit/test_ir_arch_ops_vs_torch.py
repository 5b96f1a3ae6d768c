"""The ops that some architectures need (GeGLU, dtype-rounded scaling, MoE routing and
mixing), run through `ir.interpret`, against PyTorch written the way transformers does it.

Each op runs in a one-function module whose inputs have the symbolic dim `n`, bound to several
sizes; float32 must agree to 1e-5, float16 to a few ulps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ir_op_references import SIZES, N, T, assert_close, op_module, rand, run, sized


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(N, 2 * 24), (2, N, 2 * 40)])
def test_gelu_mul_is_geglu(shape, approximate, dtype):
    module = op_module([("x", shape, dtype)],
                       lambda b, x: b.emit("gelu_mul", x, approximate=approximate))
    rng = np.random.default_rng(40)
    for n in SIZES:
        x = rand(rng, sized(shape, n), dtype, 2.0)
        (ours,) = run(module, x)
        gate, up = T(x).float().chunk(2, dim=-1)
        expected = F.gelu(gate, approximate=approximate) * up
        assert_close(ours, expected.to(getattr(torch, dtype)), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("hidden", [2048, 3072, 24])
def test_scale_in_dtype_multiplies_by_the_rounded_constant(hidden, dtype):
    """Gemma: embeddings * torch.tensor(hidden ** 0.5, dtype=model dtype)."""
    factor = hidden ** 0.5
    module = op_module([("x", (N, 16), dtype)],
                       lambda b, x: b.emit("scale_in_dtype", x, factor=factor))
    rng = np.random.default_rng(41)
    for n in SIZES:
        x = rand(rng, (n, 16), dtype)
        (ours,) = run(module, x)
        torch_dtype = getattr(torch, dtype)
        assert_close(ours, T(x) * torch.tensor(factor, dtype=torch_dtype), dtype, rtol=0,
                     atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (5, 3), (4, 1)])
def test_moe_route_is_mixtrals_router(experts, top_k, dtype):
    """transformers' Mixtral: softmax over all logits, top-k, renormalize over the k chosen."""
    module = op_module([("logits", (N, experts), dtype)],
                       lambda b, x: b.emit("moe_route", x, top_k=top_k))
    rng = np.random.default_rng(42)
    for n in SIZES:
        logits = rand(rng, (n, experts), dtype, 3.0)
        (ours,) = run(module, logits)
        probs = torch.softmax(T(logits).float(), dim=-1)
        top, index = torch.topk(probs, top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        assert_close(ours, dense, "float32")
        assert ((ours > 0).sum(-1) == top_k).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_moe_combine_weights_the_experts(dtype):
    experts = 4
    module = op_module([("w", (N, experts), "float32")] + [(f"o{e}", (N, 24), dtype)
                                                          for e in range(experts)],
                       lambda b, w, *outs: b.emit("moe_combine", w, *outs))
    rng = np.random.default_rng(43)
    for n in SIZES:
        weights = np.abs(rand(rng, (n, experts), "float32"))
        weights[:, 1] = 0.0  # an unchosen expert, whose output may be anything
        outs = [rand(rng, (n, 24), dtype, 2.0) for _ in range(experts)]
        outs[1][:] = np.inf
        (ours,) = run(module, weights, *outs)
        expected = sum(T(weights)[:, e:e + 1] * T(outs[e]).float()
                       for e in range(experts) if e != 1)
        assert_close(ours, expected.to(getattr(torch, dtype)), dtype)
