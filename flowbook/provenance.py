"""Where a result comes from: the hardware, the library versions and the git commit it was made with."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess

import torch

from flowbook import config


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform.processor(), else 'cpu'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def hardware(device: torch.device | str = "cpu") -> str:
    """'NVIDIA H200' for a GPU, or 'AMD EPYC 9R14, 2 cores' for the CPU: the cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()}, {cores} cores"


def git_commit() -> str:
    """The project's HEAD commit, with '+changes' when the working tree differs from it; 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=config.PROJECT_ROOT,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "flowbook")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+changes" if dirty else "")) if head else "unknown"


def versions() -> dict:
    """Python, torch, torchvision and Lightning versions."""
    import pytorch_lightning
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pytorch_lightning": pytorch_lightning.__version__}
