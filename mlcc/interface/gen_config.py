"""`mlcc gen_config`: write mlc-chat-config.json and the tokenizer files next to the weights.

Where each value comes from, first found wins:
- window sizes, tensor_parallel_shards, max_batch_size: the command-line option, then config.json
  (HF keys, or MLC-style keys such as `prefill_chunk_size`), then the defaults below;
- generation settings and bos/eos/pad token ids: generation_config.json, then config.json, then
  the defaults below.
Every default that is used is logged as one line, so a surprising value is easy to trace; the
lines appear only when the inputs are valid, so a failure is reported by its one error line.

Defaults: no sliding window (-1; Mistral configs without a `sliding_window` key get 4096 as in
transformers), attention_sink_size 0, prefill_chunk_size min(context window, 2048) (the sliding
window when the context is -1), tensor_parallel_shards 1, max_batch_size 1, mean_gen_len 128,
max_gen_len 512, shift_fill_factor 0.3, temperature 0.7, repetition_penalty 1.0, top_p 0.95,
bos_token_id 1, eos_token_id 2, pad_token_id null.

Nothing is written until every input has been checked. Each file is written under a temporary
name and renamed when complete; mlc-chat-config.json comes last, and other files in the output
folder (weights from convert_weight) are left alone.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlcc.errors import MlccError
from mlcc.frontend.config import MAX_DEFAULT_PREFILL_CHUNK, ModelConfig
from mlcc.frontend.conv_templates import ConvTemplate, get_template
from mlcc.frontend.registry import ModelSource, resolve_model
from mlcc.frontend.tokenizer_files import (
    TokenizerBundle,
    collect_tokenizer_files,
    write_file_atomic,
    write_tokenizer_files,
)

STAGE = "gen_config"
CONFIG_FILE = "mlc-chat-config.json"
FORMAT_VERSION = "0.1.0"
# Used only when mlcc.quant cannot be imported.
KNOWN_QUANTIZATIONS = ("q0f16", "q0f32", "q3f16_1", "q4f16_1", "q4f32_1", "q4f16_awq", "q8f16_1")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# (mlc-chat-config field, key in generation_config.json / config.json or None, default,
#  the rule a value from those files must follow, and that rule in words)
GENERATION_FIELDS: tuple[tuple[str, str | None, Any, Callable[[Any], bool], str], ...] = (
    ("mean_gen_len", None, 128, _is_count, "a positive integer"),
    ("max_gen_len", "max_new_tokens", 512, _is_count, "a positive integer"),
    ("shift_fill_factor", None, 0.3, _is_number, "a number"),
    ("temperature", "temperature", 0.7, lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    (
        "repetition_penalty",
        "repetition_penalty",
        1.0,
        lambda v: _is_number(v) and v > 0,
        "a number > 0",
    ),
    ("top_p", "top_p", 0.95, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
)
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
TOKEN_DEFAULTS: dict[str, Any] = {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}
# Defaults of the window options, when neither the command line nor config.json sets them.
WINDOW_DEFAULTS = {"attention_sink_size": 0, "tensor_parallel_shards": 1, "max_batch_size": 1}

logger = logging.getLogger("mlcc.gen_config")


def log_to_stderr() -> None:
    """Show this module's notes (defaults used, files written) on stderr, one line each."""
    # A fresh handler each call: it binds the sys.stderr of this run (tests swap it per run).
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{STAGE}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_quantization(name: str) -> None:
    """MlccError unless `name` is a known quantization scheme."""
    try:
        from mlcc.quant import get_scheme
    except ImportError:
        if name not in KNOWN_QUANTIZATIONS:
            raise MlccError(
                STAGE,
                f"unknown quantization {name!r}; known: {', '.join(KNOWN_QUANTIZATIONS)}",
            ) from None
        return
    get_scheme(name)


def load_conv_template(name_or_path: str) -> ConvTemplate:
    """A built-in template by name, or a template JSON file (a path ending in .json)."""
    if not name_or_path.endswith(".json"):
        return get_template(name_or_path)
    path = Path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MlccError(STAGE, f"{path}: cannot read the conversation template ({err})") from None
    except json.JSONDecodeError as err:
        raise MlccError(STAGE, f"{path}: conversation template is not valid JSON ({err})") from None
    return ConvTemplate.from_json(data)


def check_window_options(options: dict[str, int]) -> None:
    """Range and consistency of the command-line sizes, before any file is read."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise MlccError(STAGE, f"{_flag(name)}={value!r} must be an integer")
    lower = {
        "prefill_chunk_size": 1,
        "attention_sink_size": 0,
        "tensor_parallel_shards": 1,
        "max_batch_size": 1,
    }
    for name, low in lower.items():
        if name in options and options[name] < low:
            raise MlccError(STAGE, f"{_flag(name)}={options[name]} must be at least {low}")
    for name in ("context_window_size", "sliding_window_size"):
        if name in options and options[name] != -1 and options[name] <= 0:
            raise MlccError(
                STAGE, f"{_flag(name)}={options[name]} must be positive, or -1 for none"
            )
    context = options.get("context_window_size")
    sliding = options.get("sliding_window_size")
    if context is not None and sliding is not None and context > 0 and sliding > 0:
        raise MlccError(
            STAGE,
            f"--context-window-size={context} and --sliding-window-size={sliding} contradict: a "
            "model keeps either its whole context or a sliding window; pass only one of them",
        )
    if context == -1 and sliding == -1:
        raise MlccError(
            STAGE,
            "--context-window-size=-1 and --sliding-window-size=-1 leave the KV cache unbounded; "
            "give one of them a positive size",
        )
    sinks = options.get("attention_sink_size", 0)
    if sinks > 0 and sliding == -1:
        raise MlccError(
            STAGE,
            f"--attention-sink-size={sinks} needs a sliding window, but --sliding-window-size=-1; "
            "drop the sinks or set a window",
        )


def _window_limit(config: ModelConfig) -> tuple[int, str]:
    if config.context_window_size == -1:
        return config.sliding_window_size, "sliding_window_size"
    return config.context_window_size, "context_window_size"


def _check_window_change(config: ModelConfig, options: dict[str, int]) -> None:
    """Refuse options that would switch the model's kind of KV cache only half-way."""
    if (
        options.get("sliding_window_size") == -1
        and config.context_window_size == -1
        and "context_window_size" not in options
    ):
        raise MlccError(
            STAGE,
            "--sliding-window-size=-1 turns off the model's sliding window, so the context is "
            "unbounded; also pass --context-window-size with the length to keep",
        )
    if (
        options.get("context_window_size", -1) > 0
        and config.sliding_window_size > 0
        and "sliding_window_size" not in options
    ):
        raise MlccError(
            STAGE,
            f"--context-window-size={options['context_window_size']} contradicts the model's "
            f"sliding window of {config.sliding_window_size} (config.json); add "
            "--sliding-window-size=-1 to attend over a whole context instead",
        )


def _prefill_chunk(config: ModelConfig, hf: dict, options: dict[str, int], notes: list[str]) -> int:
    """The prefill chunk for the final window: the option (checked), config.json's value
    (clamped to the window), or the default."""
    limit, limit_name = _window_limit(config)
    if "prefill_chunk_size" in options:
        chunk = options["prefill_chunk_size"]
        if chunk > limit:
            raise MlccError(
                STAGE,
                f"--prefill-chunk-size={chunk} exceeds {limit_name}={limit}; a chunk must fit in "
                f"the KV cache, use at most {limit}",
            )
        return chunk
    if "prefill_chunk_size" in hf:
        chunk = min(hf["prefill_chunk_size"], limit)
        if chunk != hf["prefill_chunk_size"]:
            notes.append(
                f"prefill_chunk_size = {chunk} (config.json's {hf['prefill_chunk_size']} "
                f"clamped to {limit_name})"
            )
        return chunk
    chunk = min(limit, MAX_DEFAULT_PREFILL_CHUNK)
    notes.append(
        f"prefill_chunk_size = {chunk} (default: min({limit_name}, {MAX_DEFAULT_PREFILL_CHUNK}))"
    )
    return chunk


def apply_window_options(
    source: ModelSource, options: dict[str, int], notes: list[str]
) -> ModelConfig:
    """The model config with the command-line sizes applied and the prefill chunk settled."""
    config = source.config
    _check_window_change(config, options)
    # The prefill chunk is decided last, once the window is final.
    sizes = {k: v for k, v in options.items() if k != "prefill_chunk_size"}
    if sizes.get("sliding_window_size") == -1 and config.attention_sink_size > 0:
        # Sinks only exist inside a sliding window; check_window_options refused explicit ones.
        sizes["attention_sink_size"] = 0
        notes.append("attention_sink_size = 0 (no sliding window, so no attention sinks)")
    if sizes:
        config = config.with_overrides(**sizes)
    chunk = _prefill_chunk(config, source.hf_config, options, notes)
    config = config.with_overrides(prefill_chunk_size=chunk)
    _note_window_defaults(source, options, config, notes)
    return config


def _note_window_defaults(
    source: ModelSource, options: dict[str, int], config: ModelConfig, notes: list[str]
) -> None:
    hf = source.hf_config
    sliding_keys = {"sliding_window_size", type(config).hf_sliding_window_key} - {""}
    if "sliding_window_size" not in options and not sliding_keys & set(hf):
        notes.append(
            f"sliding_window_size = {config.sliding_window_size} (default for {source.arch.name})"
        )
    if config.context_window_size == -1 and "context_window_size" not in options:
        notes.append(
            f"context_window_size = -1 (the sliding window of {config.sliding_window_size} "
            "bounds the KV cache)"
        )
    for name, value in WINDOW_DEFAULTS.items():
        if name not in options and name not in hf:
            notes.append(f"{name} = {value} (default)")


def _check_token_ids(value: Any, key: str, origin: str) -> Any:
    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if value is None or is_id(value):
        return value
    if isinstance(value, list) and value and all(is_id(v) for v in value):
        return value[0] if len(value) == 1 else value
    raise MlccError(
        STAGE, f"{origin}: '{key}' must be a token id or a list of token ids, got {value!r}"
    )


def _lookup(source: ModelSource, key: str) -> tuple[Any, str | None]:
    """(value, file name) from generation_config.json, then config.json; (None, None) if absent."""
    for data, origin in (
        (source.generation_config, "generation_config.json"),
        (source.hf_config, "config.json"),
    ):
        if data is not None and data.get(key) is not None:
            return data[key], origin
    return None, None


def generation_settings(source: ModelSource, notes: list[str]) -> dict[str, Any]:
    """mean_gen_len ... top_p, from the HF files or the documented defaults."""
    out: dict[str, Any] = {}
    for field, key, default, rule, rule_text in GENERATION_FIELDS:
        value, origin = _lookup(source, key) if key else (None, None)
        if origin is None:
            notes.append(f"{field} = {default} (default)")
            value = default
        elif not rule(value):
            raise MlccError(
                STAGE, f"{origin}: '{key}' must be {rule_text}, got {value!r}; fix the file"
            )
        out[field] = value
    return out


def token_ids(source: ModelSource, notes: list[str]) -> dict[str, Any]:
    """pad/bos/eos token ids, from the HF files or the documented defaults."""
    out: dict[str, Any] = {}
    for field in TOKEN_FIELDS:
        value, origin = _lookup(source, field)
        if origin is None:
            value = TOKEN_DEFAULTS[field]
            notes.append(f"{field} = {json.dumps(value)} (default)")
        out[field] = _check_token_ids(value, field, origin or "defaults")
    return out


def resolve_stop_token_ids(
    template: ConvTemplate, tokenizers: TokenizerBundle, eos_token_id: Any, notes: list[str]
) -> ConvTemplate:
    """The template with the model's own stop tokens added: stop strings that are single tokens
    of its tokenizer, and its eos ids. A template names ids of one tokenizer family; this makes
    generation stop on the model at hand too."""
    stop_ids = list(template.stop_token_ids)
    found = []
    if tokenizers.tokenizer is not None:
        found = [(s, tokenizers.tokenizer.token_to_id(s)) for s in template.stop_str]
    eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    found += [("eos_token_id", i) for i in eos]
    for reason, token_id in found:
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
            notes.append(f"conv_template.stop_token_ids: added {token_id} ({reason})")
    return ConvTemplate.from_json({**template.to_json(), "stop_token_ids": stop_ids})


def _collect_tokenizers(source: ModelSource, config_name: str, notes: list[str]) -> TokenizerBundle:
    if source.hf_dir is None:
        notes.append(
            f"no tokenizer files: preset {source.preset!r} has no model folder to take them from"
        )
        return TokenizerBundle((), None)
    bundle = collect_tokenizer_files(source.hf_dir)
    if not bundle.files:
        notes.append(
            f"no tokenizer files in {source.hf_dir}; chat needs tokenizer.json or tokenizer.model"
        )
    for item in bundle.files:
        if item.origin.startswith("converted from"):
            notes.append(f"{item.name} {item.origin}")
    if bundle.tokenizer is not None:
        size = bundle.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > source.config.vocab_size:
            vocab = source.config.vocab_size
            notes.append(
                f"warning: tokenizer.json has {size} tokens but {config_name} says "
                f"vocab_size={vocab}; ids from {vocab} on have no embedding, check that the "
                "tokenizer belongs to this model"
            )
    return bundle


def build_chat_config(
    source: ModelSource,
    model_config: ModelConfig,
    quantization: str,
    template: ConvTemplate,
    tokenizers: TokenizerBundle,
    notes: list[str],
) -> dict[str, Any]:
    """The mlc-chat-config.json object, fields in the documented order."""
    tokens = token_ids(source, notes)
    template = resolve_stop_token_ids(template, tokenizers, tokens["eos_token_id"], notes)
    return {
        "model_type": source.arch.name,
        "quantization": quantization,
        "model_config": model_config.to_json(),
        "vocab_size": model_config.vocab_size,
        "context_window_size": model_config.context_window_size,
        "sliding_window_size": model_config.sliding_window_size,
        "prefill_chunk_size": model_config.prefill_chunk_size,
        "attention_sink_size": model_config.attention_sink_size,
        "tensor_parallel_shards": model_config.tensor_parallel_shards,
        **generation_settings(source, notes),
        "conv_template": template.to_json(),
        **tokens,
        "tokenizer_files": tokenizers.names,
        "version": FORMAT_VERSION,
    }


def gen_config(
    config: str | Path,
    quantization: str,
    conv_template: str,
    output: str | Path,
    model_type: str | None = None,
    *,
    context_window_size: int | None = None,
    sliding_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    attention_sink_size: int | None = None,
    tensor_parallel_shards: int | None = None,
    max_batch_size: int | None = None,
) -> Path:
    """Write `output`/mlc-chat-config.json and the tokenizer files; returns the config's path.

    `config` is an HF folder, a config.json or a preset name; `conv_template` a built-in
    template name or a template JSON file. Size options left None come from config.json or the
    defaults in the module docstring.
    """
    check_quantization(quantization)
    template = load_conv_template(conv_template)
    given = {
        "context_window_size": context_window_size,
        "sliding_window_size": sliding_window_size,
        "prefill_chunk_size": prefill_chunk_size,
        "attention_sink_size": attention_sink_size,
        "tensor_parallel_shards": tensor_parallel_shards,
        "max_batch_size": max_batch_size,
    }
    options = {name: value for name, value in given.items() if value is not None}
    check_window_options(options)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MlccError(STAGE, f"{output}: exists and is not a folder; pass a folder to -o")
    source = resolve_model(config, model_type)
    notes: list[str] = []  # shown only once every input has passed its checks
    model_config = apply_window_options(source, options, notes)
    tokenizers = _collect_tokenizers(source, str(config), notes)
    chat_config = build_chat_config(source, model_config, quantization, template, tokenizers, notes)
    for note in notes:
        (logger.warning if note.startswith("warning:") else logger.info)(note)
    text = json.dumps(chat_config, indent=2, ensure_ascii=False) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(tokenizers, output)
    write_file_atomic(output / CONFIG_FILE, text.encode("utf-8"))
    logger.info("wrote %s (%s)", output / CONFIG_FILE, ", ".join([CONFIG_FILE, *tokenizers.names]))
    return output / CONFIG_FILE
