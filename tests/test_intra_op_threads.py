"""torch's intra-op worker threads on the CPU: the stacks counted for them are what starting them maps, and a limit
on what the process maps that leaves no room for them refuses the plan in one line (libgomp ended the process)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from klconvert.runtime.host_malloc import glibc
from klconvert.runtime.intra_op_threads import STACK_SIZE_ENVS

MiB = 1 << 20
THREADS = 4
_STACK_HARD_LIMIT = resource.getrlimit(resource.RLIMIT_STACK)[1]   # ulimit -Hs: how far a child's ulimit -s goes

# In a fresh process on THREADS torch threads, none started: the bytes of data it maps (VmData, which ulimit -d
# bounds) grow by once torch's workers are started, and the stacks counted for them.
STARTED = '''
import torch
from klconvert.runtime.intra_op_threads import stack_bytes, start_intra_op_threads
torch.set_num_threads(%d)
data = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
before = data()
assert start_intra_op_threads() == 0
print(data() - before, stack_bytes())
''' % THREADS


def _stack_limit(size: int):
    """preexec_fn: a child whose ulimit -s is `size` bytes as it starts (glibc reads a thread's default stack then)."""
    return lambda: resource.setrlimit(resource.RLIMIT_STACK, (size, resource.getrlimit(resource.RLIMIT_STACK)[1]))


@pytest.mark.skipif(not glibc(), reason="the stacks are counted from glibc's defaults, read in /proc/self/status")
@pytest.mark.parametrize("env, stack", [({}, 8 * MiB), ({}, 3 * MiB), ({"OMP_STACKSIZE": "2M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "bad", "GOMP_STACKSIZE": "1536"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "+3M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "1", "GOMP_STACKSIZE": "3M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "99999999999999G", "GOMP_STACKSIZE": "3M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "-0", "GOMP_STACKSIZE": "3M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "-18446744073706405888B"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "\uff13M", "GOMP_STACKSIZE": "5M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "\xa04M", "GOMP_STACKSIZE": "3M"}, 8 * MiB),
                                        ({"OMP_STACKSIZE": "4M\x1f", "GOMP_STACKSIZE": "3M"}, 8 * MiB),
                                        ({"OMP_THREAD_LIMIT": "1"}, 8 * MiB), ({"OMP_THREAD_LIMIT": "2"}, 8 * MiB)])
def test_the_stacks_counted_are_what_starting_the_workers_maps(env, stack):
    """ulimit -s, or libgomp's OMP_STACKSIZE / GOMP_STACKSIZE (KiB unless a unit follows, a + or - allowed, -n
    wrapping to 2**64 - n; ASCII blanks and digits only; a value it cannot read, or past an unsigned long, leaves the
    next; one below pthreads' least, glibc's default), and one guard page each, which ulimit -d does not count. h278:
    "+3M" was counted as ulimit -s's (libgomp took 3 MiB: a "+1G" under a limit ended the process), "1" as
    GOMP_STACKSIZE's and the overflow as itself, some 1e23 bytes (libgomp kept its default, and took GOMP_STACKSIZE's:
    runs that fit were refused). h279: "-0" (0, below the least: glibc's default) was counted as GOMP_STACKSIZE's,
    and "\\uff13M" (a fullwidth digit) as 3 MiB, where libgomp refuses it for GOMP_STACKSIZE's 5 MiB (a limit that
    held what was counted ended the process); "-18446744073706405888B" (3 MiB) as ulimit -s's, and a no-break space
    or a \\x1f around "4M" as 4 MiB, where libgomp refuses it for GOMP_STACKSIZE's (runs that fit were refused).
    h292: under OMP_THREAD_LIMIT, which caps libgomp's team, a worker for every thread but the caller's was counted
    (OMP_THREAD_LIMIT=1 starts none: a run that fit was refused for a 1.07 GB stack never mapped)."""
    child_env = {**{k: v for k, v in os.environ.items() if k not in STACK_SIZE_ENVS}, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", STARTED], capture_output=True, text=True, timeout=300, env=child_env,
                          preexec_fn=_stack_limit(stack))
    assert done.returncode == 0, done.stderr[-2000:]
    mapped, counted = map(int, done.stdout.split())
    guards = (THREADS - 1) * os.sysconf("SC_PAGE_SIZE")
    assert 0 <= mapped - (counted - guards) < MiB, f"starting {THREADS - 1} workers mapped {mapped:,} bytes of data, " \
                                                  f"{counted - guards:,} counted"


# In a fresh process on THREADS torch threads, none started: what starting them says.
START = '''
import torch
from klconvert.errors import KLError
from klconvert.runtime.intra_op_threads import start_intra_op_threads
torch.set_num_threads(%d)
try:
    start_intra_op_threads()
except KLError as e:
    print(e)
''' % THREADS


@pytest.mark.skipif(not glibc(), reason="the stacks are counted from glibc's defaults")
@pytest.mark.parametrize("env, stack, set_by", [
    ({"OMP_STACKSIZE": "-1B"}, 8 * MiB, "OMP_STACKSIZE='-1B'"),
    ({"GOMP_STACKSIZE": "18446744073709551615B"}, 8 * MiB, "GOMP_STACKSIZE='18446744073709551615B'"),
    ({"OMP_STACKSIZE": "262144g"}, 8 * MiB, "OMP_STACKSIZE='262144g'"),
    pytest.param({}, 1 << 48, "ulimit -s", marks=pytest.mark.skipif(
        _STACK_HARD_LIMIT != resource.RLIM_INFINITY and _STACK_HARD_LIMIT < 1 << 48,
        reason="ulimit -s's hard limit is under 2**48 bytes"))])
def test_a_stack_no_process_can_map_is_refused_in_one_line(env, stack, set_by):
    """h279: OMP_STACKSIZE=-1B (2**64 - 1 bytes, which glibc's size with its guard page wraps: EINVAL) or a stack of
    2**48 bytes (OMP_STACKSIZE=262144g, ulimit -s: EAGAIN) ended any torch program that started its workers in
    libgomp's 'Thread creation failed', exit status 1, whatever the limits. It is refused in one line, naming what
    set it and how to make it smaller."""
    child_env = {**{k: v for k, v in os.environ.items() if k not in STACK_SIZE_ENVS}, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=300, env=child_env,
                          preexec_fn=_stack_limit(stack))
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert line.startswith(f"{set_by} makes each of torch's worker threads a stack of ") and "\n" not in line, line
    variable = next(iter(env), "OMP_STACKSIZE")   # the one that set it, else the one libgomp reads first
    assert line.endswith(f"set {variable} to a few MB (e.g. {variable}=2M)"), line


# In a fresh process on 8 torch threads, none of their workers started: under a data-segment limit that leaves half
# their stacks' room (ulimit -s 8 MiB), the bundled model loaded on the CPU.
NO_ROOM_FOR_THE_STACKS = '''
import resource, sys, torch
import klconvert
from klconvert.errors import KLError
from klconvert.models import BUNDLED_DIR
torch.set_num_threads(8)
data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
resource.setrlimit(resource.RLIMIT_DATA, (data + 7 * (8 << 20) // 2, resource.RLIM_INFINITY))
try:
    klconvert.load(BUNDLED_DIR, device="cpu", max_context=64)
except KLError as e:
    print(e)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_data_limit_without_room_for_the_workers_stacks_refuses_the_plan_in_one_line():
    """The plan started torch's workers before it measured the host, whatever room they had: under ulimit -d 245 MB
    `run --model tiny --device cpu` on 2 threads, and an API caller's load on 8 under 300-340 MB, ended in libgomp's
    "Thread creation failed", exit status 1, where the plan would refuse it. Short of room, their stacks are counted
    as used instead, and the plan refuses it in one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NO_ROOM_FOR_THE_STACKS], capture_output=True, text=True, timeout=300,
                          env=env, preexec_fn=_stack_limit(8 * MiB))
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert line.startswith("the plan needs ") and "under the process's data-segment limit (ulimit -d)" in line, line
    assert "\n" not in line and line.endswith("raise ulimit -d"), line


# In a fresh process on 2 torch threads, their worker not started, its stack 1 GiB (GOMP_STACKSIZE=1G): under a
# data-segment limit that leaves the bundled model's plan room (some 80 MB at most), but not the stack, it is loaded
# on the CPU.
STACKS_TAKE_THE_ROOM = '''
import resource, sys, torch
import klconvert
from klconvert.errors import KLError
from klconvert.models import BUNDLED_DIR
torch.set_num_threads(2)
data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))
resource.setrlimit(resource.RLIMIT_DATA, (data + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
try:
    klconvert.load(BUNDLED_DIR, device="cpu", max_context=64)
except KLError as e:
    print(e)
'''


@pytest.mark.skipif(not glibc(), reason="the stacks are counted from glibc's defaults, read in /proc/self/status")
@pytest.mark.parametrize("room_mib", [200, 20], ids=["fits-without-them", "not-even-without-them"])
def test_a_plan_refused_for_the_room_the_workers_stacks_take_names_them(room_mib):
    """h279: where the workers' stacks, unmapped for want of room, were what the plan lacked (GOMP_STACKSIZE=1G
    under ulimit -d 700 MB), the refusal blamed the model -- "the weights alone need 65.85 MB: use a model of fewer
    bits" -- and never the stacks. It names what they would map, and fewer threads and smaller stacks first. Where
    the plan would not fit even without them (20 MiB of room for 65.85 MB of weights), the model's refusal names
    them too, after what it asks of the model (h291: it did not)."""
    env = {**{k: v for k, v in os.environ.items() if k not in STACK_SIZE_ENVS}, "OMP_NUM_THREADS": "1",
           "GOMP_STACKSIZE": "1G"}
    done = subprocess.run([sys.executable, "-c", STACKS_TAKE_THE_ROOM, str(room_mib)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert line.startswith("the plan needs ") and "\n" not in line, line
    if room_mib == 20:
        assert "; the weights alone need 65.85 MB: use a model of fewer bits (klconvert quantize --bits 4), or run " \
               "fewer threads (OMP_NUM_THREADS=1 starts none; torch's 1 worker thread would map 1.07 GB for its " \
               "stack, counted as used), or set GOMP_STACKSIZE to a few MB (e.g. GOMP_STACKSIZE=2M), or raise " \
               "ulimit -d" in line, line
        return
    assert "; torch's 1 worker thread would map 1.07 GB for its stack, counted as used: run fewer threads " \
           "(OMP_NUM_THREADS=1 starts none), or set GOMP_STACKSIZE to a few MB (e.g. GOMP_STACKSIZE=2M), or raise " \
           "ulimit -d" in line, line
    assert "fewer bits" not in line, line
