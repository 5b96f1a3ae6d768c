"""convert_weight and gen_config on tiny HF folders of the added architectures.

The params folder that `mlcc convert_weight` writes must hold, name for name and byte for byte,
what the weight mapping gives when the HF tensors are read and fused here with NumPy (GPT-2's
Conv1D weights transposed, GPT-BigCode's per-head c_attn rows regrouped, Mixtral's w1/w3 stacked
per expert and its router left in float, q4f16_1 quantized by an independent NumPy quantizer);
ReferenceModel reading that folder gives the same logits as from the HF folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.frontend.ndarray_cache import load_ndarray_cache
from mlcc.runtime_check.reference import ReferenceModel

transformers = pytest.importorskip("transformers")
# group_reference lives with the unit tests; this folder is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from group_reference import reference_quantize

TINY = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {
        "vocab_size": 97, "n_embd": 64, "n_layer": 1, "n_head": 4, "n_positions": 32}),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", {
        "vocab_size": 89, "n_embd": 48, "n_layer": 1, "n_head": 6, "n_positions": 32,
        "multi_query": False}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {
        "vocab_size": 103, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
        "num_local_experts": 3, "num_experts_per_tok": 2}),
    "phi": ("PhiForCausalLM", "PhiConfig", {
        "vocab_size": 101, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 96, "max_position_embeddings": 64}),
}


def save_tiny(arch: str, path: Path) -> Path:
    model_cls, config_cls, fields = TINY[arch]
    torch.manual_seed(len(arch))
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape))
    model.save_pretrained(path)
    if arch == "gpt2":  # the published checkpoints' names
        state = load_file(path / "model.safetensors")
        from safetensors.numpy import save_file
        save_file({k.removeprefix("transformer."): v for k, v in state.items()},
                  path / "model.safetensors")
    return path


def fused_by_hand(arch: str, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters that differ from a plain copy, fused here with NumPy."""
    if arch == "gpt2":
        return {"h.0.attn.c_attn.weight": hf["h.0.attn.c_attn.weight"].T,
                "h.0.mlp.c_proj.weight": hf["h.0.mlp.c_proj.weight"].T}
    if arch == "gpt_bigcode":
        w = hf["transformer.h.0.attn.c_attn.weight"].reshape(6, 3, 8, 48)
        return {"transformer.h.0.attn.c_attn.weight": w.transpose(1, 0, 2, 3).reshape(144, 48)}
    if arch == "mixtral":
        e = "model.layers.0.block_sparse_moe.experts.2."
        return {e + "gate_up_proj.weight": np.concatenate([hf[e + "w1.weight"],
                                                           hf[e + "w3.weight"]])}
    return {"lm_head.bias": hf["lm_head.bias"]}


def convert(hf_dir: Path, out: Path, quantization: str) -> dict[str, np.ndarray]:
    result = CliRunner().invoke(app, ["convert_weight", str(hf_dir), "--quantization",
                                      quantization, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return load_ndarray_cache(out)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_convert_weight_fuses_and_quantizes_as_the_mapping_says(tmp_path: Path, arch: str):
    hf_dir = save_tiny(arch, tmp_path / "hf")
    hf = load_file(hf_dir / "model.safetensors")
    stored = convert(hf_dir, tmp_path / "q0f32", "q0f32")
    for name, want in fused_by_hand(arch, hf).items():
        np.testing.assert_array_equal(stored[name], want)
    stored = convert(hf_dir, tmp_path / "q4", "q4f16_1")
    for name, want in fused_by_hand(arch, hf).items():
        if want.ndim == 2:
            q_weight, q_scale, _ = reference_quantize(want, 4, 32, "float16")
            stem = name.removesuffix(".weight")
            np.testing.assert_array_equal(stored[stem + ".q_weight"], q_weight)
            np.testing.assert_array_equal(stored[stem + ".q_scale"], q_scale)
    if arch == "mixtral":
        router = "model.layers.0.block_sparse_moe.gate.weight"
        assert stored[router].dtype == np.float16
        np.testing.assert_array_equal(stored[router], hf[router].astype(np.float16))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_params_folder_runs_like_the_hf_folder(tmp_path: Path, arch: str):
    hf_dir = save_tiny(arch, tmp_path / "hf")
    out = tmp_path / "params"
    convert(hf_dir, out, "q4f16_1")
    result = CliRunner().invoke(app, ["gen_config", str(hf_dir), "--quantization", "q4f16_1",
                                      "--conv-template", "LM", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "mlc-chat-config.json").read_text())["model_type"] == arch
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_array_equal(ReferenceModel(out).prefill_logits(ids),
                                  ReferenceModel(hf_dir, "q4f16_1").prefill_logits(ids))
