"""Merging attention partials over disjoint key blocks by their log-sum-exp, in place and in one pass: what a prefill
does after each key block's fused attention call (runtime PrefillAttention). Its PyTorch form reads and writes the
fp32 running output several times per block (logaddexp, two exps, two products, a sum)."""
import torch
import triton
import triton.language as tl


@triton.jit
def merge_attention_kernel(o, lse, o_b, lse_b, T, H, Dv,
                           so_b, so_h, so_t, sl_b, sl_h, sl_t, sb_b, sb_h, sb_t, slb_b, slb_h, slb_t,
                           BT: tl.constexpr, BD: tl.constexpr):
    """One (batch, head) and BT queries per program; o's and o_b's last dimension contiguous."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    t = pid_t * BT + tl.arange(0, BT)
    d = tl.arange(0, BD)
    tm = t < T
    mask = tm[:, None] & (d[None, :] < Dv)
    la = tl.load(lse + b * sl_b + h * sl_h + t * sl_t, mask=tm, other=0.0)
    lb = tl.load(lse_b + b * slb_b + h * slb_h + t * slb_t, mask=tm, other=0.0).to(tl.float32)
    m = tl.maximum(la, lb)
    both = m + tl.log(tl.exp(la - m) + tl.exp(lb - m))
    o_ptr = o + b * so_b + h * so_h + t[:, None] * so_t + d[None, :]
    acc = tl.load(o_ptr, mask=mask, other=0.0) * tl.exp(la - both)[:, None]
    ob = tl.load(o_b + b * sb_b + h * sb_h + t[:, None] * sb_t + d[None, :], mask=mask, other=0.0)
    acc += ob.to(tl.float32) * tl.exp(lb - both)[:, None]
    tl.store(o_ptr, acc, mask=mask)
    tl.store(lse + b * sl_b + h * sl_h + t * sl_t, both, mask=tm)


def merge_attention_(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """o [B, H, T, Dv] fp32 and lse [B, H, T] fp32: attention over key set A, overwritten with attention over A and
    a disjoint set B, given by o_b [B, H, T, Dv] (any float dtype) and lse_b [B, H, T]. Any strides but a
    contiguous last dimension for o and o_b."""
    B, H, T, Dv = o.shape
    if o.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"merge_attention_: the running output and lse must be fp32, not {o.dtype} and {lse.dtype}")
    if o_b.shape != o.shape or lse.shape != (B, H, T) or lse_b.shape != (B, H, T):
        raise ValueError(f"merge_attention_: shapes o {tuple(o.shape)}, lse {tuple(lse.shape)}, "
                         f"o_b {tuple(o_b.shape)}, lse_b {tuple(lse_b.shape)} do not agree")
    for name, x in (("o", o), ("o_b", o_b)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"merge_attention_: {name}'s last dimension must be contiguous")
    if B * H * T == 0:
        return
    BT = 32
    merge_attention_kernel[(triton.cdiv(T, BT), B * H)](
        o, lse, o_b, lse_b, T, H, Dv, o.stride(0), o.stride(1), o.stride(2), *lse.stride(),
        o_b.stride(0), o_b.stride(1), o_b.stride(2), *lse_b.stride(),
        BT=BT, BD=triton.next_power_of_2(Dv), num_warps=4)
