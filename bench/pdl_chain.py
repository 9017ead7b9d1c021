"""What programmatic dependent launch buys a chain of small dependent kernels, as a decode step is: 60 bf16 GEMVs
(2048 x 2048, 8.4 MB each, every one reading the one before's output) captured in a CUDA graph, per ordering.

Each ordering's output is checked against the plain launches' first (bit for bit), then timed as graph replays:
- no PDL;
- PDL: let the next kernel go, then wait (no prefetch);
- PDL: L2 prefetch of the weights, let the next kernel go, wait (every kernel of the chain can launch at once);
- PDL: L2 prefetch, wait, then let the next kernel go (one kernel ahead: kernels/pdl.py's order);
- no PDL, every GEMV reading the same weight (L2 hits: what a perfect prefetch could reach).

    python bench/pdl_chain.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from klconvert.kernels.pdl import prefetch_runs

N = K = 2048
LAYERS = 60
BN, BK = 16, 256


@triton.jit
def gemv_kernel(w, x, y, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr,
                ORDER: tl.constexpr):
    """y = 0.03 * w x for BN rows per program. ORDER 0: no PDL; 1: let the next kernel go, then wait; 2: wait, then
    let it go."""
    pid = tl.program_id(0)
    if PREFETCH:
        prefetch_runs(w + pid * BN * K, 0, 1, BN * K)
    if ORDER == 1:
        gdc_launch_dependents()
        gdc_wait()
    if ORDER == 2:
        gdc_wait()
        gdc_launch_dependents()
    rn = pid * BN + tl.arange(0, BN)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        acc += tl.sum(tl.load(w + rn[:, None] * K + rk[None, :]).to(tl.float32)
                      * tl.load(x + rk).to(tl.float32)[None, :], axis=1)
    tl.store(y + rn, (acc * 0.03).to(y.dtype.element_ty))


VARIANTS = [("no PDL", False, 0, False), ("PDL: let go, wait", False, 1, False),
            ("PDL: prefetch, let go, wait", True, 1, False), ("PDL: prefetch, wait, let go", True, 2, False),
            ("no PDL, one weight for all (L2 hits)", False, 0, True)]


def main() -> None:
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    acts = [torch.randn(K, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS + 1)]

    def chain(prefetch, order, same):
        for i in range(LAYERS):
            gemv_kernel[(N // BN,)](weights[0] if same else weights[i], acts[i], acts[i + 1], K=K, BN=BN, BK=BK,
                                    PREFETCH=prefetch, ORDER=order, launch_pdl=order > 0, num_warps=4)

    chain(False, 0, False)
    reference = acts[-1].clone()
    print(f"{torch.cuda.get_device_name()}: {LAYERS} dependent bf16 GEMVs {N}x{K} ({N * K * 2 / 1e6:.1f} MB each), "
          "CUDA graph replay")
    for name, prefetch, order, same in VARIANTS:
        acts[-1].zero_()
        chain(prefetch, order, same)
        torch.cuda.synchronize()
        if not same and not torch.equal(acts[-1], reference):
            raise SystemExit(f"{name}: the output differs from the plain launches'")
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
        print(f"| {name} | {best:.2f} us per GEMV |")


if __name__ == "__main__":
    main()
