"""The scheme registry: names, which parameters are quantized, and the stored-tensor contract."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mlcc.errors import MlccError
from mlcc.quant import SCHEMES, get_scheme


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    kind: str


PARAMS = [
    Param("model.embed_tokens.weight", (50, 72), "embedding"),
    Param("model.layers.0.self_attn.qkv_proj.weight", (96, 72), "linear"),
    Param("model.layers.0.mlp.down_proj.weight", (72, 172), "linear"),
    Param("model.layers.0.self_attn.qkv_proj.bias", (96,), "bias"),
    Param("model.norm.weight", (72,), "norm"),
    Param("lm_head.weight", (50, 72), "linear"),
]


def test_registry_holds_the_documented_schemes() -> None:
    expected = {
        "q0f16": ("none", 0, 0, "float16"), "q0f32": ("none", 0, 0, "float32"),
        "q3f16_1": ("group", 3, 40, "float16"), "q4f16_1": ("group", 4, 32, "float16"),
        "q4f32_1": ("group", 4, 32, "float32"), "q8f16_1": ("group", 8, 32, "float16"),
        "q4f16_awq": ("awq", 4, 128, "float16"),
    }
    got = {n: (s.kind, s.bits, s.group_size, s.model_dtype) for n, s in SCHEMES.items()}
    assert got == expected
    assert all(s.storage_dtype == "uint32" for s in SCHEMES.values())


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(MlccError, match=r"^\[quantization\] unknown quantization 'q5f16_1'; "
                                        r"known: q0f16, q0f32, q3f16_1"):
        get_scheme("q5f16_1")


@pytest.mark.parametrize("name", ["q0f16", "q0f32", "q3f16_1", "q4f16_1", "q4f32_1", "q8f16_1"])
def test_convert_writes_exactly_the_stored_tensors(name: str) -> None:
    scheme = get_scheme(name)
    gen = torch.Generator().manual_seed(0)
    for param in PARAMS:
        arrays = scheme.convert(param, torch.randn(param.shape, generator=gen))
        layout = scheme.stored_tensors(param)
        assert [(t.name, t.shape, t.dtype) for t in layout] == [
            (n, a.shape, a.dtype.name) for n, a in arrays.items()]
        quantized = scheme.kind == "group" and param.kind in ("linear", "embedding")
        assert scheme.applies_to(param) == quantized
        if quantized:
            stem = param.name.removesuffix(".weight")
            assert list(arrays) == [f"{stem}.q_weight", f"{stem}.q_scale"]
        else:
            assert list(arrays) == [param.name]


def test_unquantized_parameters_are_cast_to_model_dtype() -> None:
    norm = PARAMS[4]
    w = torch.randn(norm.shape, dtype=torch.float32)
    out16 = get_scheme("q4f16_1").convert(norm, w)[norm.name]
    np.testing.assert_array_equal(out16, w.numpy().astype(np.float16))
    out32 = get_scheme("q0f32").convert(norm, w.to(torch.bfloat16))[norm.name]
    np.testing.assert_array_equal(out32, w.to(torch.bfloat16).float().numpy())


def test_float16_overflow_of_an_unquantized_parameter_is_refused() -> None:
    with pytest.raises(MlccError, match=r"\[convert_weight\] model.norm.weight: max \|w\| = "
                                        r"70000 overflows float16 .* use a float32 scheme"):
        get_scheme("q0f16").convert(PARAMS[4], torch.full((72,), 7e4))


def test_stored_names_strip_weight_suffix_only() -> None:
    scheme = get_scheme("q4f16_1")
    assert scheme.stored_names("lm_head.weight") == {"q_weight": "lm_head.q_weight",
                                                     "q_scale": "lm_head.q_scale"}
    assert scheme.stored_names("transformer.wte") == {"q_weight": "transformer.wte.q_weight",
                                                      "q_scale": "transformer.wte.q_scale"}
