"""What one sweep measures: models, levels, quantization, lengths and repeats, all validated."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from mlcc.errors import MlccError

STAGE = "benchmarks"
DEFAULT_MODELS = ("stories260K", "random-llama-100m")
DEFAULT_LEVELS = ("O0", "O1", "O2", "O3")
BASELINE_LEVEL = "O0"
CPU_DEVICES = ("cpu", "llvm")
PEER_DTYPES = ("float32", "bfloat16", "float16")
# On a GPU the peer runs eagerly per dtype, and "float16-compiled" is transformers float16 with
# a static KV cache and torch.compile (its documented fast path), timed through generate().
COMPILED_PEER = "float16-compiled"
PEER_KINDS = (*PEER_DTYPES, COMPILED_PEER)
GPU_DEFAULT_PEERS = ("float16", COMPILED_PEER)


@dataclass(frozen=True)
class SweepSpec:
    """One sweep. `budget_seconds` stops repeating a measurement once it has taken that long
    (after at least one timed run), so slow levels of big models finish in bounded time."""

    models: tuple[str, ...] = DEFAULT_MODELS
    levels: tuple[str, ...] = DEFAULT_LEVELS
    quantization: str = "q4f16_1"
    device: str = "cpu"
    prompt_lengths: tuple[int, ...] = (16, 64, 128)
    decode_tokens: int = 32
    gate_tokens: int = 32
    reference_steps: int = 8
    repeats: int = 5
    budget_seconds: float = 30.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    peers: tuple[str, ...] = PEER_DTYPES
    max_batch_size: int = 1
    child_timeout: float = 1200.0
    reuse_libraries: bool = True
    prebuilt: str | None = None  # a folder from `python -m benchmarks build` (GPU machines)

    def __post_init__(self) -> None:
        check_device(self.device)
        for level in self.levels:
            check_level(level)
        if not self.models:
            raise MlccError(STAGE, "--model: name at least one model")
        if self.reference_steps < 0:
            raise MlccError(STAGE, f"--reference-steps must be >= 0, got {self.reference_steps}")
        for key in ("decode_tokens", "gate_tokens", "repeats", "threads", "max_batch_size"):
            if getattr(self, key) < 1:
                raise MlccError(STAGE, f"--{key.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, key)}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise MlccError(STAGE, f"--prompt-lengths must be positive integers, got "
                            f"{list(self.prompt_lengths)}")
        bad = [p for p in self.peers if p not in PEER_KINDS]
        if bad:
            raise MlccError(STAGE, f"--peer {','.join(bad)} is not a peer this harness runs; "
                            f"use some of {','.join(PEER_KINDS)} or none")
        if COMPILED_PEER in self.peers and not self.on_gpu:
            raise MlccError(STAGE, f"--peer {COMPILED_PEER} runs on a GPU only; drop it for "
                            "--device cpu")

    @property
    def on_gpu(self) -> bool:
        return not is_cpu(self.device)

    @property
    def compiled_levels(self) -> tuple[str, ...]:
        """The levels to build: the baseline of the correctness gate first, then the rest."""
        rest = tuple(level for level in self.levels if level != BASELINE_LEVEL)
        return (BASELINE_LEVEL, *rest)

    def to_json(self) -> dict:
        return asdict(self)


def is_cpu(device: str) -> bool:
    return device.strip().lower() in CPU_DEVICES


def check_device(device: str) -> None:
    """CPU and CUDA libraries are measured; other devices fail with one line that says so."""
    name = device.strip().lower()
    if name in CPU_DEVICES or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        return
    raise MlccError(STAGE, f"--device {device!r} is not supported by the harness; use cpu, "
                    "cuda or cuda:N")


def check_level(level: str) -> None:
    """`level` parses as a compile --opt value ("O2", "O2;fuse_add_norm=0")."""
    from mlcc.passes import parse_opt

    try:
        parse_opt(level)
    except MlccError as err:
        raise MlccError(STAGE, f"--opt {level!r}: {err.message}") from None


def parse_list(text: str) -> tuple[str, ...]:
    """"O0,O1, O2;fuse_add_norm=0" -> ("O0", "O1", "O2;fuse_add_norm=0")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in parse_list(text))
    except ValueError:
        raise MlccError(STAGE, f"{option} {text!r} must be comma-separated integers, e.g. "
                        "16,64,128") from None


def level_slug(level: str) -> str:
    """A file-name-safe name for a level: "O2;fuse_add_norm=0" -> "O2-fuse_add_norm=0"."""
    return re.sub(r"[^A-Za-z0-9_=]+", "-", level).strip("-")


def capped_lengths(lengths: tuple[int, ...], context: int, decode_tokens: int) -> list[int]:
    """Prompt lengths that leave room for the decode run in a context of `context` tokens."""
    room = context - decode_tokens - 1 if context > 0 else max(lengths)
    kept = sorted({n for n in lengths if n <= room})
    return kept or [max(1, room)]


def bench_prompt(vocab_size: int, length: int, bos_token_id: int | None,
                 seed: int = 0) -> list[int]:
    """A fixed prompt of `length` token ids: BOS, then ids drawn once from a seeded generator.

    Speed does not depend on which tokens are fed, and fixed ids make every level, every run
    and the peer see the same input.
    """
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)  # past the usual unk/bos/eos ids
    ids = rng.integers(low, vocab_size, size=length).tolist()
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        ids[0] = int(bos_token_id)
    return ids
