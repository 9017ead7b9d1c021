"""What programmatic dependent launch buys a chain of small dependent kernels, as a decode step is: 60 bf16 GEMVs
(2048 x K, 8.4 MB each at the default K = 2048, every one reading the one before's output) captured in a CUDA graph,
per ordering.

Each ordering's output is checked against the plain launches' first (bit for bit; after the timed replays too), then
timed as graph replays:
- no PDL;
- PDL: let the next kernel go, then wait (no prefetch);
- PDL: L2 prefetch of the weights, let the next kernel go, wait (every kernel of the chain can launch at once);
- PDL: L2 prefetch, wait, then let the next kernel go (one kernel ahead: kernels/pdl.py's order);
- done counters: L2 prefetch; each program spins (one thread, acquire) until every program of the kernel before has
  arrived on its counter, then lets the next kernel go, works, and arrives (release) on its own -- the hand-off a
  persistent kernel's phases or a flag-synchronized chain would use, in place of `griddepcontrol.wait`'s wait for
  the whole grid before; the last program past the spin re-arms the counter for the next replay;
- the same two hand-offs with every GEMV reading one weight (L2 hits: what a perfect prefetch could reach), and no
  PDL so.
--k 128 makes each GEMV 0.5 MB: what a hand-off itself costs.

    python bench/pdl_chain.py [--k 2048]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from klconvert.kernels.pdl import prefetch_runs
from klconvert.script_summary import script_summary

N = 2048
LAYERS = 60
BN = 16


@triton.jit
def _spin(counter, expected):
    """Until *counter >= expected: one thread's acquire reads, the value shared with the program."""
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while seen < expected:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")


@triton.jit
def gemv_kernel(w, x, y, done_in, seen_in, done_out, n_in, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                PREFETCH: tl.constexpr, ORDER: tl.constexpr):
    """y = 0.03 * w x for BN rows per program. ORDER 0: no PDL; 1: let the next kernel go, then wait; 2: wait, then
    let it go; 3: spin until done_in counts n_in arrivals, let the next kernel go, work, arrive on done_out."""
    pid = tl.program_id(0)
    if PREFETCH:
        prefetch_runs(w + pid * BN * K, 0, 1, BN * K)
    if ORDER == 1:
        gdc_launch_dependents()
        gdc_wait()
    if ORDER == 2:
        gdc_wait()
        gdc_launch_dependents()
    if ORDER == 3:
        _spin(done_in, n_in)
        if tl.atomic_add(seen_in, 1, sem="relaxed", scope="gpu") == tl.num_programs(0) - 1:
            tl.atomic_xchg(done_in, 0, sem="relaxed", scope="gpu")  # every program is past the spin
            tl.atomic_xchg(seen_in, 0, sem="relaxed", scope="gpu")
        gdc_launch_dependents()
    rn = pid * BN + tl.arange(0, BN)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        acc += tl.sum(tl.load(w + rn[:, None] * K + rk[None, :]).to(tl.float32)
                      * tl.load(x + rk).to(tl.float32)[None, :], axis=1)
    tl.store(y + rn, (acc * 0.03).to(y.dtype.element_ty))
    if ORDER == 3:
        tl.debug_barrier()  # every thread's stores are out before the release
        tl.atomic_add(done_out, 1, sem="release", scope="gpu")


VARIANTS = [("no PDL", False, 0, False), ("PDL: let go, wait", False, 1, False),
            ("PDL: prefetch, let go, wait", True, 1, False), ("PDL: prefetch, wait, let go", True, 2, False),
            ("done counters: prefetch, spin, let go", True, 3, False),
            ("no PDL, one weight for all (L2 hits)", False, 0, True),
            ("PDL: wait, let go, one weight for all (L2 hits)", False, 2, True),
            ("done counters, one weight for all (L2 hits)", False, 3, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--k", type=int, default=2048, help="Inputs per GEMV (a power of two, <= N = 2048).")
    K = ap.parse_args().k
    if K & (K - 1) or not 16 <= K <= N:
        ap.error(f"--k {K}: a power of two from 16 to {N}")
    BK = min(256, K)
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    acts = [torch.randn(N, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS + 1)]
    done = torch.zeros(LAYERS + 1, dtype=torch.int32, device="cuda")  # arrivals per kernel (ORDER 3)
    seen = torch.zeros_like(done)  # programs past the spin on each counter

    def chain(prefetch, order, same):
        for i in range(LAYERS):
            gemv_kernel[(N // BN,)](weights[0] if same else weights[i], acts[i], acts[i + 1], done[i:], seen[i:],
                                    done[i + 1:], N // BN if i else 0, K=K, BN=BN, BK=BK, PREFETCH=prefetch,
                                    ORDER=order, launch_pdl=order > 0, num_warps=4)
        if order == 3:
            done[LAYERS].zero_()  # the last kernel's arrivals: nothing here waits on them

    def matches(name, same):
        torch.cuda.synchronize()
        if done.any() or seen.any():
            raise SystemExit(f"{name}: a done counter was left armed")
        if not same and not torch.equal(acts[-1], reference):
            raise SystemExit(f"{name}: the output differs from the plain launches'")

    chain(False, 0, False)
    reference = acts[-1].clone()
    print(f"{torch.cuda.get_device_name()}: {LAYERS} dependent bf16 GEMVs {N}x{K} ({N * K * 2 / 1e6:.1f} MB each), "
          "CUDA graph replay")
    for name, prefetch, order, same in VARIANTS:
        acts[-1].zero_()
        chain(prefetch, order, same)
        matches(name, same)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream):
            chain(prefetch, order, same)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                chain(prefetch, order, same)
        for _ in range(20):
            graph.replay()
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(30):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 30 / LAYERS * 1000)
        acts[-1].zero_()
        graph.replay()
        matches(name, same)
        print(f"| {name} | {best:.2f} us per GEMV |")


if __name__ == "__main__":
    main()
