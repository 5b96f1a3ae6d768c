"""What every LLVM kernel generator shares: symbolic extents, naming, the vector width.

Kernels are `tvm.tirx.PrimFunc`s whose exported name is their `global_symbol`. Every extent is
either a Python int or the name of a symbol (`"seq_len"`); a symbol becomes an int64 TIR variable
that the kernel binds from the shape of the first buffer that uses it, so one compiled kernel
serves every length. Index arithmetic stays in int64 throughout.
"""

from __future__ import annotations

from tvm import tirx

from mlcc.backends.layouts import Dim
from mlcc.errors import MlccError

STAGE = "compile"
# 16 float32 lanes: one AVX-512 register; LLVM splits wider vectors for narrower machines.
VECTOR_LANES = 16
Extent = int | tirx.Var


def extent(dim: Dim) -> Extent:
    """An int stays an int; a symbol name becomes a fresh int64 variable."""
    if isinstance(dim, bool) or not isinstance(dim, (int, str)):
        raise MlccError(STAGE, f"extent {dim!r} must be an int or a symbol name")
    if isinstance(dim, int):
        if dim <= 0:
            raise MlccError(STAGE, f"extent {dim} must be positive")
        return dim
    if not dim.isidentifier():
        raise MlccError(STAGE, f"symbol name {dim!r} must be an identifier such as 'seq_len'")
    return tirx.Var(dim, "int64")


def finish(func: tirx.PrimFunc, name: str, scheduled: bool = True) -> tirx.PrimFunc:
    """Give a kernel its exported name; `scheduled` marks loop nests that are final."""
    if not name.isidentifier():
        raise MlccError(STAGE, f"kernel name {name!r} must be a C identifier")
    func = func.with_attr("global_symbol", name)
    return func.with_attr("tirx.is_scheduled", True) if scheduled else func


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
