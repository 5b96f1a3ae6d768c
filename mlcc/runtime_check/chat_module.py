"""ChatModule: a multi-turn chat over a params folder and an engine, and its terminal REPL.

A params folder (written by `mlcc convert_weight` and `mlcc gen_config`) holds
mlc-chat-config.json, the tokenizer and the weights; a model library (from `mlcc compile`) runs
the model. ChatModule renders the conversation with the template embedded in the config, keeps
the engine's KV cache in step with the conversation so that each turn only prefills its new
tokens, and generates replies (see `ChatModule.generate` for the rules).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlcc.errors import MlccError
from mlcc.frontend.conv_templates import ConvTemplate, get_template, render_prompt
from mlcc.runtime_check.generation import (
    Engine,
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    StopRules,
    generate_reply,
    make_sampler,
)
from mlcc.runtime_check.tokenizer import load_tokenizer

CHAT_CONFIG_FILE = "mlc-chat-config.json"
MODEL_LIB_SUFFIXES = (".so", ".dylib", ".dll")
# Used when mlc-chat-config.json leaves them out (MLC LLM's defaults).
DEFAULT_MEAN_GEN_LEN = 128
DEFAULT_SHIFT_FILL_FACTOR = 0.3

Message = tuple[str, str]


def read_chat_config(params_dir: Path) -> dict[str, Any]:
    """Parse `params_dir/mlc-chat-config.json`, with one-line errors for the usual mistakes."""
    if not params_dir.is_dir():
        raise MlccError(
            "chat",
            f"{params_dir}: params folder not found; pass the folder written by "
            "`mlcc convert_weight` and `mlcc gen_config` (-o OUT/params)",
        )
    path = params_dir / CHAT_CONFIG_FILE
    if not path.is_file():
        raise MlccError(
            "chat",
            f"{path}: not found; run `mlcc gen_config HF_DIR --quantization Q --conv-template T "
            f"-o {params_dir}` first",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MlccError("chat", f"{path}: not valid JSON ({err}); run `mlcc gen_config` again")
    if not isinstance(config, dict) or "conv_template" not in config:
        raise MlccError(
            "chat", f"{path}: has no conv_template entry; run `mlcc gen_config` again to write it"
        )
    return config


def find_model_lib(params_dir: Path) -> Path:
    """The single model library in the params folder or the folder above it."""
    folders = [params_dir, params_dir.parent]
    found = sorted(
        {p.resolve() for folder in folders for p in folder.iterdir() if _is_model_lib(p)}
    )
    if len(found) == 1:
        return found[0]
    where = f"{params_dir} or {params_dir.parent}"
    if not found:
        raise MlccError(
            "chat",
            f"no model library (*.so) in {where}; pass --model-lib-path with the file built by "
            "`mlcc compile ... -o OUT/lib.so`",
        )
    names = ", ".join(str(p) for p in found)
    raise MlccError(
        "chat", f"several model libraries in {where} ({names}); pass --model-lib-path to pick one"
    )


def _is_model_lib(path: Path) -> bool:
    return path.is_file() and path.suffix in MODEL_LIB_SUFFIXES


def open_engine(lib_path: Path, params_dir: Path, chat_config: dict, device: str) -> Engine:
    """Create the engine that runs a compiled model library (tests replace this function)."""
    try:
        # imported here so that chat tooling works without loading the TVM runtime
        from mlcc.runtime_check.compiled import CompiledEngine
    except ModuleNotFoundError as err:
        raise MlccError(
            "chat",
            f"cannot load the compiled-model runtime: {err}; reinstall mlcc with its "
            "dependencies (pip install -e .), which include the TVM runtime",
        ) from err
    return CompiledEngine(lib_path, params_dir, chat_config, device)


@dataclass(frozen=True)
class _CachedTurn:
    """What the KV cache holds after a reply that ended cleanly (stop token or length).

    The cache then holds `prompt_text` (rendered conversation up to the reply prompt) and the
    reply's tokens except `pending_ids`, sampled tokens whose text is in `reply` but which were
    never fed to the engine; the next turn feeds them first.
    """

    prompt_text: str
    reply: str
    pending_ids: tuple[int, ...]


def compiled_shards(lib: Path) -> int:
    """The tensor-parallel shard count `lib` was compiled for; 1 when it is not sharded or
    cannot be read here (the engine that opens it then reports why)."""
    from mlcc.runtime_check.compiled import read_metadata
    from mlcc.runtime_check.tensor_parallel import library_shards

    try:
        import tvm

        return library_shards(read_metadata(tvm.runtime.load_module(str(lib))))
    except Exception:  # noqa: BLE001 - any unreadable library is open_engine's error to report
        return 1


class ChatModule:
    """Chat with a compiled model (or any engine that follows the runtime engine protocol).

    `model` is a params folder (or its mlc-chat-config.json). Without `engine`, the library at
    `model_lib_path` (default: the single *.so in the params folder or the folder above it) is
    opened with `open_engine`; a library compiled for N > 1 shards is run by N ranks
    (TensorParallelEngine: threads on the CPU, one process per GPU). `tensor_parallel_shards`
    defaults to the count the library was compiled for.
    """

    def __init__(
        self,
        model: str | Path,
        model_lib_path: str | Path | None = None,
        device: str = "cpu",
        engine: Engine | None = None,
        tensor_parallel_shards: int | None = None,
    ) -> None:
        params_dir = Path(model)
        if params_dir.name == CHAT_CONFIG_FILE:
            params_dir = params_dir.parent
        self.params_dir = params_dir
        self.chat_config = read_chat_config(params_dir)
        self.tokenizer = load_tokenizer(params_dir)
        template = self.chat_config["conv_template"]
        self.conv_template = (
            get_template(template)
            if isinstance(template, str)
            else ConvTemplate.from_json(template)
        )
        self.generation_config = GenerationConfig.from_chat_config(self.chat_config)
        if engine is None:
            lib = find_model_lib(params_dir) if model_lib_path is None else Path(model_lib_path)
            if not lib.is_file():
                raise MlccError(
                    "chat",
                    f"{lib}: model library not found; build it with `mlcc compile "
                    f"{params_dir / CHAT_CONFIG_FILE} --device {device} -o {lib}`",
                )
            if tensor_parallel_shards is None:
                tensor_parallel_shards = compiled_shards(lib)
            if tensor_parallel_shards > 1:  # N ranks: threads on the CPU, GPUs on CUDA
                from mlcc.runtime_check.tensor_parallel import TensorParallelEngine

                engine = TensorParallelEngine(lib, params_dir, self.chat_config, device,
                                              tensor_parallel_shards)
            else:
                engine = open_engine(lib, params_dir, self.chat_config, device)
        self.engine = engine
        if self.tokenizer.vocab_size > engine.vocab_size:
            raise MlccError(
                "chat",
                f"{params_dir}: tokenizer.json has {self.tokenizer.vocab_size} tokens but the "
                f"model's vocab_size is {engine.vocab_size}; the params folder and the library "
                "come from different models",
            )
        self.last_stats = GenerationStats()
        self.reset_chat()

    # -- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        generation_config: GenerationConfig | None = None,
        progress_callback: Callable[[str], None] | None = None,
    ) -> str:
        """Answer `prompt` as the next user turn of the conversation and return the reply.

        Only the tokens that are new to the engine are prefilled: the KV cache keeps the earlier
        turns. A reply ends at a stop token (the template's stop_token_ids and the model's
        eos_token_id, unless `ignore_eos`), at a stop string (the template's and the config's;
        it is removed from the reply), at `max_gen_len` tokens, or when the context window is
        full. `progress_callback` receives the reply as it is generated, in text pieces that
        concatenate to the returned reply.

        Context overflow: if the cached conversation, the new prompt and room for a typical reply
        (min(mean_gen_len, max_gen_len) tokens) do not fit in context_window_size, the oldest
        turns are dropped, one user/assistant pair at a time, until the conversation takes at most
        shift_fill_factor of the window (or only the new prompt is left), and that shortened
        conversation is prefilled again from an empty cache. A prompt that alone leaves no room in
        the window raises MlccError. Models with a sliding window (context_window_size -1) never
        overflow. The cache is also prefilled again after a reply cut by a stop string, since the
        engine holds the stop string's tokens, which the conversation text no longer has.
        """
        config = (generation_config or GenerationConfig()).filled_from(self.generation_config)
        messages: list[tuple[str, str | None]] = [*self._history, ("user", prompt)]
        new_ids, prompt_text = self._prepare_prefill(messages, config)
        room = self._room_after(len(new_ids))
        max_new = config.max_gen_len if room is None else min(config.max_gen_len, room)
        stop_ids = frozenset() if config.ignore_eos else self._stop_token_ids()
        rules = StopRules(max_new, stop_ids, (*self.conv_template.stop_str, *config.stop_str))
        result = self._run(new_ids, config, rules, progress_callback)
        self._history = [*self._history, ("user", prompt), ("assistant", result.text)]
        self._remember_reply(result, prompt_text)
        return result.text

    def benchmark_generate(self, prompt: str, generate_length: int) -> str:
        """Generate exactly `generate_length` tokens after a fresh one-turn prompt.

        Stop tokens and stop strings are ignored so that runs are comparable; the chat is reset
        before and after. The speeds are reported by `stats()`.
        """
        if generate_length < 1:
            raise MlccError("bench", f"generate length must be >= 1, got {generate_length}")
        self.reset_chat()
        ids = self._encode(self._render([("user", prompt), ("assistant", None)]))
        window = self._window()
        if window is not None and len(ids) + generate_length > window:
            raise MlccError(
                "bench",
                f"prompt ({len(ids)} tokens) + generate length ({generate_length}) exceed the "
                f"context window of {window}; lower --generate-length or shorten the prompt",
            )
        config = self.generation_config
        result = self._run(ids, config, StopRules(max_new_tokens=generate_length), None)
        self.reset_chat()
        return result.text

    def stats(self) -> str:
        """Speeds of the last generation: "prefill: X tok/s, decode: Y tok/s" (0.0 before any)."""
        return self.last_stats.summary()

    def reset_chat(self) -> None:
        """Forget the conversation and empty the engine's KV cache."""
        self.engine.reset()
        self._history: list[Message] = []
        self._cache_ids: list[int] = []
        self._cached_turn: _CachedTurn | None = None

    @property
    def history(self) -> list[Message]:
        """The conversation so far as (role, text) pairs, oldest first."""
        return list(self._history)

    # -- prefill planning ---------------------------------------------------------------------

    def _prepare_prefill(
        self, messages: list[tuple[str, str | None]], config: GenerationConfig
    ) -> tuple[list[int], str]:
        """The token ids to feed for this turn and the conversation text they complete.

        Empties the cache when it cannot be continued (see `generate`).
        """
        text = self._render([*messages, ("assistant", None)])
        reserve = min(self._mean_gen_len(), config.max_gen_len)
        new_ids = self._continuation_ids(text)
        if new_ids and self._fits(len(self._cache_ids) + len(new_ids) + reserve):
            return new_ids, text
        history = self._history
        ids = self._encode(text)
        window = self._window()
        if window is not None and len(ids) + reserve > window:
            keep = self._shift_fill_factor() * window
            while history and len(ids) > keep:
                history = history[2:]  # the oldest user/assistant pair
                text = self._render([*history, messages[-1], ("assistant", None)])
                ids = self._encode(text)
            if len(ids) >= window:
                raise MlccError(
                    "chat",
                    f"prompt has {len(ids)} tokens, more than the context window of {window} "
                    "allows (one token must be left for the reply); shorten it or rebuild with a "
                    "larger window (mlcc gen_config --context-window-size, then mlcc compile)",
                )
        if not ids:
            raise MlccError("chat", "the prompt renders to no tokens; type some text")
        if self.engine.total_tokens:
            self.engine.reset()
        self._cache_ids = []
        self._cached_turn = None
        self._history = history
        return ids, text

    def _continuation_ids(self, text: str) -> list[int] | None:
        """Tokens that extend the cache to `text`, or None when the cache cannot be extended."""
        turn = self._cached_turn
        if turn is None or self.engine.total_tokens != len(self._cache_ids):
            return None
        if not text.startswith(turn.prompt_text):
            return None
        reply_at = text.find(turn.reply, len(turn.prompt_text))
        # between the reply prompt and the reply there may only be the role/content separator
        if reply_at < 0 or text[len(turn.prompt_text) : reply_at].strip():
            return None
        after_reply = text[reply_at + len(turn.reply) :]
        return [*turn.pending_ids, *self.tokenizer.encode_continuation(after_reply)]

    def _remember_reply(self, result: GenerationResult, prompt_text: str) -> None:
        if result.finish_reason == "stop_str":
            self._cached_turn = None
            return
        unfed = result.token_ids[result.fed_count :]
        if result.finish_reason == "stop_token":
            unfed = unfed[:-1]
        self._cached_turn = _CachedTurn(prompt_text, result.text, tuple(unfed))

    # -- helpers ----------------------------------------------------------------------------

    def _run(
        self,
        new_ids: list[int],
        config: GenerationConfig,
        rules: StopRules,
        on_text: Callable[[str], None] | None,
    ) -> GenerationResult:
        context = [*self._cache_ids, *new_ids]
        sampler = make_sampler(config, self.engine.vocab_size, context)
        result = generate_reply(
            self.engine, new_ids, self.tokenizer, sampler, rules, on_text, self._reply_lead()
        )
        self._cache_ids = [*context, *result.token_ids[: result.fed_count]]
        self.last_stats = result.stats
        return result

    def _render(self, messages: Sequence[tuple[str, str | None]]) -> str:
        return render_prompt(self.conv_template, messages)

    def _encode(self, prompt_text: str) -> list[int]:
        """Ids of a whole rendered conversation, the template's prefix ids (BOS) first."""
        return [*self.conv_template.system_prefix_token_ids, *self.tokenizer.encode(prompt_text)]

    def _reply_lead(self) -> str:
        """What the template writes before a reply beyond what the reply prompt already has.

        The prompt ends with `role_empty_sep` while the history renders `role_content_sep`
        before the reply (":" against ": "), so the model writes the difference itself.
        """
        content_sep = self.conv_template.role_content_sep
        empty_sep = self.conv_template.role_empty_sep
        return content_sep[len(empty_sep) :] if content_sep.startswith(empty_sep) else ""

    def _stop_token_ids(self) -> frozenset[int]:
        eos = self.chat_config.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return frozenset([*self.conv_template.stop_token_ids, *eos_ids])

    def _window(self) -> int | None:
        """The context window in tokens, or None when the model slides its window."""
        window = self.engine.context_window_size
        return window if window > 0 else None

    def _fits(self, total_tokens: int) -> bool:
        window = self._window()
        return window is None or total_tokens <= window

    def _room_after(self, new_tokens: int) -> int | None:
        window = self._window()
        return None if window is None else window - len(self._cache_ids) - new_tokens

    def _mean_gen_len(self) -> int:
        return int(self.chat_config.get("mean_gen_len") or DEFAULT_MEAN_GEN_LEN)

    def _shift_fill_factor(self) -> float:
        return float(self.chat_config.get("shift_fill_factor") or DEFAULT_SHIFT_FILL_FACTOR)


REPL_HELP = """Commands:
  /help   show this help
  /stats  prefill and decode speed of the last reply
  /reset  forget the conversation and start a new one
  /exit   leave (end of input does the same)
Any other line is sent to the model as your next message."""
REPL_PROMPT = ">>> "


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_repl(
    chat: ChatModule,
    generation_config: GenerationConfig | None = None,
    read_line: Callable[[str], str] = input,
    write: Callable[[str], None] = _write_stdout,
) -> None:
    """Read messages and /commands from `read_line` and stream the replies to `write`.

    A failure of one message (such as a prompt longer than the context window) is reported and
    the session goes on.
    """
    write(f"Chatting with {chat.params_dir}. Type /help for commands.\n")
    while True:
        try:
            line = read_line(REPL_PROMPT)
        except EOFError:
            write("\n")
            return
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return
        if command == "/help":
            write(REPL_HELP + "\n")
        elif command == "/stats":
            write(chat.stats() + "\n")
        elif command == "/reset":
            chat.reset_chat()
            write("The conversation was reset.\n")
        elif command.startswith("/") and " " not in command:
            write(f"unknown command {command}; type /help for the list\n")
        else:
            try:
                chat.generate(line, generation_config, progress_callback=write)
                write("\n")
            except MlccError as err:
                write(f"\nerror: {err}\n")


def run_prompt(
    chat: ChatModule,
    prompt: str,
    generation_config: GenerationConfig | None = None,
    write: Callable[[str], None] = _write_stdout,
) -> str:
    """Answer one message, streaming the reply to `write` and ending it with a newline."""
    reply = chat.generate(prompt, generation_config, progress_callback=write)
    write("\n")
    return reply


BENCH_WARMUP_TOKENS = 4


def run_benchmark(
    chat: ChatModule,
    prompt: str,
    generate_length: int,
    write: Callable[[str], None] = _write_stdout,
) -> GenerationStats:
    """Measure prefill and decode speed on one prompt and report them to `write`.

    A short generation runs first, so that one-time work of the engine (loading kernels,
    allocating its workspace) is not counted.
    """
    chat.benchmark_generate(prompt, min(BENCH_WARMUP_TOKENS, generate_length))
    chat.benchmark_generate(prompt, generate_length)
    write(chat.last_stats.details() + "\n")
    write(chat.stats() + "\n")
    return chat.last_stats
