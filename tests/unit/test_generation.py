"""The generation loop: streaming text, stop strings and tokens, limits, config defaults.

Runs on the real stories260K tokenizer with a deterministic bigram engine; expected text comes
from the tokenizers library decoding whole sequences, and greedy tokens from a NumPy argmax walk.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from bigram_engine import STORIES, BigramEngine
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcc.errors import MlccError
from mlcc.runtime_check.generation import (
    GenerationConfig,
    ReplyStream,
    StopRules,
    StopStringFilter,
    generate_reply,
    make_sampler,
)
from mlcc.runtime_check.tokenizer import IncrementalDecoder, load_tokenizer

TOKENIZER = load_tokenizer(STORIES)
GREEDY = GenerationConfig(temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_gen_len=64)
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time", from reference.json


def in_context(prompt, reply_ids):
    """Text that reply_ids add after prompt, decoded by the tokenizers library as a whole."""
    return TOKENIZER.decode([*prompt, *reply_ids])[len(TOKENIZER.decode(prompt)) :]


def run(engine, prompt, rules, config=GREEDY):
    deltas: list[str] = []
    sampler = make_sampler(config, engine.vocab_size, prompt)
    result = generate_reply(engine, prompt, TOKENIZER, sampler, rules, deltas.append)
    return result, deltas


def taught_engine(reply_ids):
    engine = BigramEngine.random()
    engine.teach([PROMPT[-1], *reply_ids])
    return engine


# -- incremental decoding -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["naïve café – 日本語 ok", 'Lily said, "The end." She smiled.', "  two  spaces\tand tab\n"],
)
def test_incremental_deltas_concatenate_to_whole_decode(text):
    ids = TOKENIZER.encode(text)
    decoder = IncrementalDecoder(TOKENIZER)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == TOKENIZER.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_waits_for_a_whole_character():
    ids = TOKENIZER.encode("日")  # "▁" then the three UTF-8 bytes as byte-fallback tokens
    assert len(ids) == 4
    decoder = IncrementalDecoder(TOKENIZER)
    out = [decoder.push(i) for i in ids]
    assert out[1:3] == ["", ""]
    assert "".join(out) == TOKENIZER.decode(ids) == "日"


def test_incremental_decoder_flush_releases_a_partial_character():
    decoder = IncrementalDecoder(TOKENIZER)
    partial = TOKENIZER.encode("日")[:2]
    assert [decoder.push(i) for i in partial][-1] == ""
    assert decoder.flush() == TOKENIZER.decode(partial)


# -- stop strings -----------------------------------------------------------------------------


def test_stop_string_split_over_pushes_is_cut_and_never_shown():
    stops = StopStringFilter(["The end"])
    shown = [stops.push(p) for p in ['Lily said, "T', "he e", "nd.", '"']]
    assert shown == ['Lily said, "', "", "", ""]
    assert stops.stopped


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    stops = StopStringFilter(["The end"])
    assert stops.push("said The e") == "said "
    assert stops.push("arth") == "The earth"
    assert stops.push(" The") == " "
    assert stops.flush() == "The"
    assert not stops.stopped


def test_earliest_of_several_stop_strings_wins():
    stops = StopStringFilter(["USER:", "</s>", ""])
    assert stops.push("fine.</s>USER:") == "fine."
    assert stops.stopped
    assert stops.push("more") == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=40),
    stop_list=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_filter_output_is_text_up_to_first_stop(text, stop_list, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    stops = StopStringFilter(stop_list)
    shown = "".join(stops.push(text[a:b]) for a, b in pairwise(bounds))
    # generation stops after the first piece that completes a stop string; the text is cut
    # where the earliest stop string seen by then begins
    for end in bounds:
        hits = [i for i in (text[:end].find(s) for s in stop_list) if i >= 0]
        if hits:
            assert stops.stopped
            assert shown == text[: min(hits)]
            return
    assert not stops.stopped
    assert shown + stops.flush() == text


def test_stop_found_first_wins_over_one_that_starts_earlier_but_ends_later():
    stops = StopStringFilter([" ", "a a"])
    assert stops.push("aa ") == "aa"  # " " is complete; "a a" is not known yet
    assert stops.stopped


# -- the loop -------------------------------------------------------------------------------


def test_greedy_reply_is_the_argmax_walk():
    engine = BigramEngine.from_stories()
    ids, token = [], PROMPT[-1]
    for _ in range(20):
        token = int(np.argmax(engine.table[token]))
        ids.append(token)
    result, deltas = run(engine, PROMPT, StopRules(max_new_tokens=20))
    assert list(result.token_ids) == ids
    assert result.text == in_context(PROMPT, ids)
    assert result.text.startswith(", ")  # the stories continue "Once upon a time" with ","
    assert "".join(deltas) == result.text
    assert result.finish_reason == "length"


def test_stop_string_across_token_boundaries():
    reply = TOKENIZER.encode('Lily said, "The end." She smiled.')
    assert len(TOKENIZER.encode("The end")) > 2  # the stop string spans several tokens
    result, deltas = run(taught_engine(reply), PROMPT, StopRules(30, stop_strs=("The end",)))
    assert result.text == ' Lily said, "'
    assert "".join(deltas) == result.text
    assert result.finish_reason == "stop_str"
    # generation ended on the token that completed the stop string
    assert TOKENIZER.decode(result.token_ids).endswith("The end")


def test_stop_token_ends_the_reply_and_is_not_fed():
    reply = TOKENIZER.encode("She smiled.")
    engine = taught_engine([*reply, 2])
    result, deltas = run(engine, PROMPT, StopRules(30, stop_token_ids=frozenset({2})))
    assert result.text == " She smiled." == "".join(deltas)
    assert result.finish_reason == "stop_token"
    assert result.token_ids == (*reply, 2)
    assert result.fed_count == len(reply)
    assert engine.sequence == [*PROMPT, *reply]


def test_length_limit_feeds_all_but_the_last_token():
    engine = BigramEngine.from_stories()
    result, _ = run(engine, PROMPT, StopRules(max_new_tokens=7))
    assert len(result.token_ids) == 7 and result.fed_count == 6
    assert engine.sequence == [*PROMPT, *result.token_ids[:6]]
    assert engine.calls == [("append", tuple(PROMPT))] + [
        ("decode", (t,)) for t in result.token_ids[:6]
    ]
    assert result.stats.prefill_tokens == len(PROMPT)
    assert result.stats.decode_tokens == 6


def test_multibyte_reply_streams_whole_characters():
    reply = TOKENIZER.encode("naïve 日 ok")
    result, deltas = run(taught_engine(reply), PROMPT, StopRules(len(reply)))
    assert result.text == in_context(PROMPT, reply) == " naïve 日 ok"
    assert "".join(deltas) == result.text
    assert not any("\ufffd" in d for d in deltas)


def test_seeded_sampling_is_reproducible():
    config = GenerationConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.1, seed=5)
    config = config.filled_from(GREEDY)
    first, _ = run(BigramEngine.from_stories(), PROMPT, StopRules(25), config)
    again, _ = run(BigramEngine.from_stories(), PROMPT, StopRules(25), config)
    other, _ = run(BigramEngine.from_stories(), PROMPT, StopRules(25), GREEDY)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


# -- configuration ----------------------------------------------------------------------------


def test_config_defaults_come_from_chat_config():
    chat = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.05, "max_gen_len": 99}
    defaults = GenerationConfig.from_chat_config(chat)
    assert (defaults.temperature, defaults.top_p) == (0.6, 0.9)
    assert (defaults.repetition_penalty, defaults.max_gen_len) == (1.05, 99)
    mine = GenerationConfig(temperature=0.0, stop_str="Q:").filled_from(defaults)
    assert mine.temperature == 0.0 and mine.top_p == 0.9 and mine.max_gen_len == 99
    assert mine.stop_str == ("Q:",)


def test_config_fallbacks_when_chat_config_leaves_fields_out():
    defaults = GenerationConfig.from_chat_config({"max_gen_len": -1, "temperature": None})
    assert defaults == GenerationConfig(
        temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_gen_len=512
    )


@pytest.mark.parametrize("kwargs", [{"max_gen_len": 0}, {"temperature": -1.0}, {"top_p": 2.0}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(MlccError) as info:
        GenerationConfig(**kwargs)
    assert info.value.stage == "chat"
    assert next(iter(kwargs)) in str(info.value)


# -- reply text -------------------------------------------------------------------------------


def stream(ids, lead="", stops=(), context=PROMPT[-1:]):
    pieces: list[str] = []
    reply = ReplyStream(TOKENIZER, context, stops, lead, pieces.append)
    for token in ids:
        reply.push(token)
    reply.finish()
    assert "".join(pieces) == reply.text
    return reply.text


def test_reply_keeps_its_leading_space_in_context():
    ids = TOKENIZER.encode("with her mom")
    assert stream(ids) == " with her mom"
    assert stream(ids, context=()) == "with her mom"  # alone, the decoder strips it


def test_reply_lead_written_by_the_template_is_dropped():
    ids = TOKENIZER.encode("Hello there")
    assert stream(ids, lead=" ") == "Hello there"
    assert stream(TOKENIZER.encode("[x]"), lead=" [") == "x]"
    # a reply that does not start with the lead is kept whole
    assert stream(TOKENIZER.encode("Hello"), lead=" H!") == " Hello"
    # a reply shorter than the lead is released at the end
    assert stream(TOKENIZER.encode("a"), lead=" ab") == " a"


def test_lead_and_stop_strings_together():
    ids = TOKENIZER.encode("Hi. USER: more")
    assert stream(ids, lead=" ", stops=("USER:",)) == "Hi. "
