"""ChatModule over a bigram engine: loading, multi-turn KV reuse, stops, overflow, benchmark.

The expected token streams are the tokenizers library's encoding of the conversation rendered
by the frontend's templates, and stories260K's reference.json for the first prompt.
"""

from __future__ import annotations

import json
import re

import pytest
from bigram_engine import STORIES, BigramEngine, write_params_dir
from tokenizers import Tokenizer

from mlcc.errors import MlccError
from mlcc.frontend.conv_templates import get_template, render_prompt
from mlcc.runtime_check import ChatModule, GenerationConfig
from mlcc.runtime_check import chat_module as chat_module_lib

RAW = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
LM = get_template("LM").to_json()
VICUNA = get_template("vicuna_v1.1").with_system_message("Be kind.").to_json()
REFERENCE = json.loads((STORIES / "reference.json").read_text())["cases"]


def encode(text: str) -> list[int]:
    return RAW.encode(text, add_special_tokens=False).ids


def canonical(template: dict, messages) -> list[int]:
    """Ids of a conversation encoded from scratch: prefix ids + the rendered text."""
    tmpl = get_template(template["name"]).with_system_message(template["system_message"])
    return [*template["system_prefix_token_ids"], *encode(render_prompt(tmpl, messages))]


def in_context(before: str, text: str) -> list[int]:
    """Ids that `text` adds when it follows `before` (how a model would generate it)."""
    head, whole = encode(before), encode(before + text)
    assert whole[: len(head)] == head
    return whole[len(head) :]


@pytest.fixture
def chat_factory(tmp_path):
    def make(template=VICUNA, engine=None, **config):
        params = write_params_dir(tmp_path / "params", template, **config)
        window = config.get("context_window_size", 512)
        engine = engine or BigramEngine.random(context_window_size=window)
        return ChatModule(params, engine=engine), engine

    return make


# -- loading --------------------------------------------------------------------------------


def test_missing_params_folder(tmp_path):
    with pytest.raises(MlccError, match=r"^\[chat\] .*nope: params folder not found"):
        ChatModule(tmp_path / "nope", engine=BigramEngine.random())


def test_missing_chat_config(tmp_path):
    with pytest.raises(MlccError, match=r"mlc-chat-config.json: not found; run `mlcc gen_config"):
        ChatModule(tmp_path, engine=BigramEngine.random())


def test_broken_chat_config(tmp_path):
    (tmp_path / "mlc-chat-config.json").write_text("{ not json")
    with pytest.raises(MlccError, match=r"not valid JSON"):
        ChatModule(tmp_path, engine=BigramEngine.random())


def test_missing_tokenizer(tmp_path):
    params = write_params_dir(tmp_path / "params", LM)
    (params / "tokenizer.json").unlink()
    with pytest.raises(MlccError, match=r"tokenizer.json: tokenizer file not found"):
        ChatModule(params, engine=BigramEngine.random())


def test_missing_library(tmp_path):
    params = write_params_dir(tmp_path / "params", LM)
    with pytest.raises(MlccError, match=r"lib.so: model library not found; build it with"):
        ChatModule(params, model_lib_path=tmp_path / "lib.so")
    with pytest.raises(MlccError, match=r"no model library \(\*.so\) in .*--model-lib-path"):
        ChatModule(params)
    (tmp_path / "a.so").write_bytes(b"")
    (params / "b.so").write_bytes(b"")
    with pytest.raises(MlccError, match=r"several model libraries .*a.so.*b.so"):
        ChatModule(params)


def test_library_is_found_above_the_params_folder(tmp_path, monkeypatch):
    params = write_params_dir(tmp_path / "params", LM)
    (tmp_path / "lib.so").write_bytes(b"")
    opened = []

    def fake_open(lib, params_dir, chat_config, device):
        opened.append((lib, params_dir, chat_config["model_type"], device))
        return BigramEngine.random()

    monkeypatch.setattr(chat_module_lib, "open_engine", fake_open)
    ChatModule(params / "mlc-chat-config.json", device="cuda:1")
    assert opened == [((tmp_path / "lib.so").resolve(), params, "llama", "cuda:1")]


def test_tokenizer_larger_than_model_vocab(chat_factory):
    with pytest.raises(MlccError, match=r"512 tokens but the model's vocab_size is 100"):
        chat_factory(engine=BigramEngine.random(vocab_size=100))


# -- prompts and turns ------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["prompt"])
def test_first_prompt_tokens_match_reference(chat_factory, case):
    chat, engine = chat_factory(LM)
    chat.generate(case["prompt"], GenerationConfig(max_gen_len=1))
    assert engine.fed_chunks() == [tuple(case["prompt_token_ids"])]


def test_second_turn_feeds_only_new_tokens(chat_factory):
    chat, engine = chat_factory(VICUNA)
    first = [("user", "Hi"), ("assistant", None)]
    prompt_ids = canonical(VICUNA, first)
    reply_ids = in_context(render_prompt(get_template_from(VICUNA), first), " Hello there.")
    engine.teach([prompt_ids[-1], *reply_ids, 2])
    deltas: list[str] = []
    reply = chat.generate("Hi", progress_callback=deltas.append)
    assert reply == "Hello there." == "".join(deltas)

    chat.generate("Tell me more")
    whole = canonical(
        VICUNA,
        [
            ("user", "Hi"),
            ("assistant", "Hello there."),
            ("user", "Tell me more"),
            ("assistant", None),
        ],
    )
    first_chunk, second_chunk = engine.fed_chunks()
    assert engine.resets() == 1  # only the one of ChatModule's construction
    assert list(first_chunk) == prompt_ids
    # the cache held prompt + reply; the second turn appends exactly the rest of the conversation
    assert engine.sequence[: len(whole)] == whole
    assert list(second_chunk) == whole[len(prompt_ids) + len(reply_ids) :]
    assert len(second_chunk) < len(whole) // 2


def get_template_from(template_json):
    return get_template(template_json["name"]).with_system_message(template_json["system_message"])


def test_reply_cut_by_length_feeds_its_last_token_next_turn(chat_factory):
    chat, engine = chat_factory(LM, engine=BigramEngine.from_stories())
    reply = chat.generate("Once upon a time", GenerationConfig(max_gen_len=6))
    reply_ids = [int(t) for t in engine.sequence[5:]]
    assert len(reply_ids) == 5  # the 6th sampled token was not fed
    chat.generate("Tom", GenerationConfig(max_gen_len=1))
    assert engine.resets() == 1
    second = engine.fed_chunks()[1]
    assert RAW.decode([*reply_ids, second[0]]) == reply
    # the cache now holds exactly the conversation text, the LM template being plain text
    assert RAW.decode(engine.sequence) == "Once upon a time" + reply + "Tom"


def test_stop_string_reply_is_cut_and_cache_rebuilt(chat_factory):
    template = dict(VICUNA, stop_str=["USER:"])
    chat, engine = chat_factory(template)
    first = [("user", "Hi"), ("assistant", None)]
    prompt_ids = canonical(template, first)
    reply_ids = in_context(render_prompt(get_template_from(template), first), " Good.USER:")
    engine.teach([prompt_ids[-1], *reply_ids])
    deltas: list[str] = []
    assert chat.generate("Hi", progress_callback=deltas.append) == "Good."
    assert "".join(deltas) == "Good."
    assert chat.history == [("user", "Hi"), ("assistant", "Good.")]
    # the engine holds "USER:" tokens that the conversation text no longer has: prefill again
    chat.generate("Again", GenerationConfig(max_gen_len=1))
    assert engine.resets() == 2
    whole = canonical(
        template, [("user", "Hi"), ("assistant", "Good."), ("user", "Again"), ("assistant", None)]
    )
    assert list(engine.fed_chunks()[-1]) == whole


def test_config_stop_tokens_and_strings(chat_factory):
    chat, engine = chat_factory(LM, eos_token_id=[2, 5])
    ids = encode("Lily said hi. The end")
    engine.teach([378, *ids, 5, 9])
    assert chat.generate("Once upon a time") == " Lily said hi. The end"
    chat.reset_chat()
    config = GenerationConfig(stop_str=("said",))
    assert chat.generate("Once upon a time", config) == " Lily "
    chat.reset_chat()
    config = GenerationConfig(ignore_eos=True, max_gen_len=len(ids) + 2)
    expected = RAW.decode([378, *ids, 5, 9])[len(RAW.decode([378])) :]
    assert chat.generate("Once upon a time", config) == expected


def test_max_gen_len_and_stats(chat_factory):
    chat, engine = chat_factory(LM)
    assert chat.stats() == "prefill: 0.0 tok/s, decode: 0.0 tok/s"
    chat.generate("Once upon a time", GenerationConfig(max_gen_len=9))
    assert engine.total_tokens == 5 + 8
    assert re.fullmatch(r"prefill: \d+\.\d tok/s, decode: \d+\.\d tok/s", chat.stats())
    assert chat.last_stats.prefill_tokens == 5 and chat.last_stats.decode_tokens == 8


def test_reset_chat_starts_from_scratch(chat_factory):
    chat, engine = chat_factory(LM)
    chat.generate("Once upon a time", GenerationConfig(max_gen_len=3))
    chat.reset_chat()
    assert chat.history == []
    chat.generate("The dog", GenerationConfig(max_gen_len=3))
    assert engine.resets() == 2
    assert list(engine.fed_chunks()[-1]) == REFERENCE[2]["prompt_token_ids"]


def test_seeded_generation_is_reproducible(chat_factory):
    config = GenerationConfig(temperature=1.0, top_p=0.95, seed=3, max_gen_len=20)
    chat, _ = chat_factory(LM, engine=BigramEngine.from_stories())
    first = chat.generate("Once upon a time", config)
    chat.reset_chat()
    assert chat.generate("Once upon a time", config) == first


# -- context window -------------------------------------------------------------------------


def test_overflow_drops_oldest_turns_and_prefills_again(chat_factory):
    window = 120
    chat, engine = chat_factory(VICUNA, context_window_size=window, mean_gen_len=16, max_gen_len=12)
    prompts = [f"Question {n}: what is it?" for n in range(8)]
    shifts = 0
    for prompt in prompts:
        resets = engine.resets()
        chat.generate(prompt)  # the engine raises if its window would overflow
        assert engine.total_tokens <= window
        if engine.resets() > resets:
            kept = canonical(VICUNA, [*chat.history[:-1], ("assistant", None)])
            shifts += 1
            # prefilled from scratch: the kept turns fit in shift_fill_factor of the window
            prefill = list(engine.fed_chunks()[-1])
            assert prefill == kept
            assert len(prefill) <= 0.3 * window or len(chat.history) == 2
    assert shifts >= 2
    assert chat.history[-2] == ("user", prompts[-1])
    assert ("user", prompts[0]) not in chat.history


def test_prompt_longer_than_window_is_refused(chat_factory):
    chat, engine = chat_factory(LM, context_window_size=24)
    prompt = "Once upon a time there was a dog who liked to run in the park every day."
    n = 1 + len(encode(prompt))
    assert n >= 24
    with pytest.raises(MlccError) as info:
        chat.generate(prompt)
    assert str(info.value).startswith(
        f"[chat] prompt has {n} tokens, more than the context window of 24"
    )
    assert engine.total_tokens == 0


def test_generation_stops_when_the_window_is_full(chat_factory):
    chat, engine = chat_factory(LM, context_window_size=12, mean_gen_len=4, max_gen_len=50)
    chat.generate("Once upon a time")  # 5 prompt tokens leave room for 7
    assert chat.last_stats.decode_tokens == 6  # the 7th sampled token is not fed
    assert engine.total_tokens == 11


def test_sliding_window_never_shifts(chat_factory):
    engine = BigramEngine.random(context_window_size=-1, sliding_window_size=64)
    chat, _ = chat_factory(VICUNA, engine=engine, context_window_size=-1, max_gen_len=10)
    for n in range(6):
        chat.generate(f"Question {n}?")
    assert engine.resets() == 1
    assert len(chat.history) == 12
    assert engine.total_tokens > 64


# -- benchmark ------------------------------------------------------------------------------


def test_benchmark_generates_exactly_the_length_ignoring_stops(chat_factory):
    chat, engine = chat_factory(LM)
    engine.teach([378, 2])  # "time" is followed by the stop token
    assert chat.generate("Once upon a time") == ""
    text = chat.benchmark_generate("Once upon a time", 20)
    decodes = [ids for kind, ids in engine.calls if kind == "decode"]
    assert len(decodes) == 19 and decodes[0] == (2,)
    assert chat.last_stats.decode_tokens == 19 and chat.last_stats.prefill_tokens == 5
    assert isinstance(text, str)
    assert chat.history == [] and engine.total_tokens == 0


def test_benchmark_refuses_lengths_beyond_the_window(chat_factory):
    chat, _ = chat_factory(LM, context_window_size=16)
    with pytest.raises(MlccError, match=r"^\[bench\] prompt \(5 tokens\) \+ generate length"):
        chat.benchmark_generate("Once upon a time", 12)


def test_template_given_by_name(chat_factory):
    chat, engine = chat_factory("LM")
    assert chat.conv_template == get_template("LM")
    chat.generate("The dog", GenerationConfig(max_gen_len=1))
    assert list(engine.fed_chunks()[0]) == REFERENCE[2]["prompt_token_ids"]
