"""Readers for compiled artifacts, written from the file formats (no TVM involved).

    object_format(data)      ("elf", e_machine) | ("macho", cputype) | ("wasm", 1)
    exported_symbols(path)   [(name, weak)] defined global symbols of an object (llvm-nm)
    embedded_strings(data, marker)   length-prefixed strings holding `marker` (device sources
                                     stored in TVM's library blob: uint64 length + bytes)
    embedded_elves(data)     every ELF image inside `data` (code objects in a library blob)
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

EM_X86_64, EM_AARCH64, EM_AMDGPU = 62, 183, 224
MACHO_ARM64 = 0x0100000C
MACHO_X86_64 = 0x01000007


def object_format(data: bytes) -> tuple[str, int]:
    if data[:4] == b"\x7fELF":
        little = data[5] == 1
        (machine,) = struct.unpack("<H" if little else ">H", data[18:20])
        return "elf", machine
    if data[:4] == b"\xcf\xfa\xed\xfe":  # 64-bit Mach-O, little endian
        (cputype,) = struct.unpack("<I", data[4:8])
        return "macho", cputype
    if data[:4] == b"\0asm":
        (version,) = struct.unpack("<I", data[4:8])
        return "wasm", version
    return "unknown", 0


def nm_tool() -> str | None:
    return shutil.which("llvm-nm") or next(
        (str(p) for p in sorted(Path("/usr/lib").glob("llvm-*/bin/llvm-nm"))), None)


def exported_symbols(path: Path) -> list[tuple[str, bool]]:
    """Defined global symbols of an object file and whether each is weak (llvm-nm, any format).

    Mach-O names lose their leading underscore, so names read the same in every format."""
    nm = nm_tool()
    assert nm, "llvm-nm is needed to read Mach-O and wasm symbol tables"
    kind, _ = object_format(path.read_bytes()[:64])
    if kind == "macho":
        out = subprocess.run([nm, "-m", "--defined-only", "-g", str(path)], capture_output=True,
                             text=True, check=True).stdout
        symbols = []
        for line in out.splitlines():
            if "external" not in line:
                continue
            name = line.split()[-1]
            symbols.append((name.removeprefix("_"), "weak external" in line))
        return symbols
    out = subprocess.run([nm, "--defined-only", "-g", str(path)], capture_output=True, text=True,
                         check=True).stdout
    symbols = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            symbols.append((parts[-1], parts[-2] in ("W", "V", "w", "v")))
    return symbols


def embedded_strings(data: bytes, marker: bytes, limit: int = 1 << 26) -> list[str]:
    """Strings stored as (uint64 little-endian length, UTF-8 bytes) that contain `marker`."""
    found: list[str] = []
    start = 0
    while True:
        hit = data.find(marker, start)
        if hit < 0:
            return found
        text = None
        for begin in range(hit, max(8, hit - 4096), -1):
            (length,) = struct.unpack("<Q", data[begin - 8:begin])
            if hit < begin + length <= min(len(data), begin + limit):
                try:
                    text = data[begin:begin + length].decode()
                except UnicodeDecodeError:
                    continue
                found.append(text)
                start = begin + length
                break
        if text is None:
            start = hit + len(marker)


def embedded_elves(data: bytes) -> list[bytes]:
    """ELF images inside `data` (after its own header), each cut at its section table's end."""
    images = []
    at = data.find(b"\x7fELF", 1)
    while at >= 0:
        head = data[at:at + 64]
        if len(head) == 64 and head[4] == 2 and head[5] == 1:  # 64-bit little endian
            shoff, = struct.unpack("<Q", head[40:48])
            shentsize, shnum = struct.unpack("<HH", head[58:62])
            end = at + shoff + shentsize * shnum
            if shoff and end <= len(data):
                images.append(data[at:end])
        at = data.find(b"\x7fELF", at + 1)
    return images
