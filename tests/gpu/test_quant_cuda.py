"""Quantizing on CUDA writes the same bytes as on the CPU (skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mlcc.interface.convert_weight import convert_weight
from mlcc.quant import SCHEMES, get_scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GROUP_SCHEMES = [name for name, scheme in SCHEMES.items() if scheme.kind == "group"]


@pytest.mark.parametrize("name", GROUP_SCHEMES)
@pytest.mark.parametrize("shape,dtype", [((64, 4096), torch.float32), ((33, 100), torch.float16),
                                         ((4096, 11008), torch.bfloat16), ((7, 40), torch.float32)])
def test_cuda_and_cpu_bytes_are_identical(name: str, shape, dtype) -> None:
    gen = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    w[: shape[0] // 2, :40] = 0  # whole zero groups
    w[-1, 0] = 2.5  # an outlier that clamps after float16 rounding of its group's scale
    scheme = get_scheme(name)
    on_cpu = scheme.quantize(w)
    on_gpu = scheme.quantize(w.to("cuda"))
    for part in ("q_weight", "q_scale"):
        assert on_cpu[part].dtype == on_gpu[part].dtype
        assert on_cpu[part].tobytes() == on_gpu[part].tobytes(), part


def _random_llama(folder: Path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 512,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (1000, 256), "lm_head.weight": (1000, 256),
              "model.norm.weight": (256,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (256,),
                       p + "post_attention_layernorm.weight": (256,),
                       p + "self_attn.q_proj.weight": (256, 256),
                       p + "self_attn.k_proj.weight": (64, 256),
                       p + "self_attn.v_proj.weight": (64, 256),
                       p + "self_attn.o_proj.weight": (256, 256),
                       p + "mlp.gate_proj.weight": (688, 256), p + "mlp.up_proj.weight": (688, 256),
                       p + "mlp.down_proj.weight": (256, 688)})
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()},
              folder / "model.safetensors")


@pytest.mark.parametrize("name", ["q4f16_1", "q3f16_1", "q4f32_1"])
def test_convert_weight_on_cuda_matches_cpu(tmp_path: Path, name: str) -> None:
    _random_llama(tmp_path / "hf")
    for device in ("cpu", "cuda"):
        summary = convert_weight(tmp_path / "hf", name, tmp_path / device, device=device,
                                 progress=False)
        assert summary["device"].startswith(device)
    for file in ("ndarray-cache.json", "params_shard_0.bin"):
        assert (tmp_path / "cpu" / file).read_bytes() == (tmp_path / "cuda" / file).read_bytes()
