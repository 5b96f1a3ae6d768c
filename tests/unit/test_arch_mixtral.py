"""Mixtral: the real config, the preset's parameter count, quantization that spares the router,
and parity with transformers.

The tiny models keep Mixtral 8x7B's structure at small, odd sizes: GQA (6 query heads, 2 KV
heads), a sparse MoE MLP with 5 experts of which each token uses 2 (and a variant with 3 of 4
experts under a sliding window of 8 that the 17 tokens exceed). Every parameter, the router
included, is random, so tokens take different experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from arch_parity import assert_reference_matches_transformers, randomize, save_tiny, token_ids

from mlcc import ir
from mlcc.errors import MlccError
from mlcc.frontend import resolve_model
from mlcc.passes.quantize import stored_params

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"
TINY = {"vocab_size": 103, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "intermediate_size": 40, "max_position_embeddings": 64,
        "num_local_experts": 5, "num_experts_per_tok": 2, "rope_theta": 1e6}
CASES = {
    "mixtral_8x7b_shape": {},
    "top3_of_4_window_8": {"num_local_experts": 4, "num_experts_per_tok": 3,
                           "sliding_window": 8},
}
MIXTRAL_8X7B = 46_702_792_704  # published parameter count


def tiny_model(case: str):
    config = transformers.MixtralConfig(**{**TINY, **CASES[case]})
    return randomize(transformers.MixtralForCausalLM(config), seed=sum(map(ord, case)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_mixtral_matches_transformers(tmp_path: Path, case: str) -> None:
    model = tiny_model(case)
    assert_reference_matches_transformers(model, save_tiny(model, tmp_path))


def test_tokens_take_different_experts(tmp_path: Path) -> None:
    """The routing really varies, so the parity above covers selection, not one fixed pair."""
    from mlcc.runtime_check.reference import ReferenceModel

    model = tiny_model("mixtral_8x7b_shape")
    ours = ReferenceModel(save_tiny(model, tmp_path))
    fn = ours.module.function("prefill")
    route = next(n for n in fn.nodes if n.op == "moe_route")  # layer 0's router
    probe = ours.module.with_function(fn.replace(outputs=(route.output,)))
    ids = np.array(token_ids(TINY["vocab_size"], 12), np.int32)
    (weights,) = ir.interpret(probe, "prefill", [ids, ir.KVCacheState(fn.inputs[1].type)],
                              ours.params)
    chosen = {tuple(np.flatnonzero(row)) for row in weights}
    assert len(chosen) >= 3 and all(len(c) == 2 for c in chosen)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_preset_counts_and_quantization_spares_the_router() -> None:
    source = resolve_model("mixtral_8x7b_v0.1")
    config, mapping = source.config, source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == MIXTRAL_8X7B
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert (config.sliding_window_size, config.context_window_size) == (-1, 32768)
    router = mapping.param("model.layers.0.block_sparse_moe.gate.weight")
    assert (router.shape, router.kind) == ((8, 4096), "other")
    gate_up = mapping.param("model.layers.31.block_sparse_moe.experts.7.gate_up_proj.weight")
    assert gate_up.hf_names == ("model.layers.31.block_sparse_moe.experts.7.w1.weight",
                                "model.layers.31.block_sparse_moe.experts.7.w3.weight")
    small = config.with_overrides(num_hidden_layers=1)
    stored = stored_params(source.arch.build_module(small), "q4f16_1")
    moe = "model.layers.0.block_sparse_moe."
    assert [p.name for p in stored[moe + "gate.weight"]] == [moe + "gate.weight"]
    assert [p.name for p in stored[moe + "experts.3.w2.weight"]] == [
        moe + "experts.3.w2.q_weight", moe + "experts.3.w2.q_scale"]
    assert resolve_model(SHARED / "configs" / "mistralai--Mixtral-8x7B-v0.1").config == config


def test_bad_configs_name_the_value() -> None:
    path = SHARED / "configs" / "mistralai--Mixtral-8x7B-v0.1" / "config.json"
    hf = json.loads(path.read_text())
    arch = resolve_model("mixtral_8x7b_v0.1").arch
    with pytest.raises(MlccError, match=r"num_experts_per_tok=9 must be in \[1, "
                                        r"num_local_experts=8\]"):
        arch.config_cls.from_hf({**hf, "num_experts_per_tok": 9})
    with pytest.raises(MlccError, match=r"missing required key 'num_local_experts'"):
        arch.config_cls.from_hf({k: v for k, v in hf.items() if k != "num_local_experts"})
