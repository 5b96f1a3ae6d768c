"""A deterministic engine for chat tests: next-token logits depend only on the last token fed.

It follows the runtime engine protocol (vocab_size, context_window_size, sliding_window_size,
prefill_chunk_size, total_tokens, reset, append, decode) and records every call, so tests can
check what the chat runtime fed to it. It refuses to grow past its context window, as a compiled
engine with a fixed KV cache would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np

SHARED = Path(__file__).parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


class BigramEngine:
    """Logits of the next token = `table[last token]`; greedy output is a table walk."""

    def __init__(
        self,
        table: np.ndarray,
        context_window_size: int = 512,
        sliding_window_size: int = -1,
        prefill_chunk_size: int = 64,
    ) -> None:
        self.table = np.asarray(table, dtype=np.float32)  # (vocab, vocab)
        self.vocab_size = self.table.shape[0]
        self.context_window_size = context_window_size
        self.sliding_window_size = sliding_window_size
        self.prefill_chunk_size = prefill_chunk_size
        self.sequence: list[int] = []
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    @property
    def total_tokens(self) -> int:
        return len(self.sequence)

    def reset(self) -> None:
        self.sequence = []
        self.calls.append(("reset", ()))

    def append(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        assert ids, "append needs at least one token"
        self._grow(ids)
        self.calls.append(("append", tuple(ids)))
        return self.table[ids[-1]].copy()

    def decode(self, token_id: int) -> np.ndarray:
        self._grow([int(token_id)])
        self.calls.append(("decode", (int(token_id),)))
        return self.table[int(token_id)].copy()

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self.append(ids)

    def decode_logits(self, token_id: int) -> np.ndarray:
        return self.decode(token_id)

    def generate_greedy(self, ids: Sequence[int], n: int) -> list[int]:
        logits = self.prefill_logits(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = self.decode(out[-1])
        return out

    def _grow(self, ids: list[int]) -> None:
        window = self.context_window_size
        if window > 0 and len(self.sequence) + len(ids) > window:
            raise AssertionError(
                f"KV cache overflow: {len(self.sequence)} + {len(ids)} > {window} tokens"
            )
        assert all(0 <= t < self.vocab_size for t in ids), ids
        self.sequence.extend(ids)

    # -- building tables ----------------------------------------------------------------------

    @classmethod
    def random(cls, vocab_size: int = 512, seed: int = 0, **kwargs) -> BigramEngine:
        """Small random logits: no token stands out until `teach` adds a path."""
        rng = np.random.default_rng(seed)
        return cls(rng.normal(0.0, 1.0, (vocab_size, vocab_size)), **kwargs)

    @classmethod
    def from_stories(cls, **kwargs) -> BigramEngine:
        """Bigram log-frequencies of the stories in stories260K's reference.json."""
        cases = json.loads((STORIES / "reference.json").read_text())["cases"]
        counts = np.full((512, 512), 0.01)
        for case in cases:
            ids = case["prompt_token_ids"] + case["greedy_token_ids"]
            for a, b in pairwise(ids):
                counts[a, b] += 1.0
        # a tiny id-dependent term breaks ties, so greedy walks are unique
        logits = np.log(counts) + 1e-3 * np.random.default_rng(1).random((512, 512))
        return cls(logits, **kwargs)

    def teach(self, ids: Sequence[int], strength: float = 30.0) -> None:
        """Make greedy decoding follow `ids`: after ids[i] comes ids[i + 1]."""
        for a, b in pairwise(ids):
            row = self.table[a]
            if row.max() >= strength and row.argmax() != b:
                raise ValueError(f"token {a} already leads to {row.argmax()}, not {b}")
            row[b] = strength

    def fed_chunks(self) -> list[tuple[int, ...]]:
        """Token ids of each append since the start, in order (decodes left out)."""
        return [ids for kind, ids in self.calls if kind == "append"]

    def resets(self) -> int:
        return sum(kind == "reset" for kind, _ in self.calls)


def write_params_dir(
    folder: Path, conv_template: dict, context_window_size: int = 512, **overrides
) -> Path:
    """A params folder with stories260K's tokenizer.json and an mlc-chat-config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes((STORIES / "tokenizer.json").read_bytes())
    config = {
        "model_type": "llama",
        "quantization": "q0f32",
        "model_config": {},
        "vocab_size": 512,
        "context_window_size": context_window_size,
        "sliding_window_size": -1,
        "prefill_chunk_size": 64,
        "attention_sink_size": 0,
        "tensor_parallel_shards": 1,
        "mean_gen_len": 16,
        "max_gen_len": 40,
        "shift_fill_factor": 0.3,
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "conv_template": conv_template,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tokenizer_files": ["tokenizer.json"],
        "version": "0.1.0",
    }
    config.update(overrides)
    (folder / "mlc-chat-config.json").write_text(json.dumps(config, indent=2))
    return folder
