"""Readers for compiled artifacts, written from the file formats (no TVM involved).

    object_format(data)      ("elf", e_machine) | ("macho", cputype) | ("wasm", 1)
    exported_symbols(path)   [(name, weak)] defined global symbols of an object (ELF and
                             Mach-O read here; wasm through llvm-nm)
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
    """Defined global symbols of an object file and whether each is weak.

    Mach-O names lose their leading underscore, so names read the same in every format."""
    data = path.read_bytes()
    kind, _ = object_format(data[:64])
    if kind == "elf":
        return elf_symbols(data)
    if kind == "macho":
        return macho_symbols(data)
    return nm_symbols(path)


def elf_symbols(data: bytes) -> list[tuple[str, bool]]:
    """Global and weak symbols defined in a 64-bit little-endian ELF file (its .symtab)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    symbols = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name_at, info, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, at)
            bind = info >> 4
            if shndx == 0 or bind not in (1, 2):  # undefined, or local
                continue
            end = data.index(b"\0", strtab + name_at)
            symbols.append((data[strtab + name_at:end].decode(), bind == 2))
    return symbols


def macho_symbols(data: bytes) -> list[tuple[str, bool]]:
    """External symbols defined in a 64-bit little-endian Mach-O file (LC_SYMTAB)."""
    ncmds, = struct.unpack_from("<I", data, 16)
    at, symbols = 32, []
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, at)
        if cmd == 0x2:  # LC_SYMTAB
            symoff, nsyms, stroff, _ = struct.unpack_from("<IIII", data, at + 8)
            for i in range(nsyms):
                strx, ntype, _, desc, _ = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
                # external (N_EXT), defined in a section (N_SECT), not a debugging entry
                if ntype & 0xE0 or not ntype & 0x01 or ntype & 0x0E != 0x0E:
                    continue
                end = data.index(b"\0", stroff + strx)
                name = data[stroff + strx:end].decode().removeprefix("_")
                symbols.append((name, bool(desc & 0x0080)))  # N_WEAK_DEF
        at += size
    return symbols


def nm_symbols(path: Path) -> list[tuple[str, bool]]:
    """Defined global symbols through llvm-nm (for formats not read here, such as wasm)."""
    nm = nm_tool()
    assert nm, "llvm-nm is needed to read this symbol table"
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
