"""A whole Llama composed by hand from the backend API, against the real stories260K reference.

The prefill and decode entries are written directly with EntryBuilder and the kernel generators
(no IR, no passes): embedding, fused residual-add + RMSNorm, fused QKV projection, rope, paged
KV append, GQA attention, SwiGLU MLP and a last-row lm_head. The library runs through the
runtime session; greedy tokens must equal reference.json (produced with HF transformers and
cross-checked with llama2.c) and the first-step top-5 logits must agree within its tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlcc.backends.build import build_library
from mlcc.backends.entry import EntryBuilder
from mlcc.backends.layouts import PagedKVSpec
from mlcc.backends.llvm import kernels as K
from mlcc.backends.llvm import linear as L
from mlcc.backends.llvm import paged_attention as A
from mlcc.runtime_check.tvm_runtime import load_library

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CHUNK, PAGES = 8, 8  # prefill chunk (seq_len bound); 8 pages of 16 = 128 positions
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models")


def fused_params(weights: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """HF tensors -> mlcc parameters (q|k|v and gate|up concatenated along the rows)."""
    out = {"model.embed_tokens.weight": weights["model.embed_tokens.weight"],
           "model.norm.weight": weights["model.norm.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = weights[p + "input_layernorm.weight"]
        out[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [weights[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "self_attn.o_proj.weight"] = weights[p + "self_attn.o_proj.weight"]
        out[p + "post_attention_layernorm.weight"] = weights[p + "post_attention_layernorm.weight"]
        out[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        out[p + "mlp.down_proj.weight"] = weights[p + "mlp.down_proj.weight"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


class LlamaKernels:
    """One kernel per distinct shape, shared by all layers."""

    def __init__(self, cfg: dict, rows, tag: str, spec: PagedKVSpec) -> None:
        h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d, eps, f32 = h // hq, cfg["rms_norm_eps"], "float32"
        self.embed = K.embedding(f"{tag}_embed", rows, vocab, h, f32)
        self.norm = K.rms_norm(f"{tag}_norm", rows, h, f32, eps)
        self.add_norm = K.rms_norm(f"{tag}_add_norm", rows, h, f32, eps, residual=True)
        self.qkv = L.linear(f"{tag}_qkv", rows, h, (hq + 2 * hkv) * d, f32)
        self.rope = A.rope(f"{tag}_rope", rows, hq, hkv, d, d, cfg["rope_theta"], f32)
        self.append = A.kv_append(f"{tag}_append", rows, hq, spec, f32)
        self.attend = A.attention(f"{tag}_attend", rows, hq, spec, f32)
        self.o_proj = L.linear(f"{tag}_o_proj", rows, hq * d, h, f32)
        self.gate_up = L.linear(f"{tag}_gate_up", rows, h, 2 * inter, f32)
        self.silu_mul = K.silu_mul(f"{tag}_silu_mul", rows, inter, f32)
        self.down = L.linear(f"{tag}_down", rows, inter, h, f32)
        self.head = L.linear(f"{tag}_head", rows, h, vocab, f32, last_row=True)


def llama_entry(name: str, rows, cfg: dict, params: dict[str, np.ndarray],
                spec: PagedKVSpec):
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, f32 = h // hq, "float32"
    k = LlamaKernels(cfg, rows, name, spec)
    eb = EntryBuilder(name, {"seq_len": CHUNK})
    tokens = eb.arg("tokens", (rows,), "int32", role="tokens")
    info = eb.arg("seq_info", (2,), "int32", role="seq_info")
    table = eb.arg("page_table", (PAGES,), "int32", role="page_table")
    pool = eb.arg("kv_pool", (layers,) + spec.page_shape, f32, role="kv_cache")
    w = {n: eb.param(n, a.shape, f32) for n, a in params.items()}
    logits = eb.arg("logits", (cfg["vocab_size"],), f32, role="logits")
    res = [eb.temp("res0", (rows, h), f32), eb.temp("res1", (rows, h), f32)]
    x, attn_out = eb.temp("x", (rows, h), f32), eb.temp("proj", (rows, h), f32)
    qkv = eb.temp("qkv", (rows, (hq + 2 * hkv) * d), f32)
    attn = eb.temp("attn", (rows, hq * d), f32)
    gate_up, act = eb.temp("gate_up", (rows, 2 * inter), f32), eb.temp("act", (rows, inter), f32)
    layer_bytes = int(np.prod(spec.page_shape)) * 4
    eb.call(k.embed, [tokens, w["model.embed_tokens.weight"], res[0]])
    eb.call(k.norm, [res[0], w["model.layers.0.input_layernorm.weight"], x])
    cur = 0
    for i in range(layers):
        p = f"model.layers.{i}."
        pages = eb.view(pool, f"kv_pages_{i}", spec.page_shape, f32, i * layer_bytes)
        eb.call(k.qkv, [x, w[p + "self_attn.qkv_proj.weight"], qkv])
        eb.call(k.rope, [qkv, info])
        eb.call(k.append, [qkv, pages, table, info])
        eb.call(k.attend, [qkv, pages, table, info, attn])
        eb.call(k.o_proj, [attn, w[p + "self_attn.o_proj.weight"], attn_out])
        eb.call(k.add_norm, [attn_out, res[cur], w[p + "post_attention_layernorm.weight"], x,
                             res[1 - cur]])
        cur = 1 - cur
        eb.call(k.gate_up, [x, w[p + "mlp.gate_up_proj.weight"], gate_up])
        eb.call(k.silu_mul, [gate_up, act])
        eb.call(k.down, [act, w[p + "mlp.down_proj.weight"], attn_out])
        following = f"model.layers.{i + 1}.input_layernorm.weight"
        norm = w[following] if i + 1 < layers else w["model.norm.weight"]
        eb.call(k.add_norm, [attn_out, res[cur], norm, x, res[1 - cur]])
        cur = 1 - cur
    eb.call(k.head, [x, w["model.embed_tokens.weight"], logits])
    return eb.finish(), eb.kernels


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    from safetensors.numpy import load_file

    cfg = json.loads((STORIES / "config.json").read_text())
    params = fused_params(load_file(str(STORIES / "model.safetensors")),
                          cfg["num_hidden_layers"])
    hkv, d = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    spec = PagedKVSpec(hkv, d, "float32", PAGES)
    kernels, entries = {}, []
    for name, rows in (("prefill", "seq_len"), ("decode", 1)):
        entry, used = llama_entry(name, rows, cfg, params, spec)
        entries.append(entry)
        kernels.update(used)
    path = tmp_path_factory.mktemp("stories") / "stories.so"
    meta = {"model_type": "llama", "quantization": "q0f32",
            "params": [{"name": n, "shape": list(a.shape), "dtype": "float32"}
                       for n, a in params.items()]}
    built = build_library(kernels, entries, meta, "cpu", path)
    layers = cfg["num_hidden_layers"]
    assert built["kv_cache"]["kv_pool"]["shape"] == [layers, *spec.page_shape]
    assert built["memory"]["kv_cache_bytes"] == layers * PAGES * 2 * hkv * 16 * d * 4
    return load_library(path).session(params)


def test_greedy_tokens_and_first_logits_match_the_reference(stories):
    reference = json.loads((STORIES / "reference.json").read_text())
    tolerance = reference["suggested_tolerance"]["first_step_logits_abs_fp32"]
    for case in reference["cases"]:
        ids = case["prompt_token_ids"]
        stories.reset()
        for start in range(0, len(ids), CHUNK):
            logits = stories.run("prefill", ids[start:start + CHUNK])
        top = case["first_step_top5"]
        np.testing.assert_allclose(logits[top["ids"]], top["logits"], atol=tolerance)
        generated = []
        budget = PAGES * 16 - len(ids)
        for _ in range(min(len(case["greedy_token_ids"]), budget)):
            generated.append(int(np.argmax(logits)))
            logits = stories.run("decode", [generated[-1]])
        assert generated == case["greedy_token_ids"][:len(generated)]
