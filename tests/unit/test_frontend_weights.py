"""HF weight loading: sharded safetensors and sharded .bin give identical parameters equal to the
model's own tensors; fused layouts are right; damaged, hostile or mismatched checkpoints fail
with one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlcc.errors import MlccError
from mlcc.frontend import iter_params, load_params, open_checkpoint, resolve_model

transformers = pytest.importorskip("transformers")

SHARED = Path(__file__).parents[2].parent / "shared"


def tiny_hf_model(kind: str, tie: bool = False):
    torch.manual_seed(1234)
    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
              "vocab_size": 120, "intermediate_size": 96, "max_position_embeddings": 64,
              "tie_word_embeddings": tie}
    if kind == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, **common))
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=False, **common))


def save_as_sharded_bin(st_dir: Path, bin_dir: Path) -> None:
    """Write the shards of a sharded safetensors folder as pytorch_model-*.bin with an index, the
    layout transformers 4 writes with safe_serialization=False."""
    bin_dir.mkdir()
    index = json.loads((st_dir / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(st_dir / shard), bin_dir / name)
        renamed[shard] = name
    weight_map = {k: renamed[v] for k, v in index["weight_map"].items()}
    (bin_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    (bin_dir / "config.json").write_text((st_dir / "config.json").read_text())


def expected_params(kind: str, model) -> dict[str, np.ndarray]:
    """Our parameters computed directly from the HF model with explicit per-row loops."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    if kind == "gpt_neox":
        # transformers 5 calls it lm_head in memory and embed_out on disk, as checkpoints do.
        sd["embed_out.weight"] = sd.pop("lm_head.weight")
    out = {}
    if kind == "gpt_neox":
        heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        for name in [k for k in sd if "query_key_value" in k]:
            fused = sd[name]
            # HF rows: for head h, q rows at h*3*hd, then k rows, then v rows.
            groups = [[fused[h * 3 * hd + j * hd: h * 3 * hd + (j + 1) * hd]
                       for h in range(heads)] for j in range(3)]
            out[name] = np.concatenate([np.concatenate(g) for g in groups])
        out.update({k: v for k, v in sd.items() if "query_key_value" not in k})
        if cfg.tie_word_embeddings:
            out.pop("embed_out.weight")
        return out
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [sd.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [sd.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
    out.update(sd)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


@pytest.mark.parametrize("kind, tie", [("llama", False), ("llama", True), ("mistral", False),
                                       ("gpt_neox", False), ("gpt_neox", True)])
def test_sharded_safetensors_and_bin_load_identically(tmp_path: Path, kind: str,
                                                      tie: bool) -> None:
    model = tiny_hf_model(kind, tie)
    st_dir, bin_dir = tmp_path / "st", tmp_path / "bin"
    model.save_pretrained(st_dir, max_shard_size="60KB")
    save_as_sharded_bin(st_dir, bin_dir)
    shards = sorted(p.name for p in st_dir.glob("*.safetensors"))
    assert len(shards) >= 3

    source = resolve_model(st_dir)
    mapping = source.arch.weight_mapping(source.config)
    from_st = load_params(mapping, open_checkpoint(st_dir))
    ck_bin = open_checkpoint(bin_dir)
    assert ck_bin.format == "pytorch" and len(ck_bin.files) == len(shards)
    from_bin = load_params(mapping, ck_bin)

    expected = expected_params(kind, model)
    assert set(from_st) == set(from_bin) == set(expected)
    for name, value in expected.items():
        assert from_st[name].dtype == np.float32
        assert from_st[name].shape == mapping.param(name).shape
        np.testing.assert_array_equal(from_st[name], value, err_msg=name)
        np.testing.assert_array_equal(from_bin[name], value, err_msg=name)


def test_stories260k_safetensors_and_pytorch_agree() -> None:
    source = resolve_model(SHARED / "models" / "stories260K")
    mapping = source.arch.weight_mapping(source.config)
    a = load_params(mapping, open_checkpoint(SHARED / "models" / "stories260K"))
    b = load_params(mapping, open_checkpoint(SHARED / "models" / "stories260K-pytorch"))
    assert sum(v.size for v in a.values()) == 260_032
    assert "lm_head.weight" not in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def write_llama(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None,
                tie: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    model = tiny_hf_model("llama", tie)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    if tensors is not None:
        sd = tensors(sd) if callable(tensors) else tensors
        save_file(sd, tmp_path / "model.safetensors")
    return tmp_path, sd


def load(path: Path, **kw) -> dict[str, np.ndarray]:
    source = resolve_model(path)
    return load_params(source.arch.weight_mapping(source.config), open_checkpoint(path, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources_keep_their_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    path, sd = write_llama(tmp_path, lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    source = resolve_model(path)
    mapping = source.arch.weight_mapping(source.config)
    got = dict(iter_params(mapping, open_checkpoint(path)))
    by_name = {p.name: t for p, t in got.items()}
    assert {t.dtype for t in by_name.values()} == {dtype}
    qkv = by_name["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv[:64], sd["model.layers.0.self_attn.q_proj.weight"])
    as_f32 = load_params(mapping, open_checkpoint(path))
    np.testing.assert_array_equal(as_f32["model.norm.weight"],
                                  sd["model.norm.weight"].float().numpy())


def test_tensors_ignored_on_purpose_are_accepted(tmp_path: Path) -> None:
    def add_buffers(sd):
        sd = dict(sd)
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        return sd

    path, _ = write_llama(tmp_path, add_buffers, tie=True)
    assert "lm_head.weight" not in load(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path, _ = write_llama(tmp_path, lambda sd: {k: v for k, v in sd.items()
                                                if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(MlccError) as info:
        load(path)
    msg = str(info.value)
    assert msg.startswith("[convert_weight] model.layers.1.self_attn.k_proj.weight: missing from "
                          "the checkpoint (expected shape (16, 64), for "
                          "model.layers.1.self_attn.qkv_proj.weight; searched model.safetensors)")


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    path, _ = write_llama(tmp_path, lambda sd: {**sd, "model.layers.0.self_attn.q_proj.bias":
                                                torch.zeros(64)})
    with pytest.raises(MlccError, match=r"^\[convert_weight\] model.layers.0.self_attn.q_proj.bias:"
                                        r" unexpected tensor in model.safetensors"):
        load(path)


def test_misshaped_tensor_names_expected_found_and_file(tmp_path: Path) -> None:
    path, _ = write_llama(tmp_path, lambda sd: {
        **sd, "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)})
    with pytest.raises(MlccError) as info:
        load(path)
    assert str(info.value) == ("[convert_weight] model.layers.1.mlp.down_proj.weight: expected "
                               "(64, 96), got (64, 95) in model.safetensors")


def test_misshaped_tensor_in_bin(tmp_path: Path) -> None:
    path, sd = write_llama(tmp_path)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(97, 64)
    os.remove(path / "model.safetensors")
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(MlccError, match=r"model.layers.0.mlp.up_proj.weight: expected \(96, 64\), "
                                        r"got \(97, 64\) in pytorch_model.bin$"):
        load(path)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran code"))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path, sd = write_llama(tmp_path)
    os.remove(path / "model.safetensors")
    marker = tmp_path / "ran.txt"
    torch.save({**sd, "payload": _RunsCode(marker)}, path / "pytorch_model.bin")
    with pytest.raises(MlccError, match=r"^\[convert_weight\] pytorch_model.bin: refused to load: "
                                        r"its pickle needs more than plain tensors"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_truncated_files_fail_clearly(tmp_path: Path, fmt: str) -> None:
    path, sd = write_llama(tmp_path)
    if fmt == "pytorch":
        os.remove(path / "model.safetensors")
        torch.save(sd, path / "pytorch_model.bin")
    weights = path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlccError, match=r"truncated or corrupt: download it again") as info:
        load(path)
    assert weights.name in str(info.value) and "\n" not in str(info.value)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    tiny_hf_model("llama").save_pretrained(tmp_path, max_shard_size="60KB")
    second = min(tmp_path.glob("model-00002-of-*.safetensors"))
    os.remove(second)
    with pytest.raises(MlccError, match=rf"{second.name}: listed in "
                                        r"model.safetensors.index.json but missing"):
        open_checkpoint(tmp_path)


def test_source_and_format_selection(tmp_path: Path) -> None:
    path, sd = write_llama(tmp_path)
    torch.save(sd, path / "pytorch_model.bin")
    assert open_checkpoint(path).format == "safetensors"
    assert open_checkpoint(path, source_format="huggingface-torch").format == "pytorch"
    single = open_checkpoint(None, source=path / "pytorch_model.bin")
    assert single.files == (path / "pytorch_model.bin",)
    with pytest.raises(MlccError, match=r"--source-format 'gguf' is not known"):
        open_checkpoint(path, source_format="gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MlccError, match=r"empty: no weight files found"):
        open_checkpoint(empty)
