"""`mlcc gen_config` end to end: the real stories260K folder and folders assembled here from
../shared/configs and ../shared/tokenizers.

Values are checked against the HF files themselves (config.json, generation_config.json,
reference.json token ids, sentencepiece); bad inputs must fail with one line and write nothing.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

from mlcc.cli import app
from mlcc.frontend import get_architecture
from mlcc.frontend.conv_templates import get_template

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CONFIGS = SHARED / "configs"
TOKENIZERS = SHARED / "tokenizers"

FIELDS = [
    "model_type", "quantization", "model_config", "vocab_size", "context_window_size",
    "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
    "mean_gen_len", "max_gen_len", "shift_fill_factor", "temperature", "repetition_penalty",
    "top_p", "conv_template", "pad_token_id", "bos_token_id", "eos_token_id", "tokenizer_files",
    "version",
]
SAMPLE = "The quick brown fox jumps over the lazy dog. Ünïcödé café 你好 🦙\n  def f(x): return 42"

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{SHARED} not present")


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, ["gen_config", *map(str, args)])


def gen(source: str | Path, out: Path, template: str = "LM", *extra: str | Path):
    """The documented command with quantization q4f16_1 and optional extra options."""
    return run_cli(source, "--quantization", "q4f16_1", "--conv-template", template, "-o", out,
                   *extra)


def log_lines(result) -> list[str]:
    return result.stderr.splitlines()


def make_model_dir(root: Path, config: str, tokenizer: str | None) -> Path:
    """An HF-style folder: a shared config.json plus the files of a shared tokenizer."""
    folder = root / f"{config}+{tokenizer}"
    folder.mkdir()
    shutil.copy(CONFIGS / config / "config.json", folder / "config.json")
    if tokenizer is not None:
        for item in (TOKENIZERS / tokenizer).iterdir():
            if item.name.endswith(".gz"):
                with gzip.open(item) as packed:
                    (folder / item.name[:-3]).write_bytes(packed.read())
            elif item.name != "README.md":
                shutil.copy(item, folder / item.name)
    return folder


def read_config(out: Path) -> dict:
    return json.loads((out / "mlc-chat-config.json").read_text())


def mlcc_process(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcc.cli", *map(str, args)],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The documented command, run as a process, into a folder that already holds weights."""
    out = tmp_path_factory.mktemp("stories") / "params"
    out.mkdir()
    (out / "ndarray-cache.json").write_text("{}")
    result = mlcc_process("gen_config", STORIES, "--quantization", "q4f16_1",
                          "--conv-template", "LM", "-o", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_stories260k_config_values(stories_run):
    out, _ = stories_run
    config = read_config(out)
    assert list(config) == FIELDS
    hf = json.loads((STORIES / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization"] == "q4f16_1"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings"):
        assert config["model_config"][key] == hf[key], key
    assert config["vocab_size"] == 512
    assert config["context_window_size"] == hf["max_position_embeddings"] == 512
    assert (config["sliding_window_size"], config["prefill_chunk_size"]) == (-1, 512)
    assert (config["attention_sink_size"], config["tensor_parallel_shards"]) == (0, 1)
    assert config["model_config"]["max_batch_size"] == 1
    generation = [config[k] for k in FIELDS[9:15]]
    assert generation == [128, 512, 0.3, 0.7, 1.0, 0.95]
    assert config["conv_template"] == get_template("LM").to_json()
    assert [config[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")] == [None, 1, 2]
    assert config["version"] == "0.1.0"
    model_config = get_architecture("llama").config_cls.from_json(config["model_config"])
    assert model_config.to_json() == config["model_config"]


def test_stories260k_files_and_log(stories_run):
    out, result = stories_run
    names = read_config(out)["tokenizer_files"]
    assert names == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert (out / name).read_bytes() == (STORIES / name).read_bytes()
    # The weights stay untouched and no temporary file is left.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mlc-chat-config.json", "ndarray-cache.json", *names])
    assert (out / "ndarray-cache.json").read_text() == "{}"
    # Every default is one log line; values found in the HF files are not logged as defaults.
    lines = result.stderr.splitlines()
    for line in ("prefill_chunk_size = 512 (default: min(context_window_size, 2048))",
                 "temperature = 0.7 (default)", "top_p = 0.95 (default)",
                 "pad_token_id = null (default)", "max_batch_size = 1 (default)"):
        assert f"[gen_config] {line}" in lines
    assert not any("bos_token_id" in line or "eos_token_id" in line for line in lines)
    assert all(line.startswith("[gen_config] ") for line in lines)
    assert result.stdout == ""


def test_stories260k_tokenizer_gives_reference_prompt_ids(stories_run):
    out, _ = stories_run
    reference = json.loads((STORIES / "reference.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    for case in reference["cases"]:
        assert tokenizer.encode(case["prompt"]).ids == case["prompt_token_ids"]


@pytest.mark.parametrize(
    "config_dir, tokenizer, template, expected",
    [
        ("meta-llama--Llama-2-7b-chat-hf", "llama2-sentencepiece", "llama-2",
         {"context_window_size": 4096, "sliding_window_size": -1, "prefill_chunk_size": 2048,
          "attention_sink_size": 0, "eos_token_id": 2, "bos_token_id": 1,
          "tokenizer_files": ["tokenizer.json", "tokenizer.model"]}),
        ("meta-llama--Llama-2-7b-chat-hf", "llama2", "llama-2",
         {"context_window_size": 4096, "prefill_chunk_size": 2048,
          "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"]}),
        ("mistralai--Mistral-7B-v0.1", "mistral", "mistral_default",
         {"model_type": "mistral", "context_window_size": -1, "sliding_window_size": 4096,
          "prefill_chunk_size": 128, "attention_sink_size": 4}),
        ("meta-llama--Llama-3.1-8B", "llama3", "llama-3",
         {"context_window_size": 131072, "prefill_chunk_size": 2048, "bos_token_id": 128000,
          "eos_token_id": [128001, 128008, 128009], "vocab_size": 128256}),
        ("meta-llama--Llama-2-13b-hf", "llama2", "LM",
         {"context_window_size": 2048, "prefill_chunk_size": 2048, "pad_token_id": 0}),
        ("togethercomputer--RedPajama-INCITE-Chat-3B-v1", None, "redpajama_chat",
         {"model_type": "gpt_neox", "context_window_size": 2048, "bos_token_id": 0,
          "eos_token_id": 0, "tokenizer_files": []}),
    ],
    ids=["llama2-sentencepiece", "llama2-json", "mistral", "llama3", "llama2-13b", "redpajama"],
)
def test_shared_configs_with_shared_tokenizers(tmp_path, config_dir, tokenizer, template,
                                               expected):
    model = make_model_dir(tmp_path, config_dir, tokenizer)
    out = tmp_path / "out"
    result = gen(model, out, template)
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert list(config) == FIELDS
    for key, value in expected.items():
        assert config[key] == value, key
    assert config["conv_template"]["name"] == template
    names = config["tokenizer_files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["mlc-chat-config.json", *names])
    for name in names:
        if (model / name).exists():
            assert (out / name).read_bytes() == (model / name).read_bytes()
    if tokenizer is None:
        assert any("no tokenizer files in" in line for line in log_lines(result))
        return
    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    if (model / "tokenizer.json").exists():
        source = Tokenizer.from_file(str(model / "tokenizer.json"))
        assert written.encode(SAMPLE).ids == source.encode(SAMPLE).ids
    else:
        spm = pytest.importorskip("sentencepiece")
        sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
        assert written.encode(SAMPLE, add_special_tokens=False).ids == sp.encode(SAMPLE)
        assert "[gen_config] tokenizer.json converted from" in result.stderr


def test_llama3_stop_tokens_include_every_eos(tmp_path: Path):
    model = make_model_dir(tmp_path, "meta-llama--Llama-3.1-8B", "llama3")
    result = gen(model, tmp_path / "out", "llama-3")
    assert result.exit_code == 0, result.output
    template = read_config(tmp_path / "out")["conv_template"]
    # The template names 128001/128009; config.json's eos list adds 128008 (<|eom_id|>).
    assert template["stop_token_ids"] == [128001, 128009, 128008]
    assert "[gen_config] conv_template.stop_token_ids: added 128008 (eos_token_id)" in (
        log_lines(result))


@pytest.mark.parametrize(
    "tokenizer, template, stop_string", [("qwen3", "chatml", "<|im_end|>"),
                                         ("gemma3", "gemma_instruction", "<end_of_turn>")],
)
def test_other_tokenizers_load_and_resolve_stop_strings(tmp_path, tokenizer, template,
                                                        stop_string):
    # No config of these families is supported yet, so they ride on a Llama config; gen_config
    # must say that the tokenizer is larger than the model's vocabulary.
    model = make_model_dir(tmp_path, "TinyLlama--TinyLlama-1.1B-Chat-v1.0", tokenizer)
    result = gen(model, tmp_path / "out", template)
    assert result.exit_code == 0, result.output
    written = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert written.decode(written.encode(SAMPLE, add_special_tokens=False).ids) == SAMPLE
    stop_id = written.token_to_id(stop_string)
    assert stop_id in read_config(tmp_path / "out")["conv_template"]["stop_token_ids"]
    assert any("but" in line and "says vocab_size=32000" in line for line in log_lines(result))


def test_generation_config_then_config_json_then_defaults(tmp_path: Path):
    model = make_model_dir(tmp_path, "meta-llama--Llama-2-7b-chat-hf", "llama2")
    # Llama-2-chat's published sampling settings, plus one value only config.json has.
    (model / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0, "temperature": 0.6,
         "top_p": 0.9, "max_new_tokens": 256}))
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "repetition_penalty": 1.1,
                                                   "top_p": 0.5}))
    result = gen(model, tmp_path / "out", "llama-2")
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / "out")
    assert (config["temperature"], config["top_p"], config["max_gen_len"]) == (0.6, 0.9, 256)
    assert config["repetition_penalty"] == 1.1
    assert (config["eos_token_id"], config["pad_token_id"]) == ([2, 3], 0)
    assert (config["mean_gen_len"], config["shift_fill_factor"]) == (128, 0.3)
    defaults = [line for line in log_lines(result) if "(default" in line]
    assert {line.split(" = ")[0].removeprefix("[gen_config] ") for line in defaults} == {
        "prefill_chunk_size", "sliding_window_size", "attention_sink_size",
        "tensor_parallel_shards", "max_batch_size", "mean_gen_len", "shift_fill_factor"}


def test_options_override_config_json(tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli(STORIES, "--quantization", "q0f32", "--conv-template", "LM", "-o", out,
                     "--context-window-size", "256", "--prefill_chunk_size", "64",
                     "--tensor-parallel-shard", "2", "--max-batch-size", "4")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert (config["context_window_size"], config["prefill_chunk_size"]) == (256, 64)
    assert config["tensor_parallel_shards"] == 2
    assert config["model_config"]["max_batch_size"] == 4
    assert config["model_config"]["context_window_size"] == 256
    # A smaller window alone brings the default chunk down with it.
    result = run_cli(STORIES, "--quantization", "q0f32", "--conv-template", "LM", "-o", out,
                     "--context-window-size", "100")
    assert result.exit_code == 0, result.output
    assert read_config(out)["prefill_chunk_size"] == 100
    # A larger one moves the default chunk up to min(window, 2048).
    result = gen(STORIES, out, "LM", "--context-window-size", "1024")
    assert result.exit_code == 0, result.output
    assert read_config(out)["prefill_chunk_size"] == 1024


def test_sliding_window_options(tmp_path: Path):
    model = make_model_dir(tmp_path, "mistralai--Mistral-7B-v0.1", "mistral")
    out = tmp_path / "out"
    result = gen(model, out, "mistral_default", "--sliding-window-size", "1024",
                 "--attention-sink-size", "8")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert (config["context_window_size"], config["sliding_window_size"]) == (-1, 1024)
    assert (config["attention_sink_size"], config["prefill_chunk_size"]) == (8, 128)
    result = gen(model, out, "mistral_default", "--sliding-window-size", "-1",
                 "--context-window-size", "8192")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert (config["context_window_size"], config["sliding_window_size"]) == (8192, -1)
    assert config["attention_sink_size"] == 0


def test_preset_without_folder_writes_config_only(tmp_path: Path):
    result = gen("llama2_7b", tmp_path / "out", "llama-2")
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / "out")
    assert config["context_window_size"] == 4096 and config["tokenizer_files"] == []
    assert any("preset 'llama2_7b' has no model folder" in line for line in log_lines(result))


def test_custom_template_file_is_embedded(tmp_path: Path):
    data = {**get_template("chatml").to_json(), "name": "my_chat", "system_message": "Be brief."}
    (tmp_path / "my_chat.json").write_text(json.dumps(data))
    result = gen(STORIES, tmp_path / "out", tmp_path / "my_chat.json")
    assert result.exit_code == 0, result.output
    embedded = read_config(tmp_path / "out")["conv_template"]
    assert embedded == {**data, "stop_token_ids": [2, 32000]}


BAD_INPUTS = [
    (["--conv-template", "llama2"], "[conv_template] unknown conversation template 'llama2'"),
    (["--quantization", "q4f16"], "[quantization] unknown quantization 'q4f16'"),
    (["--prefill-chunk-size", "-5"], "[gen_config] --prefill-chunk-size=-5 must be at least 1"),
    (["--context-window-size", "-7"],
     "[gen_config] --context-window-size=-7 must be positive, or -1 for none"),
    (["--sliding-window-size", "0"],
     "[gen_config] --sliding-window-size=0 must be positive, or -1 for none"),
    (["--attention-sink-size", "-1"], "[gen_config] --attention-sink-size=-1 must be at least 0"),
    (["--max-batch-size", "0"], "[gen_config] --max-batch-size=0 must be at least 1"),
    (["--tensor-parallel-shards", "3"], "[config] tensor_parallel_shards=3 must divide"),
    (["--prefill-chunk-size", "1024"],
     "[gen_config] --prefill-chunk-size=1024 exceeds context_window_size=512"),
    (["--context-window-size", "128", "--prefill-chunk-size", "256"],
     "[gen_config] --prefill-chunk-size=256 exceeds context_window_size=128"),
    (["--context-window-size", "100", "--sliding-window-size", "50"],
     "[gen_config] --context-window-size=100 and --sliding-window-size=50 contradict"),
    (["--attention-sink-size", "4"], "[config] attention_sink_size=4 needs a sliding window"),
    (["--sliding-window-size", "-1", "--attention-sink-size", "2"],
     "[gen_config] --attention-sink-size=2 needs a sliding window"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_options_fail_with_one_line_and_write_nothing(tmp_path, extra, message):
    args = {"--quantization": "q4f16_1", "--conv-template": "LM"}
    rest = []
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[flag] = value
        else:
            rest += [flag, value]
    out = tmp_path / "out"
    result = run_cli(STORIES, *[x for kv in args.items() for x in kv], *rest, "-o", out)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: " + message), result.stderr
    assert not out.exists()


def test_missing_or_broken_config_fails_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "out"
    cases = [
        (tmp_path / "nowhere", "no such folder or file, and not a preset"),
        (tmp_path, "no config.json in this folder"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases.append((broken, "config.json is not valid JSON"))
    spoiled = make_model_dir(tmp_path, "meta-llama--Llama-2-7b-chat-hf", None)
    (spoiled / "tokenizer.json").write_text('{"model": 1}')
    cases.append((spoiled, "the `tokenizers` library cannot load it"))
    bad_gen = make_model_dir(tmp_path, "meta-llama--Llama-2-13b-hf", None)
    (bad_gen / "generation_config.json").write_text('{"top_p": 2}')
    cases.append((bad_gen, "generation_config.json: 'top_p' must be a number in (0, 1]"))
    bad_eos = make_model_dir(tmp_path, "TinyLlama--TinyLlama-1.1B-Chat-v1.0", None)
    (bad_eos / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    cases.append((bad_eos, "generation_config.json: 'eos_token_id' must be a token id or a list"))
    for source, message in cases:
        result = gen(source, out, "LM")
        assert result.exit_code == 1, source
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
        assert not out.exists()


def test_cli_process_reports_one_line(tmp_path: Path):
    out = tmp_path / "out"
    result = mlcc_process("gen_config", STORIES, "--quantization", "q4f16_1", "--conv-template",
                          "nope", "-o", out)
    assert result.returncode == 1
    assert result.stderr.startswith("error: [conv_template] unknown conversation template 'nope'")
    assert len(result.stderr.splitlines()) == 1 and not out.exists()
