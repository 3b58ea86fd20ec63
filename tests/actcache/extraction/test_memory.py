"""Malloc arenas: capped at start-up unless the user tuned malloc, so freed shard buffers go back to the OS."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")]

# Eight threads allocate concurrently in torch (GIL released), which makes glibc create an arena per
# contending thread; malloc_info then lists one <heap> per arena.
CHILD = r"""
import ctypes, os, sys, tempfile, threading
import torch
from actcache.extraction import memory
if sys.argv[1] == "cap":
    memory.cap_arenas()
def work():
    for _ in range(300):
        (torch.randn(64, 64) @ torch.randn(64, 64)).sum()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
memory.release()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def _arenas(mode: str, **env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, "OMP_NUM_THREADS": "1", **env},
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_cap_arenas_limits_malloc_arenas():
    assert _arenas("none") > 2  # the control: without the cap, contention makes more arenas
    assert _arenas("cap") <= 2


def test_the_users_malloc_setting_wins():
    assert _arenas("cap", MALLOC_ARENA_MAX="4") > 2
