"""runtime/host_malloc.large_blocks_mapped, around each segment of a CPU prefill: glibc maps every block from 1 MiB
up on its own inside it, and keeps such blocks on its heap after it; nothing where the user chose a threshold or the
C library is not glibc."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from klconvert.runtime import host_malloc

MIB = 1 << 20


@pytest.fixture
def no_user_threshold(monkeypatch):
    monkeypatch.delenv(host_malloc.USER_THRESHOLD_ENV, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)


# In a fresh process: the threshold only decides how glibc grows its heap, so a heap that already has a free block
# of the size (as a worker's has after other tests) serves it from there, mapped or not.
MAPPED = """
import ctypes
from klconvert.runtime import host_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_by(size):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd - before
    finally:
        libc.free(block)

libc.free(libc.malloc(4 << 20))   # glibc's own threshold raised past 2 MiB, as a process's soon is
with host_malloc.large_blocks_mapped():
    inside = mapped_by(2 << 20), mapped_by(1 << 19)
print(*inside, mapped_by(2 << 20))
"""


@pytest.mark.skipif(not host_malloc.glibc(), reason="glibc's malloc")
def test_inside_a_large_block_is_mapped_and_after_it_is_not(no_user_threshold):
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc before 2.33 (no mallinfo2)")
    done = subprocess.run([sys.executable, "-c", MAPPED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    large_inside, small_inside, large_after = map(int, done.stdout.split())
    assert large_inside >= 2 * MIB
    assert small_inside == 0
    assert large_after == 0   # kept on the heap, for the next decode step's


class _Recorder:
    def __init__(self):
        self.calls = []

    def mallopt(self, *args):
        self.calls.append(args)
        return 1


@pytest.fixture
def libc(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(host_malloc.ctypes, "CDLL", lambda name: recorder)
    return recorder


def test_the_threshold_is_set_back_when_the_prefill_fails(no_user_threshold, monkeypatch, libc):
    monkeypatch.setattr(host_malloc, "glibc", lambda: True)
    with pytest.raises(MemoryError), host_malloc.large_blocks_mapped():
        raise MemoryError
    assert libc.calls[-2:] == [(host_malloc.M_MMAP_THRESHOLD, host_malloc.CEILING),
                               (host_malloc.M_TRIM_THRESHOLD, host_malloc.TRIM)]


@pytest.mark.parametrize("name, value", [(host_malloc.USER_THRESHOLD_ENV, "65536"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.mmap_threshold=65536")])
def test_the_users_threshold_stands(no_user_threshold, monkeypatch, libc, name, value):
    monkeypatch.setattr(host_malloc, "glibc", lambda: True)
    monkeypatch.setenv(name, value)
    with host_malloc.large_blocks_mapped():
        pass
    assert libc.calls == []


def test_other_glibc_tunables_do_not_stop_it(no_user_threshold, monkeypatch, libc):
    monkeypatch.setattr(host_malloc, "glibc", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    with host_malloc.large_blocks_mapped():
        assert libc.calls[0] == (host_malloc.M_MMAP_THRESHOLD, host_malloc.PREFILL_THRESHOLD)


def _unknown_name(name):
    raise ValueError("unrecognized configuration name")


@pytest.mark.parametrize("confstr", [_unknown_name, lambda name: None, lambda name: "musl 1.2"],
                         ids=["no such name (macOS)", "no answer", "another C library"])
def test_nothing_where_the_c_library_is_not_glibc(no_user_threshold, monkeypatch, libc, confstr):
    monkeypatch.setattr(os, "confstr", confstr)
    with host_malloc.large_blocks_mapped():
        pass
    assert not host_malloc.glibc() and libc.calls == []


def test_nothing_without_confstr(no_user_threshold, monkeypatch, libc):
    monkeypatch.delattr(os, "confstr")   # Windows
    with host_malloc.large_blocks_mapped():
        pass
    assert not host_malloc.glibc() and libc.calls == []
