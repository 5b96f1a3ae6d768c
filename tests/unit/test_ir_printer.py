"""The printed IR: a golden text for a small two-entry module, stability, and symbols by name.

The golden module has annotated parameters, a symbolic prefill and a static decode entry, a
three-way split, a KV cache with a sliding window and sinks, rope scaling given as a mapping, and
function attributes. If the printed form changes on purpose, review the diff this test shows and
write the new text to the golden file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from mlcc import ir
from mlcc.ir import Sym
from mlcc.ir.printer import format_attr

GOLDEN = Path(__file__).parent / "golden" / "ir_printer_tiny_llama.txt"
SEQ = Sym("seq_len")
VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 8, 2, 1, 4


def build_tiny_module() -> ir.Module:
    mb = ir.ModuleBuilder("tiny_llama", {"model_type": "llama", "vocab_size": VOCAB})
    embed = mb.add_param("model.embed_tokens.weight", (VOCAB, HIDDEN), "float32",
                         kind="embedding")
    norm = mb.add_param("model.layers.0.input_layernorm.weight", (HIDDEN,), "float32",
                        kind="norm")
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = mb.add_param("model.layers.0.self_attn.qkv_proj.weight", (qkv_rows, HIDDEN),
                       "float32", kind="linear", shard=("column", 0))
    head = mb.add_param("lm_head.weight", (VOCAB, HIDDEN), "float32", kind="linear")
    cache_type = ir.KVCacheType(1, KV_HEADS, HEAD_DIM, "float16", capacity=48,
                                sliding_window=32, sink_size=4)
    for fn_name, n, attrs in (("prefill", SEQ, {"chunked": True}),
                              ("decode", 1, {"cudagraph": True, "max_batch": 1})):
        with mb.function(fn_name, **attrs) as b:
            tokens = b.input("tokens", (n,), "int32")
            cache = b.kv_cache(cache_type)
            pos = b.positions(cache, n)
            x = b.embedding(embed, tokens, name="x")
            h = b.rms_norm(x, norm, 1e-5, weight_offset=1.0, name="h")
            q, k, v = b.split(b.linear(h, qkv, name="qkv"),
                              [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM],
                              name="q")
            q = b.rope(b.reshape(q, (n, HEADS, HEAD_DIM)), pos, 500000.0, HEAD_DIM,
                       scaling={"rope_type": "linear", "factor": 2.0}, name="q_rot")
            k = b.rope(b.reshape(k, (n, KV_HEADS, HEAD_DIM)), pos, 500000.0, HEAD_DIM,
                       style="interleaved", name="k_rot")
            v = b.reshape(v, (n, KV_HEADS, HEAD_DIM), name="v")
            attn = b.attention(q, k, v, cache, layer=0, scale=0.5, name="attn")
            x = x + b.reshape(attn, (n, HEADS * HEAD_DIM))
            b.output(b.last_logits(b.linear(x, head)), pos)
    return mb.finish()


def test_tiny_module_matches_golden_text():
    module = ir.verify(build_tiny_module())
    text = ir.print_module(module)
    golden = GOLDEN.read_text()
    if text != golden:
        diff = "".join(difflib.unified_diff(golden.splitlines(True), text.splitlines(True),
                                            str(GOLDEN.name), "printed"))
        pytest.fail(f"printed IR differs from {GOLDEN}:\n{diff}")


def test_printing_is_stable_across_builds_and_prints():
    first, second = build_tiny_module(), build_tiny_module()
    assert first is not second
    assert ir.print_module(first) == ir.print_module(second)
    assert ir.print_module(first) == ir.print_module(first)
    decode = first.function("decode")
    assert ir.print_function(decode) == ir.print_function(second.function("decode"))
    assert re.search(r"0x[0-9a-f]+", ir.print_module(first)) is None  # no object addresses


def test_symbols_print_by_name_in_types_attributes_and_signatures():
    batch, total = Sym("batch"), Sym("total_seq_len")
    mb = ir.ModuleBuilder("symbols")
    with mb.function("f") as b:
        x = b.input("x", (batch, total, 4), "float16")
        cache = b.kv_cache(ir.KVCacheType(2, 1, 4, "float16", capacity=8))
        pos = b.positions(cache, total)
        flat = b.reshape(x, (batch, 4, total))
        b.output(flat, pos)
    text = ir.print_function(mb.finish().function("f"))
    assert "%x: f16[batch, total_seq_len, 4]" in text
    assert "positions(%kv_cache, length=total_seq_len) : i32[total_seq_len]" in text
    assert "shape=[batch, 4, total_seq_len]) : f16[batch, 4, total_seq_len]" in text
    assert "-> (f16[batch, 4, total_seq_len], i32[total_seq_len])" in text
    assert "Sym(" not in text and "'batch'" not in text


def test_function_without_attributes_has_no_attribute_braces():
    mb = ir.ModuleBuilder("plain")
    with mb.function("f") as b:
        b.output(b.silu(b.input("x", (3,), "float32")))
    text = ir.print_module(mb.finish())
    assert text.splitlines() == [
        "module plain",
        "",
        "func f(%x: f32[3]) -> (f32[3]) {",
        "  %0 = silu(%x) : f32[3]",
        "  return %0",
        "}",
    ]


@pytest.mark.parametrize(("value", "printed"), [
    (Sym("seq_len"), "seq_len"),
    (True, "true"),
    (False, "false"),
    (None, "none"),
    (1e-05, "1e-05"),
    (2.0, "2.0"),
    (-1, "-1"),
    ("tanh", '"tanh"'),
    ((8, 4, 4), "[8, 4, 4]"),
    ((Sym("seq_len"), 4), "[seq_len, 4]"),
    ((), "[]"),
    ((("factor", 8.0), ("rope_type", "llama3")), '{factor=8.0, rope_type="llama3"}'),
    ({"b": 1, "a": (1, 2)}, "{b=1, a=[1, 2]}"),
])
def test_attribute_values_print_in_one_readable_form(value, printed):
    assert format_attr(value) == printed
