"""q4f16_awq end to end on a small AutoAWQ (GEMM) checkpoint packed here from random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.frontend import resolve_model
from mlcc.frontend.ndarray_cache import load_ndarray_cache, read_ndarray_cache_index
from mlcc.quant import get_scheme

GROUP = 128
# AutoAWQ's pack order: nibble i of a word holds output column ORDER[i] of its block of eight.
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 96, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
    "bos_token_id": 1, "eos_token_id": 2,
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                            "version": "gemm", "zero_point": True,
                            "modules_to_not_convert": None},
}
LINEARS = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256),
           "self_attn.v_proj": (128, 256), "self_attn.o_proj": (256, 256),
           "mlp.gate_proj": (384, 256), "mlp.up_proj": (384, 256), "mlp.down_proj": (256, 384)}


def awq_quantize(w: np.ndarray):
    """Asymmetric 4-bit RTN per group of 128 inputs, as AutoAWQ's GEMM format stores it.

    Returns (qweight, qzeros, scales) in AutoAWQ's layout and the float32 weight they encode.
    """
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    scale = np.maximum((hi - lo) / 15, 1e-5).astype(np.float16)  # (N, G)
    s32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s32), 0, 15).astype(np.int64)
    codes = np.clip(np.round(groups / s32[:, :, None]) + zero[:, :, None], 0, 15)
    codes = codes.astype(np.int64).reshape(n, k)
    encoded = ((codes.reshape(n, k // GROUP, GROUP) - zero[:, :, None])
               * s32[:, :, None]).reshape(n, k).astype(np.float32)
    return pack_columns(codes.T), pack_columns(zero.T), np.ascontiguousarray(scale.T), encoded


def pack_columns(values: np.ndarray) -> np.ndarray:
    """(R, C) 4-bit values -> AutoAWQ int32 (R, C / 8)."""
    packed = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for i, column in enumerate(ORDER):
        packed |= values[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return packed.view(np.int32)


def build_awq_checkpoint(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write config.json + model.safetensors; returns the float32 weights each mlcc param holds."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    hidden, vocab = CONFIG["hidden_size"], CONFIG["vocab_size"]
    for name, shape in (("model.embed_tokens.weight", (vocab, hidden)),
                        ("lm_head.weight", (vocab, hidden)), ("model.norm.weight", (hidden,))):
        tensors[name] = (rng.standard_normal(shape) * 0.1).astype(np.float16)
        expected[name] = tensors[name].astype(np.float32)
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        encoded = {}
        for linear, shape in LINEARS.items():
            w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            qweight, qzeros, scales, encoded[linear] = awq_quantize(w)
            tensors.update({p + linear + ".qweight": qweight, p + linear + ".qzeros": qzeros,
                            p + linear + ".scales": scales})
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            tensors[p + norm] = (1 + rng.standard_normal(hidden) * 0.1).astype(np.float16)
            expected[p + norm] = tensors[p + norm].astype(np.float32)
        expected[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [encoded[f"self_attn.{x}_proj"] for x in "qkv"])
        expected[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [encoded["mlp.gate_proj"], encoded["mlp.up_proj"]])
        expected[p + "self_attn.o_proj.weight"] = encoded["self_attn.o_proj"]
        expected[p + "mlp.down_proj.weight"] = encoded["mlp.down_proj"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors, folder / "model.safetensors")
    return expected


def run_cli(*args: object):
    return CliRunner().invoke(app, ["convert_weight", *map(str, args)])


def test_awq_checkpoint_converts_to_the_encoded_weights(tmp_path: Path) -> None:
    expected = build_awq_checkpoint(tmp_path / "awq")
    out = tmp_path / "params"
    result = run_cli(tmp_path / "awq", "--quantization", "q4f16_awq", "-o", out)
    assert result.exit_code == 0, result.output

    scheme = get_scheme("q4f16_awq")
    model = resolve_model(tmp_path / "awq")
    layout = {t.name: (tuple(t.shape), t.dtype)
              for p in model.arch.weight_mapping(model.config).params
              for t in scheme.stored_tensors(p)}
    records = {r["name"]: (tuple(r["shape"]), r["dtype"])
               for s in read_ndarray_cache_index(out)["records"] for r in s["records"]}
    assert records == layout
    assert records["model.layers.0.mlp.down_proj.q_zeros"] == ((256, 1), "uint32")
    assert records["lm_head.weight"] == ((96, 256), "float16")

    stored = load_ndarray_cache(out)
    assert set(expected) == {p.name for p in model.arch.weight_mapping(model.config).params}
    for name, w in expected.items():
        stem = name.removesuffix(".weight")
        if f"{stem}.q_weight" in stored:
            back = scheme.dequantize(stored[f"{stem}.q_weight"], stored[f"{stem}.q_scale"],
                                     w.shape[1], q_zeros=stored[f"{stem}.q_zeros"])
        else:
            back = stored[name].astype(np.float32)
        np.testing.assert_array_equal(back, w, err_msg=name)


def test_float_scheme_on_an_awq_checkpoint_is_refused(tmp_path: Path) -> None:
    build_awq_checkpoint(tmp_path / "awq")
    result = run_cli(tmp_path / "awq", "--quantization", "q4f16_1", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "the checkpoint is already quantized (quant_method 'awq'); use --quantization " \
           "q4f16_awq" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    ("drop", "model.layers.1.mlp.up_proj.qzeros: missing from the AutoAWQ checkpoint"),
    ("shape", ("model.layers.0.self_attn.o_proj.qweight: expected (256, 32) (in_features, "
              "out_features / 8) for model.layers.0.self_attn.o_proj.weight, got (256, 16)")),
    ("group", ("quantization_config.group_size is 64, q4f16_awq reads AutoAWQ checkpoints with "
              "group_size 128")),
])
def test_damaged_awq_checkpoints_fail_cleanly(tmp_path: Path, damage: str, message: str) -> None:
    from safetensors.numpy import load_file

    folder = tmp_path / "awq"
    build_awq_checkpoint(folder)
    tensors = load_file(folder / "model.safetensors")
    if damage == "drop":
        del tensors["model.layers.1.mlp.up_proj.qzeros"]
    elif damage == "shape":
        name = "model.layers.0.self_attn.o_proj.qweight"
        tensors[name] = np.ascontiguousarray(tensors[name][:, :16])
    else:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["group_size"] = 64
        (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    result = run_cli(folder, "--quantization", "q4f16_awq", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]
