"""Shared fixtures for compile tests: libraries are built once per test session and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlcc.interface.compile import compile_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


class LibraryCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def get(self, model: Path | str, quantization: str, opt: str = "O2",
            overrides: str | None = None) -> Path:
        key = f"{model}|{quantization}|{opt}|{overrides}"
        if key not in self.built:
            digest = hashlib.sha1(key.encode()).hexdigest()[:12]
            out = self.root / f"{digest}.so"
            compile_model(model, out, quantization=quantization, opt=opt, overrides=overrides)
            self.built[key] = out
        return self.built[key]


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> LibraryCache:
    return LibraryCache(tmp_path_factory.mktemp("libs"))
