"""GPU kernels from the portable kernels: every top-level loop nest becomes one thread grid.

The portable kernels (mlcc.backends.llvm.fallback) lay each op out as independent iterations of
a top-level loop (rows, output features, tokens) with serial work inside. On a GPU each such
iteration becomes one thread, or, when an iteration is a few per-row scalars and then one static
inner loop (elementwise ops and lookups over features, attention over heads), one block per row
with threads strided over the inner loop.
Vector loops become serial loops (vectors wider than 4 lanes do not exist in Metal or WGSL),
temporary arrays become thread-local, and top-level statements that precede the nests (a rope
frequency table, the chunk's start position) are repeated inside each thread.

A kernel whose steps depend on each other (the serial passes of mixture-of-experts routing)
runs whole in one thread: correct, and slow only for those kernels.

With `bind=False` the same text keeps serial loops, so it builds for the CPU and can be checked
against the interpreter; only the loop headers differ from the GPU text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INDENT = "    "
_FOR = re.compile(r"^for (\w+) in (T\.parallel|range|T\.vectorized|T\.serial)\((.+)\):$")


@dataclass(frozen=True)
class Grid:
    """Threads per block for the generated nests (at most the target's limit)."""

    threads: int
    bind: bool = True


def _depth(line: str) -> int:
    return (len(line) - len(line.lstrip(" "))) // 4


def _split_body(lines: list[str]) -> tuple[list[str], list[str]]:
    """(header lines up to and including the last match_buffer/int64 declaration, body)."""
    last = 0
    for i, line in enumerate(lines):
        text = line.strip()
        if _depth(line) == 1 and (text.startswith("T.func_attr") or "T.match_buffer" in text
                                  or re.fullmatch(r"\w+ = T\.int64\(\)", text)):
            last = i
    return lines[:last + 1], lines[last + 1:]


def _nests(body: list[str]) -> tuple[list[str], list[list[str]]]:
    """Top-level statements before the loops, and each top-level loop nest's lines."""
    prologue: list[str] = []
    nests: list[list[str]] = []
    for line in body:
        if _depth(line) == 1:
            if _FOR.match(line.strip()):
                nests.append([line])
            elif nests:
                raise ValueError(f"statement after a loop nest at top level: {line.strip()}")
            else:
                prologue.append(line)
        elif nests:
            nests[-1].append(line)
        else:
            raise ValueError(f"unexpected nesting before the first loop: {line.strip()}")
    return prologue, nests


def _shift(lines: list[str], levels: int) -> list[str]:
    return [INDENT * levels + line if line.strip() else line for line in lines]


def _loop(var: str, extent: str, tag: str, bind: bool) -> str:
    if bind:
        return f'for {var} in T.thread_binding({extent}, thread="{tag}"):'
    return f"for {var} in range({extent}):"


def _row_split(inner: list[str]) -> tuple[list[str], str] | None:
    """(leading scalar lines, the inner loop line) when a nest's body is scalar assignments
    followed by one static loop that ends it; None otherwise."""
    child = [ln for ln in inner if _depth(ln) == 2]
    if not child or not _FOR.match(child[-1].strip()):
        return None
    loop = _FOR.match(child[-1].strip())
    if not loop.group(3).isdigit() or inner.index(child[-1]) != len(child) - 1:
        return None  # a symbolic inner extent, or a lead statement with a body of its own
    lead = child[:-1]
    # only pure per-row values may be repeated in every thread: no buffers, no stores
    if any(not re.match(r"^\w+ = ", ln.strip()) or "T.alloc_buffer" in ln for ln in lead):
        return None
    return lead, child[-1]


def _bind_nest(nest: list[str], prologue: list[str], grid: Grid) -> list[str]:
    var, _, extent = _FOR.match(nest[0].strip()).groups()
    inner = nest[1:]
    symbolic = not extent.isdigit()
    threads = grid.threads
    split = _row_split(inner)
    out: list[str] = []
    if split is not None:
        # one block per row, threads strided over the inner loop (features, heads)
        lead, loop_line = split
        cvar, _, cext = _FOR.match(loop_line.strip()).groups()
        threads = min(threads, -(-int(cext) // 32) * 32)
        steps = -(-int(cext) // threads)
        out.append(INDENT + _loop(var, extent, "blockIdx.x", grid.bind))
        out.append(INDENT * 2 + _loop(f"{cvar}_t", str(threads), "threadIdx.x", grid.bind))
        out += _shift([ln[4:] for ln in prologue], 3)
        out += _shift([ln[8:] for ln in lead], 3)
        out.append(INDENT * 3 + f"for {cvar}_s in range({steps}):")
        out.append(INDENT * 4 + f"if {cvar}_s * {threads} + {cvar}_t < {cext}:")
        body = [re.sub(rf"\b{cvar}\b", f"({cvar}_s * {threads} + {cvar}_t)", ln)
                for ln in inner[len(lead) + 1:]]
        return out + _shift([ln[12:] for ln in body], 5)
    blocks = (f"({extent} + T.int64({threads - 1})) // T.int64({threads})" if symbolic
              else str(-(-int(extent) // threads)))
    step = f"T.int64({threads})" if symbolic else str(threads)
    index = f"({var}_b * {step} + {var}_t)"
    out.append(INDENT + _loop(f"{var}_b", blocks, "blockIdx.x", grid.bind))
    out.append(INDENT * 2 + _loop(f"{var}_t", str(threads), "threadIdx.x", grid.bind))
    out += _shift([ln[4:] for ln in prologue], 3)
    out.append(INDENT * 3 + f"if {index} < {extent}:")
    body = [re.sub(rf"\b{var}\b", index, ln) for ln in inner]
    return out + _shift([ln[8:] for ln in body], 4)


def _bindable(nest: list[str], independent: bool) -> bool:
    """A top-level loop whose iterations may run at once: a parallel or vector loop of the
    portable kernel (or any loop of an op known to have independent iterations) over a plain
    extent (a number or a symbol, not a range between values read from buffers)."""
    kind, extent = _FOR.match(nest[0].strip()).group(2, 3)
    return ((kind in ("T.parallel", "T.vectorized") or independent)
            and re.fullmatch(r"\w+", extent) is not None)


def _single_thread(header: list[str], body: list[str], grid: Grid) -> list[str]:
    """The whole kernel in one thread: for kernels whose steps depend on each other."""
    return header + [INDENT + _loop("one_b", "1", "blockIdx.x", grid.bind),
                     INDENT * 2 + _loop("one_t", "1", "threadIdx.x", grid.bind)] + \
        _shift(body, 2)


def bind_threads(text: str, grid: Grid, independent: bool = False) -> str:
    """The GPU form of one portable kernel's TVMScript (see the module docstring).

    `independent`: the op's top-level serial loops have independent iterations too (last row,
    positions). A kernel that does not split into independent nests (the serial passes of
    mixture-of-experts routing, loops over ranges read from buffers) runs in one thread."""
    scope = ', scope="local")' if grid.bind else ")"
    text = re.sub(r'(T\.alloc_buffer\([^\n]*?"\w+")\)', rf"\1{scope}", text)
    header, body = _split_body(text.split("\n"))
    try:
        prologue, nests = _nests(body)
    except ValueError:
        nests = []
    body = [ln.replace("T.vectorized(", "range(").replace("T.parallel(", "range(")
            for ln in body]
    if not nests or not all(_bindable(nest, independent) for nest in nests):
        return "\n".join(_single_thread(header, body, grid))
    prologue, nests = _nests(body)
    out = list(header)
    for nest in nests:
        out += _bind_nest(nest, prologue, grid)
    return "\n".join(out)
