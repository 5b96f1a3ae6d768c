"""Gemma: the real Gemma-2B config, the preset's parameter count, and parity with transformers.

The tiny model keeps Gemma-2B's structure: one KV head (multi-query), a head_dim stated apart
from hidden_size / heads (tiny: 32 with hidden 48 and 4 heads), GeGLU with the tanh GELU, the
embedding scaled by sqrt(hidden) (sqrt(48) is irrational, so its rounding shows), RMSNorm by
(1 + weight), tied lm_head; plus an untied variant with GQA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from arch_parity import assert_reference_matches_transformers, randomize, save_tiny

from mlcc import ir
from mlcc.errors import MlccError
from mlcc.frontend import resolve_model

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"
TINY = {"vocab_size": 113, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 80,
        "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh"}
CASES = {
    "gemma_2b_shape": {},
    "untied_gqa": {"tie_word_embeddings": False, "num_key_value_heads": 2},
}
GEMMA_2B = 2_506_172_416  # published parameter count


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gemma_matches_transformers(tmp_path: Path, case: str) -> None:
    config = transformers.GemmaConfig(**{**TINY, **CASES[case]})
    model = randomize(transformers.GemmaForCausalLM(config), seed=sum(map(ord, case)))
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))


def test_embedding_scale_is_rounded_to_the_model_dtype() -> None:
    """float16 models multiply by sqrt(2048) as a float16 constant (45.25), as transformers."""
    config = resolve_model("gemma_2b").config.with_overrides(num_hidden_layers=1)
    module = resolve_model("gemma_2b").arch.build_module(config)
    scale = next(n for n in module.function("decode").nodes if n.op == "scale_in_dtype")
    assert scale.attrs["factor"] == math.sqrt(2048)
    rows = np.array([[1.0, -3.0, 7.0]], np.float16)
    mb = ir.ModuleBuilder("m")
    with mb.function("f") as b:
        b.output(b.emit("scale_in_dtype", b.input("x", (1, 3), "float16"),
                        factor=math.sqrt(2048)))
    (got,) = ir.interpret(mb.finish(), "f", [rows], {})
    np.testing.assert_array_equal(got, (rows.astype(np.float32) * 45.25).astype(np.float16))


def test_preset_reads_gemma_2b() -> None:
    source = resolve_model("gemma_2b")
    config, mapping = source.config, source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == GEMMA_2B
    got = (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings,
           config.gelu_approximate, config.bos_token_id, config.eos_token_id)
    assert got == (256, 1, True, "tanh", 2, 1)
    assert mapping.is_unused("lm_head.weight")
    assert mapping.param("model.layers.17.self_attn.qkv_proj.weight").shape == (2560, 2048)
    assert resolve_model(SHARED / "configs" / "google--gemma-2b").config == config


def _gemma(**changes) -> dict:
    path = SHARED / "configs" / "google--gemma-2b" / "config.json"
    return {**json.loads(path.read_text()), **changes}


def test_activation_names() -> None:
    arch = resolve_model("gemma_2b").arch
    assert arch.config_cls.from_hf(_gemma(hidden_activation="gelu")).gelu_approximate == "none"
    assert arch.config_cls.from_hf(_gemma(hidden_act="gelu_new")).gelu_approximate == "tanh"
    with pytest.raises(MlccError, match=r"hidden_act='silu' is not supported for gemma"):
        arch.config_cls.from_hf(_gemma(hidden_act="silu"))
