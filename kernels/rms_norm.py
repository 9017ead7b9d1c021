"""RMSNorm with the residual add folded in, one launch per call: x' = x + r (rounded to x's dtype), y = rmsnorm(x')."""
import torch
import triton
import triton.language as tl

from .pdl import use_pdl, wait_for_inputs


@triton.jit
def add_rms_norm_fwd_kernel(x, r, w, y, x_out, n, eps, stride_x, stride_r, stride_y, stride_xo,
                            HAS_RES: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """One row per program: the whole row in registers (hidden sizes up to a few thousand)."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BN)
    mask = offs < n
    v = tl.load(x + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        v = (v.to(tl.float32) + tl.load(r + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        v = v.to(x_out.dtype.element_ty)  # the residual stream is kept in its dtype, as the reference does
        tl.store(x_out + row * stride_xo + offs, v, mask=mask)
    v = v.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(v * v, axis=0) / n + eps)
    out = v * rstd * tl.load(w + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + row * stride_y + offs, out.to(y.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] (same dtype), weight [N] -> (x + residual, rmsnorm(x + residual) * weight), both in
    x.dtype; residual None: (x, rmsnorm(x) * weight). The norm is computed in fp32."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(x2) if residual is not None else x2
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    if rows:
        pdl = use_pdl(x.device)
        add_rms_norm_fwd_kernel[(rows,)](x2, r2, weight, y.view(-1, n), summed, n, eps, x2.stride(0), r2.stride(0),
                                         n, summed.stride(0), HAS_RES=residual is not None,
                                         BN=triton.next_power_of_2(n), PDL=pdl, launch_pdl=pdl,
                                         num_warps=4 if n <= 4096 else 8)
    return summed.view(x.shape), y
