"""Each head's few rows times that head's own matrix -- MLA decode's absorbed query (q_nope into the latent through
W_uk) and output (the latent back through W_uv) -- as one PDL launch that prefetches the matrices into L2 while the
launch before it runs. cuBLAS's batched GEMM does the same work but cannot take part in the PDL chain."""
import torch
import triton
import triton.language as tl

from .pdl import prefetch_fits, prefetch_runs, use_pdl, wait_for_inputs


@triton.jit
def head_matmul_fwd_kernel(x, w, y, B, K, N, sx_b, sx_h, sw_h, sw_k, sw_n, sy_b, sy_h,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                           W_ROWS_N: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """One (head, N block) per program, all B rows; fp32 accumulation. W_ROWS_N: w's N dimension is the
    contiguous one (runs along N to prefetch), else K is."""
    h, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL and PREFETCH:
        if W_ROWS_N:  # K runs of BLOCK_N elements
            prefetch_runs(w + h * sw_h + pid_n * BLOCK_N * sw_n, sw_k, K, tl.minimum(BLOCK_N, N - pid_n * BLOCK_N))
        else:  # BLOCK_N runs of K elements
            prefetch_runs(w + h * sw_h + pid_n * BLOCK_N * sw_n, sw_n, tl.minimum(BLOCK_N, N - pid_n * BLOCK_N), K)
    wait_for_inputs(PDL)
    offs_b = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x + offs_b[:, None] * sx_b + h * sx_h + offs_k[None, :],
                     mask=(offs_b[:, None] < B) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        wt = tl.load(w + h * sw_h + offs_k[:, None] * sw_k + offs_n[None, :] * sw_n,
                     mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, :, None] * wt[None, :, :], axis=1)
    tl.store(y + offs_b[:, None] * sy_b + h * sy_h + offs_n[None, :], acc.to(y.dtype.element_ty),
             mask=(offs_b[:, None] < B) & (offs_n[None, :] < N))


def head_matmul(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, H, K] (last dim contiguous), w [H, K, N] (K or N contiguous: a head's matrix or its transpose view)
    -> [B, H, N] in out_dtype (default x's): y[b, h] = x[b, h] @ w[h], accumulated in fp32. For decode's few rows
    (B up to 16): every program holds all B rows of its head."""
    if x.dim() != 3 or w.dim() != 3 or w.shape[0] != x.shape[1] or w.shape[1] != x.shape[2]:
        raise ValueError(f"head_matmul: x [B, H, K] and w [H, K, N] expected, got {list(x.shape)} and "
                         f"{list(w.shape)}")
    if x.stride(-1) != 1 or 1 not in (w.stride(1), w.stride(2)):
        raise ValueError("head_matmul: x's last dim and one of w's last two must be contiguous")
    B, H, K = x.shape
    N = w.shape[2]
    if B > 16:
        raise ValueError(f"head_matmul: at most 16 rows per head (decode), got {B}")
    y = torch.empty(B, H, N, device=x.device, dtype=out_dtype or x.dtype)
    if B == 0:
        return y
    rows_n = w.stride(2) == 1
    block_b = max(1, triton.next_power_of_2(B))
    block_n = 64 if rows_n else 16
    block_k = max(16, 2048 // (block_b * block_n) * 4) if rows_n else 128
    block_k = min(block_k, triton.next_power_of_2(K))
    pdl = use_pdl(x.device)
    head_matmul_fwd_kernel[(H, triton.cdiv(N, block_n))](
        x, w, y, B, K, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n, W_ROWS_N=rows_n, PDL=pdl,
        PREFETCH=pdl and prefetch_fits(x.device, w.numel() * w.element_size()), launch_pdl=pdl, num_warps=4)
    return y
