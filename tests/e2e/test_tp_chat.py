"""Chat with the real stories260K split over 2 and 4 tensor-parallel shards on the CPU.

convert_weight, gen_config (with --tensor-parallel-shards) and compile (with `--overrides
tensor_parallel_shards=N`) run through the CLI, and ChatModule runs the library as N ranks in
threads from the one unsharded params folder. Replies must reproduce reference.json's greedy
continuations (transformers, cross-checked with llama2.c), as the unsharded model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.runtime_check import ChatModule, GenerationConfig
from mlcc.runtime_check.compiled import read_metadata

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CASES = json.loads((STORIES / "reference.json").read_text())["cases"] if STORIES.is_dir() else []
GREEDY_64 = GenerationConfig(temperature=0.0, max_gen_len=64)

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not present")


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories_tp") / "params"
    runner = CliRunner()
    for command in (
        ["convert_weight", str(STORIES), "--quantization", "q0f32", "-o", str(out)],
        ["gen_config", str(STORIES), "--quantization", "q0f32", "--conv-template", "LM",
         "--tensor-parallel-shards", "2", "-o", str(out)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return out


def sharded_library(params: Path, shards: int) -> Path:
    lib = params.parent / f"lib_tp{shards}.so"
    if not lib.is_file():
        result = CliRunner().invoke(app, [
            "compile", str(params / "mlc-chat-config.json"), "--device", "cpu", "--overrides",
            f"tensor_parallel_shards={shards}", "-o", str(lib)])
        assert result.exit_code == 0, result.output
    return lib


def test_compile_overrides_build_a_library_for_that_many_shards(params):
    import tvm

    lib = tvm.runtime.load_module(str(sharded_library(params, 2)))
    assert read_metadata(lib)["tensor_parallel"]["shards"] == 2


def test_mlcc_chat_runs_a_sharded_library_as_its_ranks(params):
    """The CLI needs no shard option: the library says how many ranks it needs."""
    lib = sharded_library(params, 2)
    case = CASES[0]
    result = CliRunner().invoke(app, ["chat", str(params), "--model-lib-path", str(lib),
                                      "--temperature", "0", "--max-gen-len", "64",
                                      "--prompt", case["prompt"]])
    assert result.exit_code == 0, result.output
    assert case["continuation_text"] in result.output


@pytest.mark.slow
@pytest.mark.parametrize("shards", [2, 4])
def test_chat_over_shards_reproduces_reference_greedy_text(params, shards):
    chat_config = json.loads((params / "mlc-chat-config.json").read_text())
    assert chat_config["tensor_parallel_shards"] == 2  # recorded by gen_config
    chat = ChatModule(params, model_lib_path=sharded_library(params, shards),
                      tensor_parallel_shards=shards)
    try:
        for case in CASES[:2]:
            chat.reset_chat()
            assert chat.generate(case["prompt"], GREEDY_64) == case["continuation_text"]
        case = CASES[2]
        tokens = chat.engine.generate_greedy(case["prompt_token_ids"], 64)
        assert tokens == case["greedy_token_ids"]
    finally:
        chat.engine.close()
