"""`mlcc compile` for the other targets, as the documentation writes it, on the bundled model.

The phone build from an mlc-chat-config.json names its objects and symbols after the model; an
Intel Mac host gives x86-64 Mach-O objects; impossible combinations print the echo line and one
error line, and write nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
MACHO_64 = b"\xcf\xfa\xed\xfe"
CPU_X86_64, CPU_ARM64 = 0x01000007, 0x0100000C


def mlcc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mlcc.cli", *args], capture_output=True,
                         text=True, timeout=600, check=False)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("targets_cli") / "params"
    mlcc("gen_config", str(MODEL), "--quantization", "q4f16_1", "--conv-template", "LM",
         "-o", str(folder))
    return folder


def cputypes(tar: Path, into: Path) -> dict[str, int]:
    with tarfile.open(tar) as archive:
        archive.extractall(into)
    types = {}
    for obj in into.glob("*.o"):
        head = obj.read_bytes()[:8]
        assert head[:4] == MACHO_64, obj.name
        types[obj.name] = int.from_bytes(head[4:8], "little")
    return types


@pytest.mark.slow
def test_iphone_and_intel_mac_builds(params, tmp_path):
    lib = tmp_path / "iphone.tar"
    out = mlcc("compile", str(params / "mlc-chat-config.json"), "--device", "iphone", "-o",
               str(lib))
    assert "metal kernels:" in out.stderr
    assert cputypes(lib, tmp_path / "iphone") == {"lib0.o": CPU_ARM64,
                                                 "llama_q4f16_1_devc.o": CPU_ARM64}
    mac = tmp_path / "mac.tar"
    mlcc("compile", str(params), "--device", "metal", "--host", "x86_64-apple-darwin",
         "--system-lib-prefix", "stories_", "-o", str(mac))
    assert cputypes(mac, tmp_path / "mac") == {"lib0.o": CPU_X86_64,
                                              "stories_devc.o": CPU_X86_64}


@pytest.mark.parametrize("args, words", [
    (["--device", "vulkan", "-o", "x.so"], "SPIR-V"),
    (["--device", "webgpu", "-o", "x.tar"], "use q4f32_1"),
    (["--device", "android", "-o", "x.so"], "Android NDK"),
    (["--device", "iphone", "--host", "armv7-apple-ios", "-o", "x.tar"], "not a known LLVM"),
    (["--device", "cuda", "-o", "x.tar"], "use -o lib.so"),
])
def test_impossible_combinations_print_one_line(params, tmp_path, args, words):
    args = [a if not a.startswith("x.") else str(tmp_path / a) for a in args]
    out = mlcc("compile", str(params), *args, check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 2  # echo line + one error line
    error = out.stderr.splitlines()[1]
    assert error.startswith("error: [compile] ") and words in error, error
    assert not any(p.name.startswith("x.") for p in tmp_path.iterdir())
