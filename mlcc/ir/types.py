"""Types of IR values: dtypes, symbolic dimensions, tensor types and the KV-cache type.

A dimension is either a Python int or a `Sym`, a named symbol such as `seq_len` whose value is
bound when a function runs (from the shapes of its inputs). Shapes print symbols by name:
`f32[seq_len, 4096]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

# Short names used by the printer, and the NumPy dtype that stores each one.
DTYPES: dict[str, tuple[str, type]] = {
    "float32": ("f32", np.float32),
    "float16": ("f16", np.float16),
    "float64": ("f64", np.float64),
    "int32": ("i32", np.int32),
    "int64": ("i64", np.int64),
    "uint32": ("u32", np.uint32),
    "uint8": ("u8", np.uint8),
    "int8": ("i8", np.int8),
    "bool": ("bool", np.bool_),
}
FLOAT_DTYPES = frozenset({"float32", "float16", "float64"})
SHORT_TO_DTYPE = {short: name for name, (short, _) in DTYPES.items()}


def check_dtype(dtype: str) -> str:
    """Return `dtype` if it is known, else raise ValueError listing the known ones."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return dtype


def numpy_dtype(dtype: str) -> type:
    return DTYPES[check_dtype(dtype)][1]


@dataclass(frozen=True, order=True)
class Sym:
    """A named symbolic dimension, e.g. `Sym("seq_len")`."""

    name: str

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Sym({self.name!r})"


Dim = Union[int, Sym]


def dim_str(dim: Dim) -> str:
    return str(dim)


@dataclass(frozen=True)
class TensorType:
    """A tensor of `dtype` whose shape holds ints and symbols."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, Sym)):
                raise ValueError(f"shape dims must be int or Sym, got {dim!r} in {self.shape}")
            if isinstance(dim, int) and dim < 0:
                raise ValueError(f"shape dims must be >= 0, got {dim} in {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def symbols(self) -> frozenset[Sym]:
        return frozenset(d for d in self.shape if isinstance(d, Sym))

    def __str__(self) -> str:
        return f"{DTYPES[self.dtype][0]}[{', '.join(dim_str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class KVCacheType:
    """The key/value cache of one sequence, as the model sees it.

    Logically a cache holds, per layer, the keys and values of every position processed so far;
    attention appends to it. `sliding_window` (-1 = none) and `sink_size` say which positions a
    query may see. How it is laid out in memory (paged, ring buffer) is decided by a pass.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    capacity: int  # most positions a sequence may hold (context window, or window + sinks)
    sliding_window: int = -1
    sink_size: int = 0

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    @property
    def symbols(self) -> frozenset[Sym]:
        return frozenset()

    def __str__(self) -> str:
        return (
            f"kv_cache<layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, {DTYPES[self.dtype][0]}, capacity={self.capacity}, "
            f"window={self.sliding_window}, sinks={self.sink_size}>"
        )


Type = Union[TensorType, KVCacheType]


# --- symbolic size arithmetic: a product of ints and symbols, kept as (constant, symbols) ----


def dims_product(dims: tuple[Dim, ...]) -> tuple[int, tuple[str, ...]]:
    """Normal form of a product of dims, so that reshapes can be checked symbolically."""
    const = 1
    names: list[str] = []
    for d in dims:
        if isinstance(d, Sym):
            names.append(d.name)
        else:
            const *= d
    if const == 0:
        return 0, ()  # zero elements whatever the symbols are bound to
    return const, tuple(sorted(names))


def broadcast_shapes(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """NumPy broadcasting with symbols; a symbol only broadcasts with itself or with 1."""
    rank = max(len(a), len(b))
    pa = (1,) * (rank - len(a)) + tuple(a)
    pb = (1,) * (rank - len(b)) + tuple(b)
    out: list[Dim] = []
    for da, db in zip(pa, pb):
        if da == db:
            out.append(da)
        elif da == 1:
            out.append(db)
        elif db == 1:
            out.append(da)
        else:
            raise ValueError(f"shapes {format_shape(a)} and {format_shape(b)} do not broadcast")
    return tuple(out)


def format_shape(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"
