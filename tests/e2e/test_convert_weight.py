"""`mlcc convert_weight` end to end on the real stories260K checkpoints and on built checkpoints.

Outputs are checked against the HF tensors read here with safetensors/torch and fused with NumPy,
against the documented stored layout, and byte for byte across the safetensors and PyTorch
copies of the same model. Bad inputs must fail with one line and leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.frontend import resolve_model
from mlcc.frontend.ndarray_cache import load_ndarray_cache, read_ndarray_cache_index
from mlcc.quant import SCHEMES, get_scheme

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
STORIES_PT = SHARED / "models" / "stories260K-pytorch"
FLOAT_MODES = [name for name, scheme in SCHEMES.items() if scheme.kind != "awq"]

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


def run_cli(*args: str):
    return CliRunner().invoke(app, ["convert_weight", *map(str, args)])


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    return {name: t.numpy() for name, t in state.items()}


def fused_reference(hf: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """The mlcc parameters of a Llama, fused here from HF names with NumPy."""
    out = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"],
           "model.norm.weight": hf["model.norm.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            out[p + name] = hf[p + name]
    if "lm_head.weight" in hf:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def check_folder_format(out: Path) -> dict:
    """Schema, md5 sums, byte offsets and sizes of a weights folder, read as raw JSON."""
    index = json.loads((out / "ndarray-cache.json").read_text())
    assert set(index) == {"metadata", "records"}
    assert set(index["metadata"]) == {"ParamSize", "ParamBytes", "BitsPerParam"}
    total = 0
    for k, shard in enumerate(index["records"]):
        assert set(shard) == {"dataPath", "format", "nbytes", "md5sum", "records"}
        assert shard["dataPath"] == f"params_shard_{k}.bin" and shard["format"] == "raw-shard"
        data = (out / shard["dataPath"]).read_bytes()
        assert len(data) == shard["nbytes"] <= 32 * 2**20 or len(shard["records"]) == 1
        assert hashlib.md5(data).hexdigest() == shard["md5sum"]
        offset = 0
        for rec in shard["records"]:
            assert rec["format"] == "raw" and rec["byteOffset"] == offset
            assert rec["nbytes"] == math.prod(rec["shape"]) * np.dtype(rec["dtype"]).itemsize
            offset += rec["nbytes"]
        assert offset == len(data)
        total += len(data)
    assert index["metadata"]["ParamBytes"] == total
    assert index["metadata"]["ParamSize"] == sum(len(s["records"]) for s in index["records"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ndarray-cache.json"] + [s["dataPath"] for s in index["records"]])
    return index


def check_expected_params(out: Path, model_dir: Path, quantization: str) -> dict:
    """Every tensor that compile expects (mapping x scheme) is stored, with shape and dtype."""
    model = resolve_model(model_dir)
    scheme = get_scheme(quantization)
    expected = {t.name: (tuple(t.shape), t.dtype)
                for p in model.arch.weight_mapping(model.config).params
                for t in scheme.stored_tensors(p)}
    records = {r["name"]: (tuple(r["shape"]), r["dtype"])
               for s in read_ndarray_cache_index(out)["records"] for r in s["records"]}
    assert records == expected
    return records


@pytest.mark.parametrize("model_dir", [STORIES, STORIES_PT], ids=["safetensors", "pytorch"])
@pytest.mark.parametrize("mode", FLOAT_MODES)
def test_every_mode_on_stories260k(tmp_path: Path, mode: str, model_dir: Path) -> None:
    out = tmp_path / "params"
    result = run_cli(model_dir, "--quantization", mode, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"with {mode} on cpu" in result.stderr
    check_folder_format(out)
    records = check_expected_params(out, model_dir, mode)
    scheme = get_scheme(mode)
    stored = load_ndarray_cache(out)
    reference = fused_reference(hf_tensors(model_dir), layers=5)
    for name, w in reference.items():
        stem = name.removesuffix(".weight")
        if f"{stem}.q_weight" not in stored:
            np.testing.assert_array_equal(stored[name], w.astype(scheme.model_dtype))
            continue
        q_weight, q_scale = stored[f"{stem}.q_weight"], stored[f"{stem}.q_scale"]
        # Padded K, independently of the library: whole groups and whole uint32 words.
        per_word = 32 // scheme.bits
        k_pad = w.shape[1]
        while k_pad % scheme.group_size or k_pad % per_word:
            k_pad += 1
        assert q_weight.shape == (w.shape[0], k_pad // per_word)
        assert q_scale.shape == (w.shape[0], k_pad // scheme.group_size)
        back = scheme.dequantize(q_weight, q_scale, w.shape[1])
        step = np.repeat(q_scale.astype(np.float32), scheme.group_size, axis=1)[:, :w.shape[1]]
        max_int = 2 ** (scheme.bits - 1) - 1  # beyond the grid's end the code clamps
        bound = np.maximum(step * 0.5, np.abs(w) - max_int * step)
        assert np.all(np.abs(back - w) <= bound * (1 + 1e-6)), name
    if scheme.kind == "group":
        assert records["model.layers.0.mlp.down_proj.q_weight"][0][0] == 64  # K=172 padded


def test_pytorch_bin_gives_the_same_bytes_as_safetensors(tmp_path: Path) -> None:
    for folder, name in ((STORIES, "st"), (STORIES_PT, "pt")):
        assert run_cli(folder, "--quantization", "q4f16_1", "-o", tmp_path / name).exit_code == 0
    st = json.loads((tmp_path / "st" / "ndarray-cache.json").read_text())
    pt = json.loads((tmp_path / "pt" / "ndarray-cache.json").read_text())
    assert st == pt
    assert (tmp_path / "st/params_shard_0.bin").read_bytes() == (
        tmp_path / "pt/params_shard_0.bin").read_bytes()


def test_documented_command_line_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "OUT" / "params"
    proc = subprocess.run(
        [sys.executable, "-m", "mlcc.cli", "convert_weight", str(STORIES_PT), "--quantization",
         "q4f16_1", "-o", str(out)], check=False, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Wrote 53 tensors (260,032 parameters" in proc.stderr
    check_folder_format(out)
    check_expected_params(out, STORIES_PT, "q4f16_1")


def test_weights_from_source_with_an_explicit_format(tmp_path: Path) -> None:
    result = run_cli(STORIES / "config.json", "--quantization", "q0f32", "-o", tmp_path / "p",
                     "--source", STORIES_PT / "pytorch_model.bin", "--source-format",
                     "huggingface-torch", "--model-type", "llama")
    assert result.exit_code == 0, result.output
    stored = load_ndarray_cache(tmp_path / "p")
    reference = fused_reference(hf_tensors(STORIES_PT), layers=5)
    assert set(stored) == set(reference)
    for name, w in reference.items():
        np.testing.assert_array_equal(stored[name], w)


def test_overwrite_replaces_weights_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "params"
    assert run_cli(STORIES, "--quantization", "q0f32", "-o", out).exit_code == 0
    (out / "mlc-chat-config.json").write_text('{"model_type": "llama"}')
    (out / "tokenizer.json").write_text("{}")
    refused = run_cli(STORIES, "--quantization", "q4f16_1", "-o", out)
    assert refused.exit_code == 1 and "pass --overwrite" in refused.stderr
    assert read_ndarray_cache_index(out)["metadata"]["BitsPerParam"] == 32.0
    done = run_cli(STORIES, "--quantization", "q4f16_1", "-o", out, "--overwrite")
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == [
        "mlc-chat-config.json", "ndarray-cache.json", "params_shard_0.bin", "tokenizer.json"]
    assert (out / "mlc-chat-config.json").read_text() == '{"model_type": "llama"}'
    check_expected_params(out, STORIES, "q4f16_1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]  # no staging left


def test_device_cuda_fails_clearly_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; tests/gpu covers --device cuda")
    result = run_cli(STORIES, "--quantization", "q4f16_1", "-o", tmp_path / "p", "--device",
                     "cuda")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: [convert_weight] --device cuda: CUDA is not available")
    assert not any(tmp_path.iterdir())
