"""Where and when a benchmark ran: date, CPU, cores, memory, load, versions and git state."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("mlcc", "apache-tvm", "apache-tvm-ffi", "torch", "transformers", "numpy")
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def gpu_name() -> str | None:
    """The first CUDA GPU's name when torch sees one (only GPU sweeps ask)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - any torch or driver failure means: no GPU to name
        return None


def git_state() -> str:
    """The commit the harness ran from, with "+changes" when the work tree differs from it;
    $MLCC_GIT_COMMIT where the tree was copied without its .git folder (GPU machines)."""
    if os.environ.get("MLCC_GIT_COMMIT"):
        return os.environ["MLCC_GIT_COMMIT"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=False).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+changes" if dirty else commit or "unknown"


def machine_info(gpu: bool = False) -> dict:
    """Everything a reader needs to compare two result folders."""
    return {
        "gpu": gpu_name() if gpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "load_average": load_average(),
        "versions": versions(),
        "git": git_state(),
    }
