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
