"""Writing a built library: under a temporary name beside the output, renamed when complete,
so a failed or interrupted build never leaves a partial file at the requested path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_library(output: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` into a temporary file next to `output`, then rename it to `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial{os.getpid()}{output.suffix}")
    try:
        write(partial)
        os.replace(partial, output)
    finally:
        if partial.exists():
            partial.unlink()
