"""GPT-2: the real config, the preset's parameter count, and parity with transformers.

The tiny models keep GPT-2's structure (learned positions, Conv1D weights stored (in, out),
tanh GELU, tied lm_head, an odd vocabulary) and are written the way the published checkpoints
are: tensor names without the `transformer.` prefix, the `h.N.attn.bias` mask buffers included,
as model.safetensors or as pytorch_model.bin; or as GPT2LMHeadModel writes them, with the
prefix (save_pretrained's safetensors, or its state dict as a .bin).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from arch_parity import CHUNK, assert_reference_matches_transformers, randomize
from safetensors.torch import load_file, save_file

from mlcc.errors import MlccError
from mlcc.frontend import resolve_model

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"
TINY = {"vocab_size": 97, "n_embd": 60, "n_layer": 2, "n_head": 5, "n_positions": 32,
        "activation_function": "gelu_new"}
CASES = {
    "gpt2_shape_safetensors": ({}, "safetensors"),
    "gpt2_shape_bin": ({}, "bin"),
    "untied_layer_scaled_exact_gelu": ({"tie_word_embeddings": False, "n_inner": 72,
                                        "scale_attn_by_inverse_layer_idx": True,
                                        "activation_function": "gelu"}, "safetensors"),
}
GPT2 = 124_439_808  # published parameter count of openai-community/gpt2


def save_published_layout(model, path: Path, fmt: str) -> Path:
    """Write the model as openai-community/gpt2 is stored: unprefixed names, mask buffers."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name.removeprefix("transformer.")] = tensor.contiguous()
    n = model.config.n_positions
    for layer in range(model.config.n_layer):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"))
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "prefill_chunk_size": CHUNK}))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gpt2_matches_transformers(tmp_path: Path, case: str) -> None:
    changes, fmt = CASES[case]
    config = transformers.GPT2Config(**{**TINY, **changes})
    model = randomize(transformers.GPT2LMHeadModel(config), seed=sum(map(ord, case)))
    assert_reference_matches_transformers(model, save_published_layout(model, tmp_path, fmt))


def save_prefixed_layout(model, path: Path, fmt: str) -> Path:
    """Write the model as GPT2LMHeadModel saves it: `transformer.h.0...` names."""
    if fmt == "bin":
        state = {name: t.contiguous() for name, t in model.state_dict().items()}
        assert any(name.startswith("transformer.h.0.") for name in state)
        torch.save(state, path / "pytorch_model.bin")
        model.config.save_pretrained(path)
    else:
        model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "prefill_chunk_size": CHUNK}))
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_prefixed_checkpoint_matches_transformers(tmp_path: Path, fmt: str) -> None:
    config = transformers.GPT2Config(**{**TINY, "tie_word_embeddings": fmt == "bin"})
    model = randomize(transformers.GPT2LMHeadModel(config), seed=len(fmt))
    assert_reference_matches_transformers(model, save_prefixed_layout(model, tmp_path, fmt))


def test_both_spellings_load_the_same_params(tmp_path: Path) -> None:
    from mlcc.frontend import load_params, open_checkpoint

    model = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)), 7)
    loaded = []
    for layout, save in (("bare", save_published_layout), ("prefixed", save_prefixed_layout)):
        folder = tmp_path / layout
        folder.mkdir()
        source = resolve_model(save(model, folder, "safetensors"))
        mapping = source.arch.weight_mapping(source.config)
        loaded.append(load_params(mapping, open_checkpoint(folder)))
    bare, prefixed = loaded
    assert sorted(bare) == sorted(prefixed) and "h.1.attn.c_attn.weight" in bare
    for name, value in bare.items():
        assert (value == prefixed[name]).all(), name
    wpe = model.transformer.wpe.weight.detach().numpy()
    assert (prefixed["wpe.weight"] == wpe).all()


def test_missing_tensor_is_named_as_published(tmp_path: Path) -> None:
    from mlcc.frontend import load_params, open_checkpoint

    model = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)), 8)
    save_prefixed_layout(model, tmp_path, "safetensors")
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.ln_2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    source = resolve_model(tmp_path)
    with pytest.raises(MlccError, match=r"h\.1\.ln_2\.bias: missing from the checkpoint"):
        load_params(source.arch.weight_mapping(source.config), open_checkpoint(tmp_path))


def test_conv1d_weights_are_transposed(tmp_path: Path) -> None:
    from mlcc.frontend import load_params, open_checkpoint

    model = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)), 5)
    source = resolve_model(save_published_layout(model, tmp_path, "safetensors"))
    params = load_params(source.arch.weight_mapping(source.config), open_checkpoint(tmp_path))
    c_fc = model.transformer.h[1].mlp.c_fc.weight.detach().numpy()  # (in 60, out 240)
    assert params["h.1.mlp.c_fc.weight"].shape == (240, 60)
    assert (params["h.1.mlp.c_fc.weight"] == c_fc.T).all()


def test_preset_reads_gpt2() -> None:
    source = resolve_model("gpt2")
    config, mapping = source.config, source.arch.weight_mapping(source.config)
    assert sum(math.prod(p.shape) for p in mapping.params) == GPT2
    got = (config.hidden_size, config.num_attention_heads, config.intermediate_size,
           config.n_positions, config.context_window_size, config.tie_word_embeddings,
           config.activation_function, config.eos_token_id)
    assert got == (768, 12, 3072, 1024, 1024, True, "gelu_new", 50256)
    c_attn = mapping.param("h.11.attn.c_attn.weight")
    assert (c_attn.shape, c_attn.hf_shapes, c_attn.combine) == (
        (2304, 768), ((768, 2304),), "transpose")
    assert mapping.is_unused("h.3.attn.bias") and mapping.is_unused("lm_head.weight")
    assert resolve_model(SHARED / "configs" / "openai-community--gpt2").config == config


def test_bad_configs_name_the_value() -> None:
    hf = json.loads((SHARED / "configs" / "openai-community--gpt2" / "config.json").read_text())
    arch = resolve_model("gpt2").arch
    with pytest.raises(MlccError, match=r"add_cross_attention=true .* not supported"):
        arch.config_cls.from_hf({**hf, "add_cross_attention": True})
    with pytest.raises(MlccError, match=r"activation_function='relu' is not supported for gpt2"):
        arch.config_cls.from_hf({**hf, "activation_function": "relu"})
    with pytest.raises(MlccError, match=r"gpt2 learns 1024 position embeddings"):
        arch.config_cls.from_hf({**hf, "context_window_size": 2048})
