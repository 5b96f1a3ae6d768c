"""Tiny models for tensor-parallel tests: frontend configs of llama, mistral and gpt_neox.

Llama and Mistral have 4 query heads over 2 key/value heads (GQA), so 4 shards share each
key/value head between two ranks; Mistral has a sliding window shorter than the test sequence.
`QUANT_SIZES` makes every row-parallel input (o_proj, down_proj) split into whole q4 groups of
32 for 2 and 4 shards. Weights are random; `stored_weights` converts them as convert_weight
stores them (quantized when the scheme says so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlcc import ir
from mlcc.frontend import get_architecture
from mlcc.passes import run_passes
from mlcc.passes.dtype import ConvertModelDType
from mlcc.passes.quantize import QuantizeWeights
from mlcc.quant import get_scheme

BASE = {"vocab_size": 48, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 40, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "prefill_chunk_size": 5}
QUANT_SIZES = {"hidden_size": 128, "intermediate_size": 256}
HF_CONFIGS = {
    "llama": {**BASE, "model_type": "llama", "num_key_value_heads": 2},
    "mistral": {**BASE, "model_type": "mistral", "num_key_value_heads": 2, "sliding_window": 6},
    "gpt_neox": {**BASE, "model_type": "gpt_neox", "rotary_pct": 0.5, "layer_norm_eps": 1e-5,
                 "use_parallel_residual": True, "hidden_act": "gelu"},
    "mixtral": {**BASE, "model_type": "mixtral", "num_key_value_heads": 2,
                "num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny_config(arch: str, quantized: bool = False):
    hf = dict(HF_CONFIGS[arch], **(QUANT_SIZES if quantized else {}))
    architecture = get_architecture(arch)
    return architecture, architecture.config_cls.from_hf(hf)


def stored_weights(architecture, config, quantization: str, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Random weights (norms near 1), converted as convert_weight stores them."""
    generator = torch.Generator().manual_seed(seed)
    scheme = get_scheme(quantization)
    arrays: dict[str, np.ndarray] = {}
    for param in architecture.weight_mapping(config).params:
        noise = torch.randn(param.shape, generator=generator)
        # N(0, 0.3) at 32 input features, scaled as 1/sqrt(fan-in) so wider models keep
        # activations (and float32 rounding) of the same size
        scale = 0.3 * (32 / param.shape[-1]) ** 0.5
        w = 1 + 0.1 * noise if param.kind == "norm" else scale * noise
        arrays.update(scheme.convert(param, w))
    return arrays


def write_params(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A params folder (ndarray-cache.json + shards) holding `arrays`, as convert_weight writes."""
    from mlcc.frontend.ndarray_cache import NDArrayCacheWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = NDArrayCacheWriter(folder)
    for name, array in arrays.items():
        writer.add(name, array)
    writer.finish()
    return folder


def oracle_logits(architecture, config, quantization: str, arrays: dict[str, np.ndarray],
                  ids: np.ndarray, prompt: int) -> list[np.ndarray]:
    """The unsharded model in the IR interpreter: the logits after `ids[:prompt]` (fed in
    prefill chunks), then after each of the following tokens decoded one by one."""
    scheme = get_scheme(quantization)
    module = run_passes(architecture.build_module(config),
                        [ConvertModelDType(scheme.model_dtype), QuantizeWeights(quantization)]
                        ).module
    params = {p.name: arrays[p.name] for p in module.params}
    cache = ir.KVCacheState(next(v.type for v in module.function("decode").inputs
                                 if isinstance(v.type, ir.KVCacheType)))
    ids = np.asarray(ids, np.int32)
    chunk = config.prefill_chunk_size
    for start in range(0, prompt, chunk):
        (logits,) = ir.interpret(module, "prefill", [ids[start:min(start + chunk, prompt)],
                                                     cache], params)
    out = [logits]
    for token in ids[prompt:]:
        out.append(ir.interpret(module, "decode", [np.array([token], np.int32), cache],
                                params)[0])
    return out
