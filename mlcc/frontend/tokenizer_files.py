"""Tokenizer files that travel with a model: what to copy, and tokenizer.json from SentencePiece.

The runtime loads tokenizers with the `tokenizers` library only, so when a model ships nothing but
a SentencePiece `tokenizer.model`, an equivalent `tokenizer.json` is built here. The `.model` file
is a protobuf (`sentencepiece_model.proto`); the few fields needed are read directly from the wire
format, so neither sentencepiece nor transformers is needed at run time.

Equivalence with SentencePiece:
- BPE: the vocabulary is the pieces in id order; the merges are every split of a normal piece into
  two normal pieces, ranked by the merged piece's score (SentencePiece merges the best-scoring pair
  first). Unigram: the pieces and scores as they are.
- Normalizer: the precompiled character map (when the model has one), then SentencePiece's
  whitespace rules: `remove_extra_whitespaces` strips and collapses spaces, `add_dummy_prefix`
  prepends one, and spaces become U+2581.
- Decoder: U+2581 back to spaces, byte pieces back to UTF-8, and the dummy-prefix space dropped.
- Control and unknown pieces become special tokens, user-defined pieces added tokens; BOS is added
  by the post-processor as the Hugging Face Llama tokenizer does.
Known differences, both outside what encoding text produces: special tokens written in the text
(`<s>`) are matched as tokens, and decoding skips the unknown piece where SentencePiece writes
" ⁇ "; decoding a run of byte pieces that is not valid UTF-8 gives one U+FFFD per byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from mlcc.errors import MlccError

STAGE = "gen_config"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
SPACE = "\u2581"

# SentencePiece.Type and TrainerSpec.ModelType values of sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_MODEL_TYPE_NAMES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


@dataclass(frozen=True)
class Piece:
    """One vocabulary entry of a SentencePiece model."""

    text: str
    score: float
    kind: int = NORMAL


@dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto that decide how text is tokenized."""

    pieces: tuple[Piece, ...]
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _iter_fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """Yield (field number, wire type, value) of one protobuf message, values still raw."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        if pos > len(data):
            raise ValueError(f"field {number} runs past the end of the message")
        yield number, wire, value


def _int32(value: int) -> int:
    """Protobuf encodes a negative int32 as a 64-bit two's-complement varint."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_piece(data: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, _, value in _iter_fields(data):
        if number == 1:
            text = value.decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            kind = value
    return Piece(text, score, kind)


# Field numbers of TrainerSpec and NormalizerSpec that change how text is tokenized.
_TRAINER_FIELDS = {
    3: "model_type",
    35: "byte_fallback",
    40: "unk_id",
    41: "bos_id",
    24: "treat_whitespace_as_suffix",
}
_NORMALIZER_FIELDS = {
    2: "precompiled_charsmap",
    3: "add_dummy_prefix",
    4: "remove_extra_whitespaces",
    5: "escape_whitespaces",
}


def _parse_spec(data: bytes, names: dict[int, str]) -> dict:
    spec: dict = {}
    for number, _, value in _iter_fields(data):
        name = names.get(number)
        if name is None:
            continue
        if name == "precompiled_charsmap":
            spec[name] = bytes(value)
        elif name.endswith("_id"):
            spec[name] = _int32(value)
        elif name == "model_type":
            spec[name] = value
        else:
            spec[name] = bool(value)
    return spec


def parse_sentencepiece_model(data: bytes, origin: str = "tokenizer.model") -> SentencePieceModel:
    """Read a serialized SentencePiece ModelProto (the content of tokenizer.model)."""
    pieces: list[Piece] = []
    spec: dict = {}
    try:
        for number, wire, value in _iter_fields(data):
            if wire != 2:
                continue
            if number == 1:
                pieces.append(_parse_piece(value))
            elif number == 2:
                spec.update(_parse_spec(value, _TRAINER_FIELDS))
            elif number == 3:
                spec.update(_parse_spec(value, _NORMALIZER_FIELDS))
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise MlccError(
            STAGE, f"{origin}: not a SentencePiece model ({err}); check the file is not corrupt"
        ) from None
    if not pieces:
        raise MlccError(
            STAGE, f"{origin}: no vocabulary pieces found; is it a SentencePiece model?"
        )
    return SentencePieceModel(pieces=tuple(pieces), **spec)


def _check_supported(model: SentencePieceModel, origin: str) -> None:
    if model.model_type not in (BPE, UNIGRAM):
        kind = _MODEL_TYPE_NAMES.get(model.model_type, str(model.model_type))
        raise MlccError(
            STAGE,
            f"{origin}: SentencePiece model type {kind} cannot be converted to tokenizer.json "
            "(only BPE and UNIGRAM can); provide a tokenizer.json next to it",
        )
    if model.treat_whitespace_as_suffix:
        raise MlccError(
            STAGE,
            f"{origin}: treat_whitespace_as_suffix=true has no tokenizer.json equivalent; "
            "provide a tokenizer.json next to it",
        )
    if not 0 <= model.unk_id < len(model.pieces):
        raise MlccError(
            STAGE, f"{origin}: unk_id {model.unk_id} is outside the {len(model.pieces)} pieces"
        )


def bpe_merges(pieces: tuple[Piece, ...]) -> list[tuple[str, str]]:
    """Merges that make HF BPE pick the same pairs as SentencePiece BPE.

    SentencePiece joins the adjacent pair whose union is the best-scoring normal piece; ranking
    every two-piece split of each normal piece by that score reproduces the order.
    """
    ids = {p.text: i for i, p in enumerate(pieces) if p.kind == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for merged_id, piece in enumerate(pieces):
        if piece.kind != NORMAL:
            continue
        for cut in range(1, len(piece.text)):
            left, right = piece.text[:cut], piece.text[cut:]
            if left in ids and right in ids:
                ranked.append(
                    (-piece.score, merged_id, ids[left] * len(pieces) + ids[right], left, right)
                )
    ranked.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in ranked]


def _normalizer(model: SentencePieceModel):
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        # tokenizers uses Oniguruma, where ^ and $ also match at line breaks.
        steps.append(normalizers.Replace(Regex(r"\A | \z"), ""))
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE if model.escape_whitespaces else " "))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(model: SentencePieceModel):
    steps = []
    if model.escape_whitespaces:
        steps.append(decoders.Replace(SPACE, " "))
    if model.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    # SentencePiece drops the space in front of the first piece under either whitespace rule.
    if model.add_dummy_prefix or model.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def sentencepiece_to_tokenizer_json(
    model: SentencePieceModel, origin: str = "tokenizer.model"
) -> str:
    """Serialized `tokenizers` JSON that tokenizes exactly like the SentencePiece `model`."""
    _check_supported(model, origin)
    unk = model.pieces[model.unk_id].text
    if model.model_type == BPE:
        vocab = {p.text: i for i, p in enumerate(model.pieces)}
        core = models.BPE(
            vocab=vocab,
            merges=bpe_merges(model.pieces),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=model.byte_fallback,
        )
    else:
        core = models.Unigram(
            [(p.text, p.score) for p in model.pieces], model.unk_id, model.byte_fallback
        )
    tokenizer = Tokenizer(core)
    tokenizer.normalizer = _normalizer(model)
    tokenizer.decoder = _decoder(model)
    # These pieces are in the vocabulary already and keep their ids; as added tokens they are
    # matched whole in text, and the special ones are skipped when decoding.
    added = [
        AddedToken(p.text, special=p.kind != USER_DEFINED, normalized=False)
        for p in model.pieces
        if p.kind in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    tokenizer.add_tokens([t for t in added if not t.special])
    tokenizer.add_special_tokens([t for t in added if t.special])
    if 0 <= model.bos_id < len(model.pieces):
        bos = model.pieces[model.bos_id].text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, model.bos_id)],
        )
    return tokenizer.to_str(pretty=True)


@dataclass(frozen=True)
class TokenizerFile:
    """A file to write into the output folder, already in memory."""

    name: str
    data: bytes
    origin: str  # where it comes from, for the log


@dataclass(frozen=True)
class TokenizerBundle:
    """The tokenizer files of a model, and its tokenizer.json loaded (None when it has none)."""

    files: tuple[TokenizerFile, ...]
    tokenizer: Tokenizer | None

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]


def load_tokenizer_json(data: bytes, origin: str) -> Tokenizer:
    """Load tokenizer.json content with `tokenizers`; MlccError naming the file if it cannot."""
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exceptions from Rust
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MlccError(
            STAGE,
            f"{origin}: the `tokenizers` library cannot load it ({first_line}); "
            "replace the file with a valid tokenizer.json",
        ) from None


def collect_tokenizer_files(src_dir: Path) -> TokenizerBundle:
    """Read the tokenizer files of `src_dir`, adding tokenizer.json made from tokenizer.model
    when only the latter exists. Nothing is written; MlccError if a file is unusable."""
    src_dir = Path(src_dir)
    files = [
        TokenizerFile(name, (src_dir / name).read_bytes(), str(src_dir / name))
        for name in TOKENIZER_FILES
        if (src_dir / name).is_file()
    ]
    by_name = {f.name: f for f in files}
    if "tokenizer.json" not in by_name and "tokenizer.model" in by_name:
        sp_file = by_name["tokenizer.model"]
        model = parse_sentencepiece_model(sp_file.data, sp_file.origin)
        text = sentencepiece_to_tokenizer_json(model, sp_file.origin)
        converted = TokenizerFile(
            "tokenizer.json", text.encode("utf-8"), f"converted from {sp_file.origin}"
        )
        files.insert(0, converted)
        by_name["tokenizer.json"] = converted
    json_file = by_name.get("tokenizer.json")
    tokenizer = load_tokenizer_json(json_file.data, json_file.origin) if json_file else None
    return TokenizerBundle(tuple(files), tokenizer)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name in the same folder, then rename it onto `path`, so
    readers never see a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_tokenizer_files(bundle: TokenizerBundle, out_dir: Path) -> list[str]:
    """Write each file of `bundle` into `out_dir` (atomically); returns the names written."""
    for item in bundle.files:
        write_file_atomic(Path(out_dir) / item.name, item.data)
    return bundle.names
