"""The sharding pass: N shard programs run together equal the unsharded model.

The oracle is the unsharded module run by the IR interpreter; the shard programs run in
lockstep (`run_sharded`), each on its slice of the same unsharded weights (`shard_params`), and
must give the same logits within 1e-5 (float32) at every prefill chunk and decode step, for
tiny Llama/Mistral (GQA, 2 key/value heads: 4 shards share them) and GPT-NeoX (parallel
residual, biases, partial rotary), float and q4 weights, after the legalizing passes and after
the whole O2 pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_model import build_tiny_llama, random_params
from tp_models import stored_weights, tiny_config

from mlcc import ir
from mlcc.errors import MlccError
from mlcc.ir.collective import ShardSpec, run_sharded
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.quantize import QuantizeWeights
from mlcc.passes.shard import ShardModule, shard_params
from mlcc.quant import get_scheme

PROMPT, DECODE = 11, 6
ATOL = 1e-5  # of the logits' magnitude: float32 sums in another order


def legalized(arch, config, quantization: str) -> ir.Module:
    scheme = get_scheme(quantization)
    passes = [ConvertModelDType(scheme.model_dtype), QuantizeWeights(quantization)]
    return run_passes(arch.build_module(config), passes).module


def cache_type(module: ir.Module) -> ir.KVCacheType:
    return next(v.type for v in module.function("decode").inputs
                if isinstance(v.type, ir.KVCacheType))


def schedule(chunk: int, seed: int = 3) -> tuple[list[np.ndarray], list[int]]:
    ids = np.random.default_rng(seed).integers(0, 40, PROMPT + DECODE).astype(np.int32)
    chunks = [ids[i:i + chunk] for i in range(0, PROMPT, chunk)]
    return chunks, [int(t) for t in ids[PROMPT:]]


def unsharded_logits(module, params, chunk: int) -> list[np.ndarray]:
    cache = ir.KVCacheState(cache_type(module))
    chunks, tokens = schedule(chunk)
    out = [ir.interpret(module, "prefill", [c, cache], params)[0] for c in chunks]
    out += [ir.interpret(module, "decode", [np.array([t], np.int32), cache], params)[0]
            for t in tokens]
    return out


def sharded_logits(sharded, arrays, shards: int, chunk: int) -> list[np.ndarray]:
    params = [shard_params(sharded, arrays, r) for r in range(shards)]
    caches = [ir.KVCacheState(cache_type(sharded)) for _ in range(shards)]
    chunks, tokens = schedule(chunk)
    calls = [("prefill", c) for c in chunks] + [("decode", np.array([t], np.int32))
                                                for t in tokens]
    out = []
    for fn, ids in calls:
        results = run_sharded([sharded] * shards, fn, [[ids, c] for c in caches], params)
        for (logits,) in results[1:]:
            np.testing.assert_array_equal(logits, results[0][0])  # every rank holds the same
        out.append(results[0][0])
    return out


def assert_same_logits(actual, expected) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        scale = max(1.0, float(np.abs(e).max()))  # 1e-5 of the logits' magnitude
        np.testing.assert_allclose(a, e, rtol=0, atol=ATOL * scale, err_msg=f"step {step}")


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
@pytest.mark.parametrize("arch_name", ["llama", "mistral", "gpt_neox"])
def test_shard_programs_together_equal_the_unsharded_model(arch_name, quantization, shards):
    arch, config = tiny_config(arch_name, quantized=quantization != "q0f32")
    module = legalized(arch, config, quantization)
    arrays = stored_weights(arch, config, quantization)
    params = {p.name: arrays[p.name] for p in module.params}
    sharded = ShardModule(shards).run(module)
    ir.verify(sharded)
    expected = unsharded_logits(module, params, config.prefill_chunk_size)
    assert_same_logits(sharded_logits(sharded, arrays, shards, config.prefill_chunk_size),
                       expected)


@pytest.mark.parametrize("arch_name", ["llama", "gpt_neox"])
def test_o2_pipeline_with_shards_equals_the_unsharded_model(arch_name):
    arch, config = tiny_config(arch_name, quantized=True)
    arrays = stored_weights(arch, config, "q4f32_1")
    module = legalized(arch, config, "q4f32_1")
    expected = unsharded_logits(module, {p.name: arrays[p.name] for p in module.params},
                                config.prefill_chunk_size)
    passes = build_pipeline(parse_opt("O2"), "float32", "q4f32_1", config.prefill_chunk_size,
                            tensor_parallel_shards=2)
    sharded = run_passes(arch.build_module(config), passes).module
    ops = [n.op for n in sharded.function("decode").nodes]
    # Llama sums after attention and after the MLP; GPT-NeoX adds both branches first.
    per_layer = 2 if arch_name == "llama" else 1
    assert ops.count("all_reduce") == per_layer * config.num_hidden_layers
    assert "qkv_attention" in ops
    assert dict(sharded.attrs["kv_layout"])["kv_heads"] == config.num_key_value_heads // 2
    assert_same_logits(sharded_logits(sharded, arrays, 2, config.prefill_chunk_size), expected)


def test_moe_experts_split_like_mlps_and_share_one_all_reduce():
    # Each expert's gate/up is column- and its w2 row-parallel; the weighted sum of the experts'
    # partial outputs is summed over the ranks once, also after the sparse MoE rewrite.
    arch, config = tiny_config("mixtral")
    arrays = stored_weights(arch, config, "q0f32")
    module = legalized(arch, config, "q0f32")
    expected = unsharded_logits(module, {p.name: arrays[p.name] for p in module.params},
                                config.prefill_chunk_size)
    passes = build_pipeline(parse_opt("O2"), "float32", "q0f32", config.prefill_chunk_size,
                            tensor_parallel_shards=2)
    for sharded in (ShardModule(2).run(module), run_passes(arch.build_module(config),
                                                            passes).module):
        ops = [n.op for n in sharded.function("decode").nodes]
        assert ops.count("all_reduce") == 2 * config.num_hidden_layers
        expert = "model.layers.0.block_sparse_moe.experts.3."
        assert sharded.param(expert + "w2.weight").annotations["shard"].axis == 1
        assert sharded.param("model.layers.0.block_sparse_moe.gate.weight").annotations[
            "shard"].replicated
        assert_same_logits(sharded_logits(sharded, arrays, 2, config.prefill_chunk_size),
                           expected)


def test_shard_specs_follow_the_graph():
    arch, config = tiny_config("gpt_neox")
    sharded = ShardModule(2).run(legalized(arch, config, "q0f32"))
    spec = {p.name: p.annotations["shard"] for p in sharded.params}
    p = "gpt_neox.layers.0."
    hidden = config.hidden_size
    qkv = p + "attention.query_key_value."
    assert spec[qkv + "weight"] == ShardSpec(2, 0, ((hidden, 2),) * 3)
    assert spec[qkv + "bias"] == spec[qkv + "weight"]  # column bias: sliced like the rows
    assert spec[p + "attention.dense.weight"] == ShardSpec(2, 1, ((hidden, 2),))
    assert spec[p + "attention.dense.bias"] == ShardSpec(2, rank_zero_only=True)
    assert spec[p + "mlp.dense_h_to_4h.weight"] == ShardSpec(2, 0, ((config.intermediate_size,
                                                                      2),))
    for name in ("gpt_neox.embed_in.weight", "embed_out.weight", p + "input_layernorm.weight"):
        assert spec[name].replicated and not spec[name].rank_zero_only
    assert sharded.param(qkv + "weight").type.shape == (3 * hidden // 2, hidden)


def test_quantized_weights_split_along_whole_groups():
    arch, config = tiny_config("llama", quantized=True)
    sharded = ShardModule(4).run(legalized(arch, config, "q4f32_1"))
    down = "model.layers.1.mlp.down_proj."
    inter = config.intermediate_size
    # K = 256 over 4 shards: 64 features = 8 words of 8 codes, 2 groups of 32, per shard
    assert sharded.param(down + "q_weight").annotations["shard"] == ShardSpec(4, 1, ((32, 4),))
    assert sharded.param(down + "q_scale").annotations["shard"] == ShardSpec(4, 1, ((8, 4),))
    assert sharded.param(down + "q_weight").type.shape == (config.hidden_size, inter // 32)
    node = next(n for n in sharded.function("decode").nodes
                if n.op == "q_linear" and n.inputs[1].name == down + "q_weight")
    assert node.attrs["in_features"] == inter // 4


def test_the_ir_tiny_llama_with_a_window_shards_over_4():
    module = build_tiny_llama(window=6, sinks=2)
    params = random_params(module)
    sharded = ShardModule(4).run(module)
    assert cache_type(sharded).num_kv_heads == 1  # 2 key/value heads, each shared by 2 ranks
    assert_same_logits(sharded_logits(sharded, params, 4, 4), unsharded_logits(module, params, 4))


def test_shard_count_not_dividing_the_heads_fails_clearly():
    arch, config = tiny_config("llama")
    with pytest.raises(MlccError, match=r"\[compile\] tensor parallelism: model\.layers\.0\.self_"
                                        r"attn\.qkv_proj\.weight: 4 query heads do not divide "
                                        r"among 3 shards"):
        ShardModule(3).run(legalized(arch, config, "q0f32"))


def test_row_parallel_input_not_in_whole_groups_fails_clearly():
    arch, config = tiny_config("llama")  # o_proj has 32 input features: 16 per shard
    with pytest.raises(MlccError, match=r"model\.layers\.0\.self_attn\.o_proj\.q_weight: 32 input"
                                        r" features split into 2 shards give 16 per shard, not "
                                        r"a whole number of 32-element quantization groups"):
        ShardModule(2).run(legalized(arch, config, "q4f32_1"))


def test_one_shard_leaves_the_module_alone():
    arch, config = tiny_config("llama")
    module = legalized(arch, config, "q0f32")
    assert ShardModule(1).run(module) is module
