"""nvcc checks of generated device code: compile `k.cu` (the kernels plus small __global__
probes that call them) for sm_90 and read back what ptxas reports and the PTX it produced."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

FLAGS = ["-O3", "-std=c++17", "-arch=sm_90"]
# per probe: its index, spill stores, registers and static shared memory, as ptxas -v prints them
PROBE_STATS = (r"Function properties for _Z\d+probe(\d+)[\s\S]*?(\d+) bytes spill stores"
               r"[\s\S]*?Used (\d+) registers.*?(\d+) bytes smem")


def cubin_report(tmp_path: Path, source: str) -> str:
    """Write `source` to k.cu, compile it to a cubin with ptxas -v, return ptxas's report."""
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run(["nvcc", "--cubin", *FLAGS, "-Xptxas", "-v", "-o",
                           str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def probe_stats(report: str) -> list[tuple[int, int, int, int]]:
    """(probe index, spill-store bytes, registers, shared bytes) of every `probeN` kernel."""
    return [tuple(int(v) for v in m) for m in re.findall(PROBE_STATS, report)]


def entry_ptx(tmp_path: Path, probes: list[str]) -> dict[str, str]:
    """The PTX of k.cu's probe kernels, by name."""
    ptx = subprocess.run(["nvcc", "--ptx", *FLAGS, "-o", "-", str(tmp_path / "k.cu")],
                         capture_output=True, text=True, check=True).stdout
    return {p: ptx.split(f".entry _Z{len(p)}{p}")[1].split(".entry")[0] for p in probes}
