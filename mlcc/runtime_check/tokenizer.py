"""The tokenizer of a params folder, and text decoding that streams token by token.

gen_config always writes `tokenizer.json` into the params folder (converting a SentencePiece
`tokenizer.model` when that is all the model has), so the runtime only needs the `tokenizers`
library. Prompts are encoded without the tokenizer's own special tokens: the conversation
template decides them (its `system_prefix_token_ids` hold the BOS token where the model wants one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from mlcc.errors import MlccError

TOKENIZER_FILE = "tokenizer.json"

# Shown for bytes of a character that is not complete yet; a delta never ends with it.
_REPLACEMENT_CHAR = "\ufffd"


class ChatTokenizer:
    """Encode prompts and decode replies with the policy the chat runtime needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `</s>`) are honoured."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it is tokenized in the middle of a conversation.

        Encoding a piece alone can add a word-start marker that the running text does not have
        (SentencePiece tokenizers prepend "▁", so " [INST]" gains a token of its own). The
        piece is therefore encoded after a newline, which no tokenizer merges with the text before
        it, and the newline's tokens are dropped; when the newline does merge with the piece (a
        piece starting with a newline in a byte-level BPE), the piece is encoded alone.
        """
        anchor = self.encode("\n")
        ids = self.encode("\n" + text)
        if ids[: len(anchor)] == anchor:
            return ids[len(anchor) :]
        return self.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, leaving out special tokens such as BOS."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(params_dir: str | Path) -> ChatTokenizer:
    """Load `tokenizer.json` from a params folder written by `mlcc gen_config`."""
    path = Path(params_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise MlccError(
            "chat",
            f"{path}: tokenizer file not found; run `mlcc gen_config` on the model to write it "
            "into the params folder",
        )
    try:
        return ChatTokenizer(Tokenizer.from_file(str(path)))
    except Exception as err:  # the tokenizers library raises plain Exceptions on bad files
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MlccError(
            "chat", f"{path}: cannot be read by the tokenizers library ({first_line})"
        ) from err


class IncrementalDecoder:
    """Turn generated tokens into text deltas that never split a character.

    Decoding each token alone is wrong for byte-fallback tokens (one character spread over
    several tokens) and for tokenizers whose decoders depend on the neighbouring token (the
    leading-space rule of SentencePiece). So each step decodes a short window made of the tokens
    of the previous delta plus the new ones, and emits what the new tokens add to that window.
    A delta is held back while the text ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: ChatTokenizer, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # context tokens (the end of the prompt) are never emitted; they make the first
        # generated token decode as it does in the running text (e.g. with its leading space)
        self._ids: list[int] = list(context_ids)
        self._prefix_start = 0  # window start: the first token of the previous delta
        self._read_start = len(self._ids)  # tokens before this one have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes ("" while a character is partial)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_start : self._read_start])
        text = self._tokenizer.decode(self._ids[self._prefix_start :])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_start = self._read_start
        self._read_start = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Text still held back at the end of generation (bytes of an unfinished character)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_start : self._read_start])
        text = self._tokenizer.decode(self._ids[self._prefix_start :])
        self._prefix_start = self._read_start = len(self._ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""
