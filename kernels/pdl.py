"""Programmatic dependent launch (Hopper and later) for the decode step's kernels: a kernel launched with it may start
while the kernel before it in the stream is still running. It first pulls what it will read into L2 (its weights,
the state it owns), then waits for its inputs (`griddepcontrol.wait`: the previous kernel has finished and its
writes are visible), then lets the next kernel start the same way. L2 is where the GPU's memory is coherent, so a
prefetch never returns stale data, whoever writes the line. A chain of small latency-bound kernels, as a decode
step is, then overlaps each one's launch and weight fetch with its predecessor.

The rule every kernel that takes PDL keeps: before `wait_for_inputs` it issues nothing but `prefetch_runs` (hints,
which never change what a load returns) -- no load it uses, no store, no atomic. One exception: a load, past L1
(`.cg`), of what a kernel two or more launches back wrote, when every launch between is a PDL kernel of this kind
(it lets the next one go only after its own wait, so the writer had finished before this kernel could start):
the MoE's down launch reads the router's choices so, to prefetch its experts' weights. Kernels that are not
launched with PDL (PyTorch's, cuBLAS's) order as they always do.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LINE = tl.constexpr(128)  # bytes per L2 prefetch (one cache line)
ENV = "KLCONVERT_PDL"  # "0" turns PDL off (to compare, or to rule it out)


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL: NVIDIA compute capability >= 9.0 (not ROCm, which shares
    torch's "cuda" device type), not under the Triton interpreter, and not turned off by KLCONVERT_PDL=0."""
    return (device.type == "cuda" and torch.version.hip is None and os.environ.get(ENV, "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1" and _major(device) >= 9)


@functools.lru_cache(maxsize=None)
def _major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def prefetch_fits(device: torch.device, nbytes: int) -> bool:
    """Whether a PDL kernel that reads nbytes of weights prefetches them into L2 before its wait: only while they
    fit in half of the L2. A larger weight (the lm_head's 0.2-0.4 GB) runs in many waves of programs; the first
    wave's prefetches alone overflow the L2 and evict each other before they are read."""
    return nbytes <= _l2_bytes(device) // 2


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


@triton.jit
def _prefetch_line(ptrs, mask):
    """L2 prefetch of the line holding each address where mask (a hint: no register, no effect on any value)."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $2, 0;
        @p prefetch.global.L2 [$1];
        mov.u32 $0, 0;
        }""", "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_runs(first, stride, count, run_len, LANES: tl.constexpr = 128):
    """Prefetch into L2 `count` runs of `run_len` elements each, run i at first + i * stride (in first's elements).
    CUDA only: call under `if PDL:`."""
    run_bytes = run_len * (first.dtype.element_ty.primitive_bitwidth // 8)
    for i in range(count):
        start = (first + i * stride).to(tl.pointer_type(tl.int8))
        for b0 in range(0, run_bytes, LANES * LINE):
            offs = b0 + tl.arange(0, LANES) * LINE
            _prefetch_line(start + offs, offs < run_bytes)


@triton.jit
def prefetch_share(after, after_bytes, program, programs):
    """Program `program` of `programs` prefetches its share (a line-aligned piece) of the first `after_bytes` bytes
    at `after` into L2: weights a later launch reads, fetched while this launch waits. CUDA only: call under
    `if PDL:`."""
    piece = tl.cdiv(tl.cdiv(after_bytes, programs), LINE) * LINE
    lo = program * piece
    if lo < after_bytes:
        prefetch_runs(after.to(tl.pointer_type(tl.int8)) + lo, 0, 1, tl.minimum(piece, after_bytes - lo))


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible, then let the next one
    launch. Every load and store of a PDL kernel comes after this. Letting the next kernel go only after the wait
    keeps one kernel ahead at most: let go first, every kernel of the step can launch at once, each prefetching its
    weights, and they evict each other from L2 (an H200, a chain of 8 MB GEMVs: 6.1 us each this way, 7.5 the
    other, 7.2 without PDL). Without PDL: nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
