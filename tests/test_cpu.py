"""flowbook.cpu.keep_freed_memory: freed buffers stay in the process, so repeated steps stop faulting pages in.

Each measurement runs in a fresh interpreter (the option, once set, holds for the whole process): a loop
that allocates and frees 24 tensors of 4 MiB (more than glibc's largest trim threshold, 64 MiB), the pattern of a training step's activations, counted in
minor page faults (pages the kernel had to hand out and zero).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from flowbook import cpu

STEPS, BUFFERS, PAGES_PER_BUFFER = 10, 24, 2**22 // 4096

PROGRAM = """
import json, os, resource, sys, torch
from flowbook.cpu import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(2**20)  # 4 MiB of float32

def step():
    buffers = [x * i for i in range({buffers})]
    del buffers

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({steps}):
    step()
print(json.dumps({{"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}}))
""".format(buffers=BUFFERS, steps=STEPS)

glibc = pytest.mark.skipif(cpu._glibc() is None, reason="mallopt's options are glibc's")


def page_faults(mode: str, **malloc_env) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults, whatever this process set
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                         env={**env, **malloc_env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_keep_freed_memory_stops_page_faults_of_repeated_steps():
    pages = STEPS * BUFFERS * PAGES_PER_BUFFER
    default, kept = page_faults("default"), page_faults("keep")
    assert kept["kept"] is True
    assert kept["faults"] < pages / 20, f"{kept['faults']} page faults for {pages} pages allocated"
    # glibc's default hands (most of) the buffers back after every step: all pages faulted in again in most runs,
    # a fifth of them in some, depending on where the interpreter's own allocations landed in the heap
    assert default["faults"] > 4 * kept["faults"], (default, kept)
    assert default["env"] is None and kept["env"] == str(cpu.MMAP_THRESHOLD), "processes it starts inherit it"


@glibc
def test_keep_freed_memory_keeps_a_users_own_settings_in_the_process_and_the_processes_it_starts():
    pages = STEPS * BUFFERS * PAGES_PER_BUFFER
    user = page_faults("keep", MALLOC_MMAP_THRESHOLD_="65536")  # every 4 MiB buffer mapped, unmapped when freed
    assert user["env"] == "65536", "the processes it starts inherit the user's value"
    assert user["faults"] > pages / 2, f"the user's threshold was overridden: {user['faults']} faults for {pages} pages"
    tuned = page_faults("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")  # glibc's newer spelling
    assert tuned["faults"] > pages / 2, f"the user's tunable was overridden: {tuned['faults']} faults for {pages} pages"


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("", ""))
    assert cpu.keep_freed_memory() is False
    assert not any(name.startswith("MALLOC_") for name in os.environ), "nothing set for child processes either"
