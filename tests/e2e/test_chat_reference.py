"""`mlcc chat` on the real stories260K: convert_weight + gen_config, then chat with the model.

The model runs on the NumPy reference engine (the compiled library is covered by the compile
tests); the replies must reproduce reference.json's greedy continuations, produced by
transformers and cross-checked against llama2.c.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.runtime_check import ChatModule, GenerationConfig, chat_module
from mlcc.runtime_check.reference import ReferenceModel

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CASES = json.loads((STORIES / "reference.json").read_text())["cases"] if STORIES.is_dir() else []
GREEDY_64 = GenerationConfig(temperature=0.0, max_gen_len=64)

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories") / "params"
    runner = CliRunner()
    for command in (
        ["convert_weight", str(STORIES), "--quantization", "q0f32", "-o", str(out)],
        [
            "gen_config",
            str(STORIES),
            "--quantization",
            "q0f32",
            "--conv-template",
            "LM",
            "-o",
            str(out),
        ],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["prompt"])
def test_chat_reproduces_reference_greedy_text(params, case):
    engine = ReferenceModel(params)
    chat = ChatModule(params, engine=engine)
    reply = chat.generate(case["prompt"], GREEDY_64)
    # reference.json's 64 tokens hold no stop token, so the reply is all 64 of them
    assert reply == case["continuation_text"]
    assert engine.total_tokens == len(case["prompt_token_ids"]) + 63


class RecordingEngine:
    """Passes every call to an engine and records the tokens it was given."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[tuple[str, list[int]]] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def reset(self) -> None:
        self.calls.append(("reset", []))
        self.engine.reset()

    def append(self, token_ids):
        self.calls.append(("append", list(token_ids)))
        return self.engine.append(token_ids)

    def decode(self, token_id):
        self.calls.append(("decode", [token_id]))
        return self.engine.decode(token_id)


def test_second_turn_reuses_the_cache_like_a_fresh_prefill(params):
    engine = RecordingEngine(ReferenceModel(params))
    chat = ChatModule(params, engine=engine)
    config = GenerationConfig(temperature=0.0, max_gen_len=16)
    first = chat.generate("Once upon a time", config)
    chat.generate(" Then Tom came to play.", config)
    kinds = [kind for kind, _ in engine.calls]
    assert kinds.count("reset") == 1 and kinds.count("append") == 2  # one sequence throughout
    fed = [t for _, ids in engine.calls for t in ids]
    before_second_reply = len(fed) - 15
    # the cache holds exactly the conversation text (the LM template is plain text)
    text = chat.tokenizer.decode(fed[:before_second_reply])
    assert text == "Once upon a time" + first + " Then Tom came to play."
    # and continuing it gives the tokens that a fresh prefill of the same ids gives
    fresh = ReferenceModel(params)
    logits = fresh.prefill_logits(fed[:before_second_reply])
    expected = []
    for _ in range(15):
        expected.append(int(logits.argmax()))
        logits = fresh.decode(expected[-1])
    assert fed[before_second_reply:] == expected


def test_mlcc_chat_prompt_on_stories(params, monkeypatch):
    (params.parent / "lib.so").write_bytes(b"")
    monkeypatch.setattr(chat_module, "open_engine", lambda lib, p, cfg, dev: ReferenceModel(p))
    case = CASES[0]
    result = CliRunner().invoke(
        app,
        [
            "chat",
            str(params),
            "--prompt",
            case["prompt"],
            "--temperature",
            "0",
            "--max-gen-len",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == case["continuation_text"] + "\n"
