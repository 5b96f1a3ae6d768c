"""Tokenizer files: the SentencePiece reader and tokenizer.json conversion against sentencepiece.

sentencepiece itself is the reference: the converted tokenizer.json must give the same ids and the
same decoded text on generated sentences of prose, unicode, digits, whitespace runs and code.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlcc.errors import MlccError
from mlcc.frontend.tokenizer_files import (
    BPE,
    CONTROL,
    NORMAL,
    Piece,
    SentencePieceModel,
    bpe_merges,
    collect_tokenizer_files,
    parse_sentencepiece_model,
    sentencepiece_to_tokenizer_json,
    write_tokenizer_files,
)

spm = pytest.importorskip("sentencepiece")
SHARED = Path(__file__).parents[2].parent / "shared"
LLAMA2_MODEL = SHARED / "tokenizers" / "llama2-sentencepiece" / "tokenizer.model"
STORIES_DIR = SHARED / "models" / "stories260K"

# Words, scripts, emoji (with joiners and flags), symbols and a zero-width space.
_WORD_TEXT = (
    "the quick brown fox jumps over lazy dog Once upon a time there was little girl named Lily "
    "she loved to play outside in park One day saw big red ball wanted with it but too high "
    "naïve café Größe façade coöperate jalapeño Ångström Привет мир Здравствуйте ελληνικά 你好 "
    "世界 中文分词 こんにちは カタカナ 안녕하세요 مرحبا שלום नमस्ते ไทย Việt 😀 🦙 👩\u200d💻 🇫🇷 x² ½ € £ — – … "
    "“quoted” ‘single’ don't it's we'll e.g. i.e. http://example.com/a?b=c&d=1 foo_bar "
    "CamelCase UPPER MiXeD ﬁ Ω ß İstanbul \u200b ∑ ∫ √ ≤ ≥"
)
_WORDS = _WORD_TEXT.split(" ")
_CODE = (
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT name, COUNT(*) FROM users WHERE id = 42 GROUP BY name;",
    '<div class="a">hi &amp; bye</div>',
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 7); }',
    'fn main() { println!("{}", 1_000_000); }',
    "$ ls -la | grep '.py' > out.txt 2>&1",
    "    if (a && !b) || c:\n        pass",
)
_SEPARATORS = (" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "", " \t ", "\r\n", "    ")
_SPECIAL_TEXT = ("<s>", "</s>", "<unk>")


def _number(rng: random.Random) -> str:
    forms = (
        lambda: str(rng.randint(0, 9)),
        lambda: str(rng.randint(-(10**6), 10**9)),
        lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(1, 6)}f}",
        lambda: f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(1900, 2100)}",
        lambda: f"{rng.randint(0, 10**12):,}",
    )
    return rng.choice(forms)()


def _random_char(rng: random.Random) -> str:
    while True:
        code = rng.randint(0x20, 0x2FFFF)
        if not 0xD800 <= code <= 0xDFFF and code != 0x7F:
            return chr(code)


def make_sentences(count: int, seed: int) -> list[str]:
    """Deterministic varied test sentences, none holding special-token text like `<s>`."""
    rng = random.Random(seed)
    sentences: dict[str, None] = {}  # ordered and without repeats
    while len(sentences) < count:
        parts = []
        for _ in range(rng.randint(1, 14)):
            roll = rng.random()
            if roll < 0.6:
                parts.append(rng.choice(_WORDS))
            elif roll < 0.75:
                parts.append(_number(rng))
            elif roll < 0.85:
                parts.append(rng.choice(_CODE))
            elif roll < 0.95:
                parts.append("".join(_random_char(rng) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice("!?.,;:()[]{}'\"-*/\\@#%^&|~`"))
            parts.append(rng.choice(_SEPARATORS))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = rng.choice(("", " ", "  ", "\n", "\t")) + text
        if not any(s in text for s in _SPECIAL_TEXT):
            sentences[text] = None
    return list(sentences)


def test_sentences_are_varied_and_deterministic():
    sentences = make_sentences(1000, seed=5)
    assert sentences == make_sentences(1000, seed=5)
    assert len(set(sentences)) == 1000
    joined = "".join(sentences)
    for needle in ("  ", "\t", "\n", "你", "🦙", "def ", "0", "é"):
        assert needle in joined


@pytest.fixture(scope="module")
def llama2_pair():
    model = parse_sentencepiece_model(LLAMA2_MODEL.read_bytes())
    converted = Tokenizer.from_str(sentencepiece_to_tokenizer_json(model))
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL)), converted


@pytest.mark.parametrize(
    "path", [LLAMA2_MODEL, STORIES_DIR / "tokenizer.model"], ids=["llama2", "stories"]
)
def test_reader_matches_sentencepiece_protobuf(path: Path):
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    model = parse_sentencepiece_model(path.read_bytes())
    assert [(p.text, p.kind) for p in model.pieces] == [(p.piece, p.type) for p in proto.pieces]
    assert [p.score for p in model.pieces] == pytest.approx([p.score for p in proto.pieces])
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    assert (model.model_type, model.byte_fallback) == (trainer.model_type, trainer.byte_fallback)
    assert (model.unk_id, model.bos_id) == (trainer.unk_id, trainer.bos_id)
    assert model.add_dummy_prefix == norm.add_dummy_prefix
    assert model.remove_extra_whitespaces == norm.remove_extra_whitespaces
    assert model.precompiled_charsmap == norm.precompiled_charsmap


def _char_starts(sp, ids: list[int]) -> list[int]:
    """0 and two later positions that do not cut a byte-fallback character."""
    starts = [0]
    for start in (len(ids) // 3, len(ids) // 2):
        while start < len(ids) and sp.is_byte(ids[start]):
            start += 1
        starts.append(start)
    return starts


def test_llama2_conversion_matches_sentencepiece_on_1000_sentences(llama2_pair):
    sp, converted = llama2_pair
    mismatches = []
    for text in make_sentences(1000, seed=2026):
        expected = sp.encode(text)
        got = converted.encode(text, add_special_tokens=False).ids
        if got != expected:
            mismatches.append((text, expected, got))
            continue
        # Decoding must agree too, also from the middle of the sequence (streaming windows). A
        # window starts on a whole character: the two libraries replace the bytes of a cut
        # character differently (one U+FFFD per byte of the whole byte run in `tokenizers`).
        for start in _char_starts(sp, expected):
            if converted.decode(expected[start:]) != sp.decode(expected[start:]):
                mismatches.append((text, start, converted.decode(expected[start:])))
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[:3]}"


def test_llama2_conversion_adds_bos_and_keeps_special_tokens(llama2_pair):
    sp, converted = llama2_pair
    assert converted.encode("Hello world").ids == [sp.bos_id()] + sp.encode("Hello world")
    assert converted.token_to_id("<s>") == 1 and converted.token_to_id("</s>") == 2
    assert converted.get_vocab_size() == sp.get_piece_size() == 32000
    # Templates write BOS/EOS as text; they must become the special ids.
    assert converted.encode("</s><s>[INST]", add_special_tokens=False).ids[:2] == [2, 1]
    assert converted.decode([1, 15043, 2]) == "Hello"


def test_llama2_conversion_equals_shared_reference_json(llama2_pair):
    # shared/tokenizers/llama2/tokenizer.json was built independently from the same model.
    _, converted = llama2_pair
    reference = Tokenizer.from_file(str(SHARED / "tokenizers" / "llama2" / "tokenizer.json"))
    for text in make_sentences(300, seed=77):
        assert converted.encode(text).ids == reference.encode(text).ids, text


def test_stories_conversion_matches_sentencepiece_and_shipped_json():
    path = STORIES_DIR / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    converted = Tokenizer.from_str(
        sentencepiece_to_tokenizer_json(parse_sentencepiece_model(path.read_bytes()))
    )
    shipped = Tokenizer.from_file(str(STORIES_DIR / "tokenizer.json"))
    for text in make_sentences(400, seed=9):
        ids = sp.encode(text)
        assert converted.encode(text, add_special_tokens=False).ids == ids, text
        assert shipped.encode(text, add_special_tokens=False).ids == ids, text
        assert converted.decode(ids) == sp.decode(ids), text


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
@pytest.mark.parametrize("byte_fallback", [False, True], ids=["unk", "byte_fallback"])
def test_trained_models_with_nfkc_charsmap_match_sentencepiece(model_type, byte_fallback):
    # Trained here with SentencePiece's defaults: NFKC through a precompiled character map,
    # remove_extra_whitespaces=true, and (without byte fallback) an unknown piece.
    rng = random.Random(3)
    corpus = [
        " ".join(rng.choice(_WORDS) for _ in range(12)) + rng.choice(["", " " + rng.choice(_CODE)])
        for _ in range(2000)
    ]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=600,
        hard_vocab_limit=False, model_type=model_type, byte_fallback=byte_fallback, minloglevel=2,
    )
    model = parse_sentencepiece_model(buffer.getvalue())
    assert model.precompiled_charsmap and model.remove_extra_whitespaces
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    converted = Tokenizer.from_str(sentencepiece_to_tokenizer_json(model))
    unknown_seen = 0
    for text in make_sentences(300, seed=42):
        ids = sp.encode(text)
        assert converted.encode(text, add_special_tokens=False).ids == ids, text
        if sp.unk_id() in ids:
            unknown_seen += 1  # decodes differently by design (see the module docstring)
        else:
            assert converted.decode(ids) == sp.decode(ids), text
    assert (unknown_seen > 0) != byte_fallback


def test_bpe_merges_rank_by_merged_piece_score():
    pieces = (
        Piece("<unk>", 0.0, 2),
        Piece("<s>", 0.0, CONTROL),
        Piece("a", -10.0),
        Piece("b", -11.0),
        Piece("c", -12.0),
        Piece("ab", -1.0),
        Piece("bc", -2.0),
        Piece("abc", -3.0),
        Piece("<", -20.0),
        Piece("s>", -21.0),
    )
    # "<s>" is a control piece: text never merges into it. "abc" has two splits, by id order.
    assert bpe_merges(pieces) == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_unsupported_sentencepiece_models_fail_clearly():
    word_model = SentencePieceModel(pieces=(Piece("<unk>", 0.0, 2), Piece("a", -1.0)), model_type=3)
    with pytest.raises(MlccError, match=r"^\[gen_config\] x.model: SentencePiece model type WORD"):
        sentencepiece_to_tokenizer_json(word_model, "x.model")
    suffix = SentencePieceModel(
        pieces=(Piece("<unk>", 0.0, 2),), model_type=BPE, treat_whitespace_as_suffix=True
    )
    with pytest.raises(MlccError, match="treat_whitespace_as_suffix"):
        sentencepiece_to_tokenizer_json(suffix)
    with pytest.raises(MlccError, match="not a SentencePiece model"):
        parse_sentencepiece_model(b"\x0a\xff\xff\xff", "bad.model")
    with pytest.raises(MlccError, match="no vocabulary pieces"):
        parse_sentencepiece_model(b"", "empty.model")
    assert NORMAL == 1


def test_collect_copies_existing_files_byte_for_byte(tmp_path: Path):
    bundle = collect_tokenizer_files(STORIES_DIR)
    names = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert bundle.names == names
    assert bundle.tokenizer.encode("Once upon a time").ids == [1, 403, 407, 261, 378]
    out = tmp_path / "out"
    out.mkdir()
    (out / "params_shard_0.bin").write_bytes(b"weights")
    assert write_tokenizer_files(bundle, out) == names
    for name in names:
        assert (out / name).read_bytes() == (STORIES_DIR / name).read_bytes()
    # Other files stay, and no temporary file is left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "params_shard_0.bin"])
    assert (out / "params_shard_0.bin").read_bytes() == b"weights"


def test_collect_converts_when_only_sentencepiece_exists(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_bytes(LLAMA2_MODEL.read_bytes())
    bundle = collect_tokenizer_files(tmp_path)
    assert bundle.names == ["tokenizer.json", "tokenizer.model"]
    assert bundle.files[0].origin.startswith("converted from")
    tok = Tokenizer.from_str(bundle.files[0].data.decode())
    assert tok.encode("Hello world", add_special_tokens=False).ids == [15043, 3186]
    assert bundle.tokenizer.encode("Hello world").ids == [1, 15043, 3186]


def test_collect_rejects_broken_tokenizer_json(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(MlccError, match=r"tokenizer.json: the `tokenizers` library cannot load"):
        collect_tokenizer_files(tmp_path)


def test_collect_without_tokenizer_files_is_empty(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    bundle = collect_tokenizer_files(tmp_path)
    assert bundle.files == () and bundle.tokenizer is None
