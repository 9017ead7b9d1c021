"""What the process can still allocate on the host (fake /proc and /sys trees, fake rlimits; one real ulimit), and
the CPU allocator's refusal as a MemoryError."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import klconvert.runtime.host_memory as host_memory_module
from bounded_cli import klconvert_bounded
from klconvert.runtime.host_memory import (ADDRESS_SPACE_BOUND, DATA_BOUND, HostMemory, HostMemoryExhausted,
                                           host_allocation, host_memory)

GiB = 2**30
INFINITY = host_memory_module.resource.RLIM_INFINITY


def fake_host(root: Path, files: dict[str, str | bytes]) -> Path:
    """A folder standing for / (proc/..., sys/...) holding `files`."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def fake_limits(monkeypatch, address_space=INFINITY, data=INFINITY, held_free=0) -> None:
    """The soft limits, and the bytes the allocator holds free (this process's own do not belong to a fake host)."""
    resource = host_memory_module.resource
    soft = {resource.RLIMIT_AS: address_space, resource.RLIMIT_DATA: data}
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft.get(which, INFINITY), INFINITY))
    monkeypatch.setattr(host_memory_module, "held_free", lambda: held_free)


def kb(n: int) -> str:
    return f"{n // 1024} kB"


MEMINFO = {"proc/meminfo": f"MemTotal:       {kb(32 * GiB)}\nMemAvailable:   {kb(20 * GiB)}\nCached: 0 kB\n"}
STATUS = {"proc/self/status": f"Name:\tpython\nVmPeak:\t{kb(3 * GiB)}\nVmSize:\t{kb(3 * GiB // 2)}\n"
                              f"VmData:\t{kb(GiB // 2)}\nThreads:\t3\n"}
ON_THE_HOST = HostMemory(20 * GiB, total=32 * GiB)   # MEMINFO's, the host bounding: its MemAvailable, its MemTotal
V2_MOUNT = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_the_host_alone_is_memavailable(tmp_path, monkeypatch):
    fake_limits(monkeypatch)
    host = host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS}))
    assert host == ON_THE_HOST and str(host) == "21.47 GB available on the host (MemAvailable)"
    assert host.remedy == "free some memory"


@pytest.mark.parametrize("limits, left, bound", [
    (dict(address_space=2 * GiB), GiB // 2, "under the process's address-space limit (ulimit -v)"),  # less VmSize
    (dict(data=GiB), GiB // 2, "under the process's data-segment limit (ulimit -d)"),              # less VmData
    (dict(address_space=GiB), 0, "under the process's address-space limit (ulimit -v)"),          # past it already
    (dict(address_space=2 * GiB, data=GiB - 1), GiB // 2 - 1, "under the process's data-segment limit (ulimit -d)"),
    (dict(address_space=64 * GiB), 20 * GiB, "on the host (MemAvailable)"),
    # the allocator's free blocks, mapped and counted in VmData, served again: room under the limit
    (dict(data=GiB, held_free=GiB // 4), 3 * GiB // 4, "under the process's data-segment limit (ulimit -d)"),
    (dict(address_space=GiB, held_free=GiB // 4), GiB // 4, "under the process's address-space limit (ulimit -v)"),
    # not on the host: a free block's pages handed back (give_back_free_pages) are in MemAvailable already
    (dict(address_space=64 * GiB, held_free=GiB // 4), 20 * GiB, "on the host (MemAvailable)"),
])
def test_a_process_limit_below_the_host_bounds_it_and_is_named(tmp_path, monkeypatch, limits, left, bound):
    """Only MemAvailable was read: under `ulimit -v` a plan the limit could not hold passed, and the allocator's
    RuntimeError ended the run."""
    fake_limits(monkeypatch, **limits)
    host = host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS}))
    assert (host.available, host.bound) == (left, bound)


def test_the_allocators_free_blocks_are_room_for_weights_alone(tmp_path, monkeypatch):
    """They were room for anything: a freed model's blocks, split by the next one's weights, refused its 17 MB of
    log-probabilities under ulimit -d. A model counts on them for its weights, up to their bytes."""
    fake_limits(monkeypatch, data=GiB, held_free=GiB // 4)
    host = host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS}))
    assert (host.available, host.free_blocks) == (3 * GiB // 4, GiB // 4)
    assert host.for_weights(GiB) == host   # weights enough to take them all
    assert host.for_weights(GiB // 16) == dataclasses.replace(host, available=GiB // 2 + GiB // 16,
                                                              free_blocks=GiB // 16)
    assert host.for_weights(0).available == GiB // 2   # VmData's room alone
    fake_limits(monkeypatch, held_free=GiB // 4)   # on the host: their pages handed back are in MemAvailable
    assert host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS})).for_weights(0) == ON_THE_HOST


def test_a_freed_models_other_blocks_stay_out_of_a_mapped_limits_room(tmp_path, monkeypatch):
    """eval's up-front check counted a freed reference's state, cache and workspace as the model's room; under
    ulimit -v / -d they stay mapped (free blocks, room for the weights alone), on the host they are handed back."""
    for limits, bound in (({"address_space": GiB}, ADDRESS_SPACE_BOUND), ({"data": GiB}, DATA_BOUND)):
        fake_limits(monkeypatch, **limits)
        host = host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS}))
        assert (host.bound, host.left_mapped(GiB // 8)) == (bound[0], GiB // 8)
    fake_limits(monkeypatch)
    assert host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS})).left_mapped(GiB // 8) == 0


def test_what_the_process_is_still_to_map_counts_against_its_mapped_limits_alone(tmp_path, monkeypatch):
    """torch's worker threads' stacks, not started for want of room (runtime/intra_op_threads.py): under ulimit -v /
    -d they will be mapped, outside the allocator's free blocks; the host's MemAvailable and a cgroup do not count a
    stack's untouched pages."""
    root = fake_host(tmp_path, {**MEMINFO, **STATUS})
    fake_limits(monkeypatch, data=GiB, held_free=GiB // 4)
    assert host_memory(root, unmapped=GiB // 8).available == 3 * GiB // 8 + GiB // 4
    assert host_memory(root, unmapped=GiB).available == GiB // 4    # past the room: the free blocks alone are left
    assert host_memory_module.mapped_room(root) == GiB // 2          # VmData's room, free blocks not counted
    fake_limits(monkeypatch)
    assert host_memory(root, unmapped=GiB) == ON_THE_HOST
    assert host_memory_module.mapped_room(root) is None


def test_a_limit_without_the_mapped_figure_is_left_out(tmp_path, monkeypatch):
    fake_limits(monkeypatch, address_space=GiB)
    assert host_memory(fake_host(tmp_path, MEMINFO)) == ON_THE_HOST   # no /proc/self/status
    fake_limits(monkeypatch, address_space=GiB)
    assert host_memory(tmp_path / "nothing") is None   # not Linux: nothing known


@pytest.mark.parametrize("cgroup, mountinfo, files, left, limit_file", [
    # v2 in its own namespace: the process's cgroup is the mount's root
    ("0::/\n", V2_MOUNT, {"sys/fs/cgroup/memory.max": f"{4 * GiB}\n", "sys/fs/cgroup/memory.current": f"{3 * GiB}\n",
                         "sys/fs/cgroup/memory.stat": f"anon {2 * GiB}\ninactive_file {GiB // 2}\n"},
     GiB + GiB // 2, "/sys/fs/cgroup/memory.max"),
    # v2 on the host's view: a service's cgroup under its slice, the slice's limit the tighter
    ("0::/work.slice/run.service\n", V2_MOUNT,
     {"sys/fs/cgroup/work.slice/run.service/memory.max": f"{8 * GiB}\n",
      "sys/fs/cgroup/work.slice/run.service/memory.current": f"{GiB}\n",
      "sys/fs/cgroup/work.slice/memory.max": f"{3 * GiB}\n", "sys/fs/cgroup/work.slice/memory.current": f"{2 * GiB}\n",
      "sys/fs/cgroup/memory.current": f"{10 * GiB}\n"},   # the root cgroup has no memory.max
     GiB, "/sys/fs/cgroup/work.slice/memory.max"),
    # v2 bind-mounted from the container's cgroup (no namespace): the mount's root is the process's cgroup
    ("0::/docker/abc\n", V2_MOUNT.replace(" / /sys", " /docker/abc /sys"),
     {"sys/fs/cgroup/memory.max": f"{2 * GiB}\n", "sys/fs/cgroup/memory.current": f"{GiB}\n"},
     GiB, "/sys/fs/cgroup/memory.max"),
    # v1's memory controller (hybrid), with another hierarchy's line before it
    ("5:cpu,cpuacct:/x\n4:memory:/process_api/abc\n0::/\n",
     "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
     "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
     {"sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": f"{3 * GiB}\n",
      "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes": f"{2 * GiB}\n",
      "sys/fs/cgroup/memory/process_api/abc/memory.stat": f"inactive_file 1\ntotal_inactive_file {GiB // 4}\n",
      "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",   # v1's "no limit"
      "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{20 * GiB}\n"},
     GiB + GiB // 4, "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes"),
    # a mount point with a space in it, which mountinfo writes as \040
    ("0::/\n", V2_MOUNT.replace("/sys/fs/cgroup", "/run/my\\040cgroup"),
     {"run/my cgroup/memory.max": f"{2 * GiB}\n", "run/my cgroup/memory.current": "0\n"},
     2 * GiB, "/run/my cgroup/memory.max"),
])
def test_a_memory_cgroup_limit_bounds_it_and_is_named(tmp_path, monkeypatch, cgroup, mountinfo, files, left,
                                                      limit_file):
    """A container's limit: memory.max (v2) or memory.limit_in_bytes (v1) of the process's cgroup or an ancestor,
    less its usage (the reclaimable page cache counted free); MemAvailable is the whole machine's."""
    fake_limits(monkeypatch)
    host = host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS, "proc/self/cgroup": cgroup,
                                            "proc/self/mountinfo": mountinfo, **files}))
    assert host.available == left
    assert host.bound == f"under its cgroup's memory limit ({limit_file})"
    assert host.remedy == "raise the container's (cgroup's) memory limit"


@pytest.mark.parametrize("files", [
    {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT, "sys/fs/cgroup/memory.max": "max\n",
     "sys/fs/cgroup/memory.current": "123\n"},                                               # no limit
    {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT},                          # no memory controller
    {"proc/self/cgroup": "0::/../../elsewhere\n", "proc/self/mountinfo": V2_MOUNT,
     "sys/fs/cgroup/memory.max": "1\n", "sys/fs/cgroup/memory.current": "0\n"},              # outside the mount
    {"proc/self/cgroup": "0::/a\n", "proc/self/mountinfo": V2_MOUNT.replace(" / /sys", " /b /sys"),
     "sys/fs/cgroup/memory.max": "1\n", "sys/fs/cgroup/memory.current": "0\n"},              # another mount's
    {"proc/self/cgroup": "garbage\n::\n0::\n1:memory\n", "proc/self/mountinfo": "garbage - \n - cgroup2\n1 2 3\n"},
    {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT, "sys/fs/cgroup/memory.max": b"\xff\xfe\n",
     "sys/fs/cgroup/memory.current": "-5\n", "sys/fs/cgroup/memory.stat": "inactive_file\n"},
    {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT, "sys/fs/cgroup/memory.max": "12\n",
     "sys/fs/cgroup/memory.current": "-5\n"},
    {"proc/self/cgroup": "0::/\n", "proc/self/mountinfo": V2_MOUNT, "sys/fs/cgroup/memory.max": "\u00b2\n",
     "sys/fs/cgroup/memory.current": "1\n"},                                                 # a digit to isdigit
])
def test_what_cannot_be_read_or_is_not_a_limit_leaves_the_bound_out(tmp_path, monkeypatch, files):
    """Reading the limits never fails the run: a missing or odd file, `max`, a cgroup outside the mount."""
    fake_limits(monkeypatch)
    assert host_memory(fake_host(tmp_path, {**MEMINFO, **STATUS, **files})) == ON_THE_HOST


@pytest.mark.parametrize("files", [
    {"proc/meminfo": "MemAvailable: lots kB\nMemFree 12\n", "proc/self/status": "VmSize:\t\nVmData: 12 MB\n"},
    {"proc/meminfo": b"MemAvailable: \xff kB\n", "proc/self/status": "VmSize:\t5 MB\n"},
    {"proc/meminfo": "MemAvailable:\n", "proc/self/status": "VmSize: -5 kB\n"},
])
def test_odd_proc_files_leave_nothing_known(tmp_path, monkeypatch, files):
    fake_limits(monkeypatch, address_space=64 * GiB, data=64 * GiB)
    assert host_memory(fake_host(tmp_path, files)) is None


def test_an_unreadable_rlimit_or_no_resource_module_leaves_the_bound_out(tmp_path, monkeypatch):
    root = fake_host(tmp_path, {**MEMINFO, **STATUS})

    def refused(which):
        raise ValueError("not on this system")
    monkeypatch.setattr(host_memory_module.resource, "getrlimit", refused)
    assert host_memory(root) == ON_THE_HOST
    monkeypatch.setattr(host_memory_module, "resource", None)
    assert host_memory(root) == ON_THE_HOST


def test_this_machine_is_read_without_error():
    host = host_memory()
    assert host is None or (host.available >= 0 and host.bound and host.remedy)


def test_the_files_are_read_in_small_pieces_and_a_read_out_of_memory_leaves_its_bound_out(tmp_path, monkeypatch):
    """The bound is read while an out-of-memory error is being worded: torch's import out of memory under ulimit -v
    700000 left no room for the 1 MiB buffer a read asked for, and its MemoryError replaced the one line with a
    traceback."""
    real_open = open

    class Tight:   # a file whose read of more than 64 KiB at once is refused, as the allocator refused it
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, size=-1):
            if size < 0 or size > 64 << 10:
                raise MemoryError
            return self.file.read(size)

    fake_limits(monkeypatch, address_space=2 * GiB)
    root = fake_host(tmp_path, {**MEMINFO, **STATUS})
    monkeypatch.setattr(host_memory_module, "open", Tight, raising=False)
    assert host_memory(root) == HostMemory(GiB // 2, *ADDRESS_SPACE_BOUND, total=32 * GiB)   # MEMINFO's MemTotal
    monkeypatch.setattr(Tight, "read", lambda self, size=-1: (_ for _ in ()).throw(MemoryError))
    assert host_memory(root) is None    # every read refused: nothing known, and no MemoryError


def test_a_small_figure_is_written_with_its_digits():
    """One decimal of a GiB wrote 50 MB as "0.0 GiB available", and 0.14 GiB beside 0.1 GiB as the same figure."""
    assert str(HostMemory(50_000_000, *DATA_BOUND)) == ("50.00 MB available under the process's data-segment limit "
                                                        "(ulimit -d)")
    assert str(HostMemory(20 * GiB)) == "21.47 GB available on the host (MemAvailable)"


def test_the_cpu_allocators_refusal_is_a_memory_error_naming_what_and_the_bound():
    """torch's CPU allocator raises RuntimeError, not MemoryError: the command line's one line never saw it."""
    with pytest.raises(HostMemoryExhausted, match=r"^out of host memory \(or the process's memory limit\) allocating "
                                                  r"a test tensor: .*DefaultCPUAllocator: can't allocate memory") as e:
        with host_allocation("a test tensor"):
            torch.empty(1 << 60, dtype=torch.uint8)     # 1 EiB: refused by the real allocator, on any host
    assert isinstance(e.value, MemoryError) and "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="shape") as other:   # any other RuntimeError is left as it is
        with host_allocation("a test tensor"):
            torch.zeros(2, 3).view(7)
    assert not isinstance(other.value, MemoryError)


def test_an_allocators_refusal_names_the_room_its_free_blocks_did_not_give(monkeypatch):
    """Under ulimit -d a prefill's 47,659,008-byte block refused read "0.11 GB available": the room a plan counts,
    with the allocator's free blocks (room for weights alone), which served none of it."""
    monkeypatch.setattr(host_memory_module, "host_memory",
                        lambda: HostMemory(100_000_000, *DATA_BOUND, free_blocks=60_000_000))
    refused = host_memory_module.exhausted("allocating a block", RuntimeError("DefaultCPUAllocator: not enough memory"))
    assert "; 40.00 MB available under the process's data-segment limit (ulimit -d): raise ulimit -d" in str(refused)


@pytest.mark.parametrize("said", ["could not create a primitive", "std::bad_alloc"])
def test_onednns_primitive_or_a_bad_alloc_refused_is_out_of_memory(said):
    """A bf16 matmul on the CPU under ulimit -d (eval at its edge) raised oneDNN's RuntimeError "could not create a
    primitive", as a traceback: it could not allocate its primitive. It is out of memory in one line, as C++'s
    std::bad_alloc is; a primitive's descriptor refused (a shape it does not run) is not."""
    with pytest.raises(HostMemoryExhausted, match=rf"^out of host memory \(or the process's memory limit\) allocating "
                                                  rf"a matmul: {said}(; .*)?$"):
        with host_allocation("a matmul"):
            raise RuntimeError(said)
    with pytest.raises(RuntimeError, match="descriptor") as other:
        with host_allocation("a matmul"):
            raise RuntimeError("could not create a primitive descriptor for the matmul primitive")
    assert not isinstance(other.value, MemoryError)


@pytest.mark.slow
def test_a_plan_past_a_real_address_space_limit_is_refused_in_one_line():
    """`ulimit -v` and --max-context 1000000 on the tiny model: the allocator's traceback, exit status 1."""
    done = klconvert_bounded("run", "--model", "tiny", "--device", "cpu", "--prompt", "Hello there",
                             "--max-new-tokens", "5", "--max-context", "1000000")
    line = done.error_line()
    assert "available under the process's address-space limit (ulimit -v); lower --max-context to" in line, line
    assert line.endswith("or less, or raise ulimit -v"), line


@pytest.mark.slow
def test_a_batch_runs_under_a_real_address_space_limit_that_fits_one_prompts_prefill(tmp_path):
    """`ulimit -v` and 8 prompt files on the tiny model at --max-context 4096: the plan sized the prefill's workspace
    for all 8 at once (635 MiB) and refused the run, though the engine prefills one prompt at a time; planned for
    that (and a decode step of 8), it is 162 MiB and runs."""
    files = []
    for i in range(8):
        (tmp_path / f"p{i}.txt").write_text(f"Prompt number {i} says hello")
        files += ["--prompt-file", tmp_path / f"p{i}.txt"]
    done = klconvert_bounded("run", "--model", "tiny", "--device", "cpu", *files, "--max-new-tokens", "4",
                             "--max-context", "4096")
    assert done.code == 0, done.err[-2000:]
    assert done.out.count("==> ") == 8 and "batch 8" in done.err.strip().splitlines()[-1], done.err[-2000:]


@pytest.mark.slow
def test_an_eval_past_a_real_address_space_limit_is_refused_in_one_line(tmp_path):
    """`ulimit -v` and --max-tokens 8192 on the tiny model: both log-probs buffers fit the limit, but with the model
    and a prefill segment's logits they do not -- the check counted only the buffers, and the allocator's traceback
    ended the run, exit status 1."""
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"word{i % 997} and more" for i in range(4000)))   # over 8,192 tokens
    done = klconvert_bounded("eval", "--model", "tiny", "--reference", "tiny", "--text-file", text, "--max-tokens",
                             "8192", "--device", "cpu")
    line = done.error_line()
    assert line.startswith("klconvert: error: eval would hold "), line
    assert "one model on the CPU with its memory plan" in line and "the logits in hand" in line, line
    assert "available under the process's address-space limit (ulimit -v); lower --max-tokens to" in line, line
    assert line.endswith("or less, or raise ulimit -v"), line
