"""One reply of a chat: the generation loop over an engine, its options and its stop rules.

The loop feeds the new prompt tokens to the engine (whose KV cache already holds the earlier
conversation), then samples one token at a time until a stop token, a stop string, or the length
limit. Text is streamed as deltas: the tokens are decoded incrementally after the prompt's last
token (never splitting a character) and then held back while they could be the start of a stop
string, so the streamed text never shows any part of a stop string and concatenates to the
returned reply.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlcc.errors import MlccError
from mlcc.runtime_check.engine import keeps_logits_on_device
from mlcc.runtime_check.sampling import SamplingParams, TokenSampler
from mlcc.runtime_check.tokenizer import ChatTokenizer, IncrementalDecoder

# Used when mlc-chat-config.json leaves a generation field out (MLC LLM's defaults).
_FALLBACK_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "max_gen_len": 512,
}


class Engine(Protocol):
    """What the chat runtime needs from an engine (the compiled library or the reference)."""

    vocab_size: int
    context_window_size: int
    sliding_window_size: int
    prefill_chunk_size: int
    total_tokens: int

    def reset(self) -> None: ...

    def append(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def decode(self, token_id: int) -> np.ndarray: ...


@dataclass(frozen=True)
class GenerationConfig:
    """Options of one generation. A field left as None takes its value from mlc-chat-config.json.

    `stop_str` adds stop strings to those of the conversation template; `ignore_eos` keeps
    generating through stop token ids (the template's and the model's EOS) until `max_gen_len`.
    """

    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_gen_len: int | None = None
    seed: int | None = None
    stop_str: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop_str, str):
            object.__setattr__(self, "stop_str", (self.stop_str,))
        else:
            object.__setattr__(self, "stop_str", tuple(self.stop_str))
        if self.max_gen_len is not None and not self.max_gen_len >= 1:
            raise MlccError("chat", f"max_gen_len must be >= 1, got {self.max_gen_len}")
        SamplingParams(  # validates the sampling fields that are set
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
        )

    @classmethod
    def from_chat_config(cls, chat_config: Mapping[str, Any]) -> GenerationConfig:
        """The defaults written by gen_config into mlc-chat-config.json, every field set."""
        values = {
            key: fallback if chat_config.get(key) is None else chat_config[key]
            for key, fallback in _FALLBACK_DEFAULTS.items()
        }
        if values["max_gen_len"] < 1:  # MLC writes -1 for "no limit of its own"
            values["max_gen_len"] = _FALLBACK_DEFAULTS["max_gen_len"]
        return cls(**values)

    def filled_from(self, defaults: GenerationConfig) -> GenerationConfig:
        """This config with every None field taken from `defaults`."""
        unset = {
            field.name: getattr(defaults, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is None
        }
        return dataclasses.replace(self, **unset)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


class StopStringFilter:
    """Pass streamed text through, cutting it at the first stop string.

    Text that could be the beginning of a stop string is held back until the following text
    shows whether the stop string really occurs, so a stop string split over several tokens is
    still found and none of it is ever emitted.
    """

    def __init__(self, stop_strs: Iterable[str]) -> None:
        self._stops = tuple(stop for stop in stop_strs if stop)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to show. Sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        self._pending += text
        hits = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            emit, self._pending = self._pending[: min(hits)], ""
            return emit
        held = self._longest_partial_stop()
        emit = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(self._pending) - held :]
        return emit

    def flush(self) -> str:
        """At the end of generation, held text turned out not to be a stop string: release it."""
        emit, self._pending = self._pending, ""
        return emit

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if stop.startswith(self._pending[-size:]):
                    longest = size
                    break
        return longest


@dataclass(frozen=True)
class GenerationStats:
    """Token counts and seconds of the last generation, for throughput reports."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prefill: {self.prefill_tokens_per_second:.1f} tok/s, "
            f"decode: {self.decode_tokens_per_second:.1f} tok/s"
        )

    def details(self) -> str:
        """Counts and times behind `summary()`."""
        return (
            f"prefill: {self.prefill_tokens} tokens in {self.prefill_seconds * 1e3:.2f} ms, "
            f"decode: {self.decode_tokens} steps in {self.decode_seconds * 1e3:.2f} ms"
        )


@dataclass(frozen=True)
class StopRules:
    """When a generation ends: stop token ids, stop strings and a token budget."""

    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    stop_strs: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The reply text (stop string removed), the sampled tokens and what reached the engine.

    `token_ids` holds every sampled token, including a final stop token; only the first
    `fed_count` of them were fed back to the engine (the last sampled token never is), so the
    engine's sequence grew by the prompt tokens plus `fed_count`.
    """

    text: str
    token_ids: tuple[int, ...]
    fed_count: int
    finish_reason: str  # "stop_token", "stop_str" or "length"
    stats: GenerationStats


class ReplyStream:
    """The text of a reply as its tokens arrive, passed on to `on_text` in safe pieces.

    Tokens are decoded after the last prompt tokens (`context_ids`), so the first one keeps the
    leading space it has in the running text. `lead` is text that the conversation template
    writes itself between the role and the reply (the space of "ASSISTANT: "); a reply that
    starts with it loses it, so that the rendered history reads as the model saw it. Finally the
    text is cut at the first stop string.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        context_ids: Sequence[int],
        stop_strs: Iterable[str],
        lead: str = "",
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer, context_ids)
        self._stops = StopStringFilter(stop_strs)
        self._lead = lead
        self._head = ""  # held until it is known whether the reply starts with `lead`
        self._pieces: list[str] = []
        self._on_text = on_text

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token_id: int) -> None:
        self._pass(self._decoder.push(token_id))

    def finish(self) -> None:
        """Release held text at the end of generation."""
        if self.stopped:
            return
        self._pass(self._decoder.flush())
        head, self._head, self._lead = self._head, "", ""
        self._pass(head)
        self._emit(self._stops.flush())

    def _pass(self, text: str) -> None:
        if self._lead:
            self._head += text
            if len(self._head) < len(self._lead) and self._lead.startswith(self._head):
                return
            text = self._head.removeprefix(self._lead)
            self._head, self._lead = "", ""
        self._emit(self._stops.push(text))

    def _emit(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            if self._on_text is not None:
                self._on_text(text)


def generate_reply(
    engine: Engine,
    new_token_ids: Sequence[int],
    tokenizer: ChatTokenizer,
    sampler: TokenSampler,
    rules: StopRules,
    on_text: Callable[[str], None] | None = None,
    lead: str = "",
) -> GenerationResult:
    """Feed `new_token_ids` to the engine and generate one reply, streaming it to `on_text`.

    `lead` is dropped from the start of the reply (see `ReplyStream`).
    """
    # the compiled CUDA engine can keep the logits on the GPU and pick the token there
    keep = {"on_device": True} if keeps_logits_on_device(engine) else {}
    start = time.perf_counter()
    logits = engine.append(list(new_token_ids), **keep)
    prefill_seconds = time.perf_counter() - start
    reply = ReplyStream(tokenizer, new_token_ids[-1:], rules.stop_strs, lead, on_text)
    sampled: list[int] = []
    fed = 0
    decode_seconds = 0.0
    finish_reason = "length"
    while len(sampled) < rules.max_new_tokens:
        token = sampler.sample(logits)
        sampled.append(token)
        if token in rules.stop_token_ids:
            finish_reason = "stop_token"
            break
        sampler.observe((token,))
        reply.push(token)
        if reply.stopped or len(sampled) == rules.max_new_tokens:
            break  # the last token is not fed: nothing would read its logits
        start = time.perf_counter()
        logits = engine.decode(token, **keep)
        decode_seconds += time.perf_counter() - start
        fed += 1
    reply.finish()
    if reply.stopped:
        finish_reason = "stop_str"
    stats = GenerationStats(len(new_token_ids), prefill_seconds, fed, decode_seconds)
    return GenerationResult(reply.text, tuple(sampled), fed, finish_reason, stats)


def make_sampler(
    config: GenerationConfig, vocab_size: int, context_ids: Iterable[int]
) -> TokenSampler:
    """A sampler for a resolved config, seeded when `config.seed` is set."""
    sampler = TokenSampler(config.sampling_params(), vocab_size, np.random.default_rng(config.seed))
    sampler.observe(context_ids)
    return sampler
