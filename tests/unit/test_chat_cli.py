"""`mlcc chat` and `mlcc bench` with the bigram engine injected through `open_engine`."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from bigram_engine import STORIES, BigramEngine, write_params_dir
from tokenizers import Tokenizer
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.frontend.conv_templates import get_template
from mlcc.runtime_check import chat_module

RAW = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
REFERENCE = json.loads((STORIES / "reference.json").read_text())["cases"]
LM = get_template("LM").to_json()


@pytest.fixture
def params(tmp_path, monkeypatch):
    """A params folder with a lib.so next to it; engines created by the CLI are recorded."""
    folder = write_params_dir(tmp_path / "params", LM, context_window_size=64)
    (tmp_path / "lib.so").write_bytes(b"")
    engines: list[BigramEngine] = []

    def fake_open(lib, params_dir, chat_config, device):
        assert lib == (tmp_path / "lib.so").resolve() and params_dir == folder
        engines.append(BigramEngine.from_stories(context_window_size=64))
        return engines[-1]

    monkeypatch.setattr(chat_module, "open_engine", fake_open)
    return SimpleNamespace(path=folder, engines=engines)


def greedy_text(engine: BigramEngine, last_prompt_token: int, n: int) -> str:
    ids, token = [], last_prompt_token
    for _ in range(n):
        token = int(np.argmax(engine.table[token]))
        ids.append(token)
    # decoded after the prompt's last token, as the reply is, so a leading space is kept
    whole = RAW.decode([last_prompt_token, *ids])
    return whole[len(RAW.decode([last_prompt_token])) :]


def invoke(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def test_chat_prompt_answers_once(params):
    result = invoke("chat", params.path, "--prompt", "Once upon a time", "--max-gen-len", "12")
    assert result.exit_code == 0, result.output
    expected = greedy_text(params.engines[0], 378, 12)
    assert result.stdout == expected + "\n"
    assert params.engines[0].fed_chunks()[0] == tuple(REFERENCE[0]["prompt_token_ids"])


def test_chat_sampling_options_reach_the_sampler(params):
    args = ("chat", params.path, "--prompt", "Once upon a time", "--max-gen-len", "12")
    sampled = [
        invoke(*args, "--temperature", "1.5", "--top-p", "0.9", "--seed", str(s)).stdout
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    greedy = invoke(*args, "--temperature", "0").stdout
    assert greedy == greedy_text(params.engines[-1], 378, 12) + "\n"
    bad = invoke(*args, "--top-p", "1.5")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: [chat] top_p must be in (0, 1], got 1.5"


def test_repl_commands(params):
    lines = ["Once upon a time", "/stats", "/help", "/reset", "/bogus", "The dog", "/exit", "x"]
    result = invoke("chat", params.path, "--max-gen-len", "6", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    engine = params.engines[0]
    assert greedy_text(engine, 378, 6) in out
    assert re.search(r"prefill: \d+\.\d tok/s, decode: \d+\.\d tok/s", out)
    assert "/reset" in out and "/exit" in out  # the help text
    assert "The conversation was reset." in out
    assert "unknown command /bogus" in out
    # after /reset the second prompt starts a fresh sequence; "x" after /exit is never sent
    assert engine.fed_chunks()[-1] == tuple(REFERENCE[2]["prompt_token_ids"])
    assert len(engine.fed_chunks()) == 2


def test_repl_reports_a_failed_message_and_goes_on(params):
    too_long = "Once upon a time there was a dog who liked to run in the park. " * 3
    result = invoke("chat", params.path, "--max-gen-len", "4", input=f"{too_long}\nThe dog\n")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"error: \[chat\] prompt has \d+ tokens, more than the context window of 64", result.stdout
    )
    assert params.engines[0].fed_chunks() == [tuple(REFERENCE[2]["prompt_token_ids"])]


def test_chat_without_library_fails_in_one_line(tmp_path):
    folder = write_params_dir(tmp_path / "params", LM)
    result = invoke("chat", folder, "--prompt", "hi")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: [chat] no model library (*.so) in ")
    assert "pass --model-lib-path" in lines[0]


def test_bench_reports_throughput(params):
    result = invoke("bench", params.path, "--prompt", "Once upon a time", "--generate-length", "20")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"prefill: 5 tokens in \d+\.\d\d ms, decode: 19 steps in \S+ ms", lines[0])
    assert re.fullmatch(r"prefill: \d+\.\d tok/s, decode: \d+\.\d tok/s", lines[1])
    decodes = [c for c in params.engines[0].calls if c[0] == "decode"]
    assert len(decodes) == 3 + 19  # a 4-token warm-up, then the measured run


def test_repl_ends_at_end_of_input(params):
    result = invoke("chat", params.path, "--max-gen-len", "3", input="Once upon a time\n")
    assert result.exit_code == 0, result.output
    assert len(params.engines[0].fed_chunks()) == 1
