"""Memory layouts that kernels, entry functions and the runtime agree on.

- `GroupQuantLayout`: a group-quantized weight W [N, K] stored as `q_weight` uint32
  [N, K_pad // per_word] and `q_scale` [N, K_pad // group_size] (design.md §5). Code j of a word
  sits at bit j * bits, low bits first; W[n, k] = (code - max_int) * scale[n, k // group_size];
  K is padded with zero weights to a multiple of the group size.
- `PagedKVSpec`: the KV cache of one layer, `kv_pages: dtype[num_pages, 2, kv_heads, 16,
  head_dim]` (index 0 = keys, 1 = values) addressed through a per-sequence
  `page_table: int32[max_pages]`. Without a sliding window, logical position p lives in slot p.
  With a window W and S attention sinks the cache is a ring of `capacity` slots: p < S keeps
  slot p, later positions wrap around the C = capacity - S remaining slots. `physical_slot` is the
  one place that mapping is written; the append and the attention kernels both call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mlcc.errors import MlccError

STAGE = "compile"
Dim = int | str  # a static extent, or the name of a symbolic one ("seq_len")
FLOAT_DTYPES = ("float32", "float16")
KV_PAGE_SIZE = 16


def check_float_dtype(what: str, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise MlccError(STAGE, f"{what}: dtype {dtype!r} is not supported; use one of "
                        f"{', '.join(FLOAT_DTYPES)}")


@dataclass(frozen=True)
class GroupQuantLayout:
    """Where the codes and scales of a group-quantized weight row live."""

    bits: int
    group_size: int
    k: int  # in_features before padding

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise MlccError(STAGE, f"group quantization with {self.bits} bits is not supported; "
                            "use 3, 4 or 8")
        if self.k <= 0 or self.group_size <= 0 or self.group_size % self.per_word:
            raise MlccError(STAGE, f"group_size {self.group_size} must be a positive multiple of "
                            f"the {self.per_word} codes per uint32 word ({self.bits} bits), "
                            f"and K={self.k} must be positive")

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def k_pad(self) -> int:
        return -(-self.k // self.group_size) * self.group_size

    @property
    def num_words(self) -> int:
        return self.k_pad // self.per_word

    @property
    def num_groups(self) -> int:
        return self.k_pad // self.group_size

    @property
    def words_per_group(self) -> int:
        return self.group_size // self.per_word


@dataclass(frozen=True)
class PagedKVSpec:
    """One layer's paged KV cache and the positions a query may see."""

    num_kv_heads: int
    head_dim: int
    dtype: str
    num_pages: int  # pages in the pool (the page table may name any of them)
    sliding_window: int = -1  # W; -1 = every earlier position is visible
    attention_sink: int = 0  # S: the first S positions stay visible under a window
    capacity: int = -1  # slots of the ring (windowed only): a multiple of 16, >= S + W + chunk

    PAGE_SIZE: ClassVar[int] = KV_PAGE_SIZE

    def __post_init__(self) -> None:
        check_float_dtype("KV cache", self.dtype)
        if self.num_kv_heads <= 0 or self.head_dim <= 0 or self.num_pages <= 0:
            raise MlccError(STAGE, f"KV cache: kv_heads {self.num_kv_heads}, head_dim "
                            f"{self.head_dim} and pages {self.num_pages} must all be positive")
        if self.sliding_window == 0 or self.sliding_window < -1 or self.attention_sink < 0:
            raise MlccError(STAGE, f"KV cache: sliding window {self.sliding_window} must be -1 "
                            f"or positive and sinks {self.attention_sink} must be >= 0")
        if self.windowed and (self.capacity <= self.attention_sink + self.sliding_window
                              or self.capacity % self.PAGE_SIZE):
            raise MlccError(STAGE, f"KV ring capacity {self.capacity} must be a multiple of "
                            f"{self.PAGE_SIZE} larger than sinks + window "
                            f"({self.attention_sink} + {self.sliding_window})")

    @property
    def windowed(self) -> bool:
        return self.sliding_window > 0

    @property
    def pages_per_sequence(self) -> int:
        """Length of the page table when the cache is a ring; -1 (any) without a window."""
        return self.capacity // self.PAGE_SIZE if self.windowed else -1

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_pages, 2, self.num_kv_heads, self.PAGE_SIZE, self.head_dim)

    def check_chunk(self, prefill_chunk_size: int) -> None:
        """A chunk must never overwrite ring slots that a query of the same chunk still reads."""
        need = self.attention_sink + self.sliding_window + prefill_chunk_size
        if self.windowed and self.capacity < need:
            raise MlccError(STAGE, f"KV ring capacity {self.capacity} is below sinks + window + "
                            f"prefill chunk = {need}; raise the capacity to "
                            f"{-(-need // self.PAGE_SIZE) * self.PAGE_SIZE}")

    def physical_slot(self, pos: Any) -> Any:
        """Slot of logical position `pos` (an int or an int TIR expression)."""
        if not self.windowed:
            return pos
        from tvm import tirx

        sinks = self.attention_sink
        ring = self.capacity - sinks
        if isinstance(pos, int):
            return pos if pos < sinks else sinks + (pos - sinks) % ring
        wrapped = tirx.floormod(pos - sinks, ring) + sinks
        return wrapped if sinks == 0 else tirx.Select(pos < sinks, pos, wrapped)

    @classmethod
    def from_layout(cls, layout: Mapping[str, Any]) -> PagedKVSpec:
        """Build from the `kv_layout` module attribute of the KV-layout pass."""
        if layout.get("page_size", KV_PAGE_SIZE) != KV_PAGE_SIZE:
            raise MlccError(STAGE, f"kv_layout page_size {layout['page_size']} is not supported; "
                            f"the kernels use pages of {KV_PAGE_SIZE} positions")
        ring = bool(layout.get("ring", False))
        return cls(int(layout["kv_heads"]), int(layout["head_dim"]), str(layout["dtype"]),
                   int(layout["pages"]), int(layout["window"]) if ring else -1,
                   int(layout.get("sinks", 0)) if ring else 0,
                   int(layout["capacity"]) if ring else -1)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for library metadata."""
        return {"page_size": self.PAGE_SIZE, "num_pages": self.num_pages,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "dtype": self.dtype,
                "sliding_window": self.sliding_window, "attention_sink": self.attention_sink,
                "capacity": self.capacity,
                "layout": "[num_pages, 2 (k, v), kv_heads, page_size, head_dim]"}


def dims_text(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def lanes_dividing(extent: int, widest: int = 16) -> int:
    """The widest power-of-two vector width <= `widest` that divides `extent` (at least 1)."""
    lanes = widest
    while lanes > 1 and extent % lanes:
        lanes //= 2
    return lanes

