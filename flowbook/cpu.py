"""Keep freed memory in the process: a CPU speed-up for training and evaluation on Linux.

glibc's malloc serves every buffer above a threshold (128 KiB at first, raised to at most 32 MiB by what it
has seen) with a fresh `mmap` and unmaps it on `free`, and gives the top of its heap back to the system when
more than twice that threshold lies free there. A flow's training step allocates and frees the same
few-megabyte activations hundreds of times, so each step asks the kernel for new pages, which it fills with
zeros again: on this project's 2-core CPU a tenth to a fifth of the time went to the kernel rather than to the
network (`docs/training.md` gives the measurements). `keep_freed_memory` sets three malloc
options (the same as the environment variables MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and
MALLOC_TOP_PAD_), so that freed buffers stay in the process and the next step reuses them. It changes no
number a model computes, only where its buffers come from; the price is that the process keeps its peak
memory until it ends.

`python -m flowbook.train`, `evaluate`, `bench` and `classifier` call it; elsewhere (macOS, Windows, Linux
with another C library) it does nothing and says so by returning False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: buffers up to 32 MiB come from the heap and go back to it
TRIM_THRESHOLD = 2**31 - 1  # give the heap's free top back to the system only beyond 2 GiB (mallopt takes an int)
TOP_PAD = 256 * 2**20  # grow the heap in steps of 256 MiB


def _glibc():
    """The C library as a ctypes handle where it is glibc (the only one whose mallopt takes these options)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed buffers of up to 32 MiB in the process instead of unmapping them.

    Returns True where the options were set (or were already set in the environment), False where the C library
    is not glibc (nothing changed) or mallopt refused one.
    Call it once, early; it affects the whole process (every thread) from then on, and the processes it starts
    afterwards (Jupyter kernels, worker processes), through the environment variables of the same options.
    An option whose environment variable is already set (by the user, or by a parent process), or that
    GLIBC_TUNABLES names, is left as it is: glibc read the variable when this process started.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    done = []
    tunables = os.environ.get("GLIBC_TUNABLES", "")  # glibc's newer spelling: glibc.malloc.mmap_threshold=...:...
    for name, option, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                ("MALLOC_TOP_PAD_", M_TOP_PAD, TOP_PAD)):
        tunable = "glibc.malloc." + name.removeprefix("MALLOC_").rstrip("_").lower()
        if name in os.environ or f"{tunable}=" in tunables:  # the user's own setting, in force since start-up
            continue
        os.environ[name] = str(value)
        done.append(libc.mallopt(option, value) == 1)
    return all(done)
