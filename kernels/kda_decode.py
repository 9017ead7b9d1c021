"""KDA (Kimi delta attention) decode: the one-token recurrence step, and the fused layer step (short conv, step,
gated RMSNorm)."""
import torch
import triton
import triton.language as tl

from .naive_kda import L2NORM_EPS, SOFTPLUS_THRESHOLD, kda_q_scale
from .pdl import prefetch_fits, prefetch_runs, use_pdl, wait_for_inputs

_L2NORM_EPS = tl.constexpr(L2NORM_EPS)
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)

# kda_layer_step's (block_v, num_warps) by batch: the first entry whose bound >= B. Measured on an H200
# (2026-11-29, `python bench/kernels.py --only kda`, graph time, fp32 state): at B=1 (64, 8) 8.8 us against (32, 4)
# 10.2 us; at B=64 (32, 4) 109 us against (64, 8) 121 us. In the 27-layer decode step at 4K (2026-11-30, `klconvert
# bench --preset kimi-linear-48b --context 4096 --no-check`, two runs each in one call) (64, 4) beat (64, 8): 1.756 /
# 1.757 ms against 1.776 / 1.777; (64, 2) 7.96, (128, 4) 2.15. At B=16 (2026-11-30, a scratch sweep timed as
# `--only kda`, graph of 32 calls, states rotated) (64, 4) 28.0 us against (32, 4) 33.5, (16, 2) 30.7, (32, 2) 32.8,
# (64, 8) 39.0; the batch-16 step (`--batch 16 --spread-routing --no-check`) 5.980 -> 5.869 / 5.866 ms. Batches
# between 4 and 16 and between 16 and 64 were not measured.
LAYER_STEP_LAUNCH = ((16, (64, 4)), (1 << 62, (32, 4)))


@triton.jit
def _decay(g_raw, dt_bias, a_log):
    """exp(g) with g = -exp(A_log) * softplus(g_raw + dt_bias), softplus threshold 20."""
    x = g_raw + dt_bias
    return tl.exp(-tl.exp(a_log) * tl.where(x > _SOFTPLUS_THRESHOLD, x,
                                            tl.log(1.0 + tl.exp(tl.minimum(x, _SOFTPLUS_THRESHOLD)))))


@triton.jit
def _l2norm(x):
    return x / tl.sqrt(tl.sum(x * x, axis=0) + _L2NORM_EPS)


@triton.jit
def _delta_step(S, q, k, v, decay, beta):
    """S [BK, BV] (rows k, cols v, fp32): S = decay S; S += k (beta (v - S^T k))^T; returns (S, S^T q)."""
    S = S * decay[:, None]
    u = beta * (v - tl.sum(S * k[:, None], axis=0))
    S = S + k[:, None] * u[None, :]
    return S, tl.sum(S * q[:, None], axis=0)


@triton.jit
def kda_decode_fwd_kernel(q, k, v, g, beta, state, a_log, dt_bias, o, scale, H, stride_state,
                          K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One (v block, batch x head) per program; the whole k range so q and k normalize in-program."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    b_q = _l2norm(tl.load(q + i_bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)) * scale
    b_k = _l2norm(tl.load(k + i_bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32))
    b_v = tl.load(v + i_bh * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    decay = _decay(tl.load(g + i_bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                   tl.load(dt_bias + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                   tl.load(a_log + i_h).to(tl.float32))
    b_beta = tl.sigmoid(tl.load(beta + i_bh).to(tl.float32))
    p_s = state + i_b * stride_state + i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
    mask_s = mask_k[:, None] & mask_v[None, :]
    S, b_o = _delta_step(tl.load(p_s, mask=mask_s, other=0.0).to(tl.float32), b_q, b_k, b_v, decay, b_beta)
    tl.store(p_s, S.to(state.dtype.element_ty), mask=mask_s)
    tl.store(o + i_bh * V + offs_v, b_o.to(o.dtype.element_ty), mask=mask_v)


@triton.jit
def _conv_load(p_x, p_c, conv_w, ch, mask, W: tl.constexpr, BW: tl.constexpr):
    """One token's conv inputs for channels ch: (input, old window [BC, BW] oldest first, its taps, last tap)."""
    offs_w = tl.arange(0, BW)
    mask_w = mask[:, None] & (offs_w[None, :] < W - 1)
    xt = tl.load(p_x + ch, mask=mask, other=0.0)
    win = tl.load(p_c + ch[:, None] * (W - 1) + offs_w[None, :], mask=mask_w, other=0.0)
    taps = tl.load(conv_w + ch[:, None] * W + offs_w[None, :], mask=mask_w, other=0.0)
    return xt, win, taps, tl.load(conv_w + ch * W + W - 1, mask=mask, other=0.0)


@triton.jit
def _conv_silu(xt, win, taps, last):
    """SiLU of the causal depthwise conv of one token."""
    acc = tl.sum(win.to(tl.float32) * taps.to(tl.float32), axis=1) + last.to(tl.float32) * xt.to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _conv_shift(p_c, ch, mask, win, xt, W: tl.constexpr, BW: tl.constexpr):
    """Window <- window[1:] + [input]."""
    offs_w = tl.arange(0, BW)
    keep = mask[:, None] & (offs_w[None, :] >= 1) & (offs_w[None, :] < W - 1)
    tl.store(p_c + ch[:, None] * (W - 1) + offs_w[None, :] - 1, win, mask=keep)
    tl.store(p_c + ch * (W - 1) + W - 2, xt.to(p_c.dtype.element_ty), mask=mask)


@triton.jit
def _low_rank_up(a_row, w, rows, mask_rows, R: tl.constexpr, RC: tl.constexpr):
    """w[rows, :] @ a (fp32) for a [R] low-rank activation and a [N, R] weight; rows any shape, R in RC chunks."""
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for r0 in tl.static_range(0, R, RC):  # unrolled: the chunks' loads go out together
        offs_r = r0 + tl.arange(0, RC)
        mask_r = offs_r < R
        a = tl.load(a_row + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        w_t = tl.load(w + tl.expand_dims(rows, -1) * R + offs_r, mask=tl.expand_dims(mask_rows, -1) & mask_r,
                      other=0.0)
        acc += tl.sum(w_t.to(tl.float32) * a, axis=-1)
    return acc


@triton.jit
def kda_layer_step_fwd_kernel(x, conv, conv_w, f_a, f_b, beta, g_a, g_b, state, a_log, dt_bias, norm_w, o, scale,
                              eps, H, stride_x, stride_conv, stride_fa, stride_beta, stride_ga, stride_state, stride_o,
                              K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, NV: tl.constexpr, BW: tl.constexpr, RF: tl.constexpr,
                              RG: tl.constexpr, RC: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """One (batch, head) per program: it owns that head's conv channels, its state and the norm over V, and
    computes its slice of the forget gate (f_b f_a) and of the output gate (g_b g_a) from the low-rank inputs.
    The state streams through in NV blocks of BV columns, so few registers hold it and loads pipeline.
    PREFETCH (with PDL, while the batch's states fit in half the L2: about a dozen fp32 states of the 48B's 2 MiB on
    an H200): the head's state, its slices of f_b, g_b and the conv taps and windows are prefetched before the wait."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    if PREFETCH:
        prefetch_runs(state + i_b * stride_state + i_h * K * V, 0, 1, K * V)
        prefetch_runs(f_b + i_h * K * RF, 0, 1, K * RF)
        prefetch_runs(g_b + i_h * V * RG, 0, 1, V * RG)
        # the head's q and k channels (H * K apart), then its v channels: conv taps and windows
        prefetch_runs(conv_w + i_h * K * W, H * K * W, 2, K * W)
        prefetch_runs(conv_w + (2 * H * K + i_h * V) * W, 0, 1, V * W)
        p_win = conv + i_b * stride_conv
        prefetch_runs(p_win + i_h * K * (W - 1), H * K * (W - 1), 2, K * (W - 1))
        prefetch_runs(p_win + (2 * H * K + i_h * V) * (W - 1), 0, 1, V * (W - 1))
    wait_for_inputs(PDL)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    # every load that depends on nothing else goes out first, the state's first block before all
    p_s = state + i_b * stride_state + i_h * K * V + offs_k[:, None] * V
    offs_v = tl.arange(0, BV)
    S_next = tl.load(p_s + offs_v[None, :], mask=mask_k[:, None] & (offs_v < V)[None, :], other=0.0)
    blocks = tl.arange(0, NV)
    offs_o = blocks[:, None] * BV + tl.arange(0, BV)[None, :]  # [NV, BV]: every v of the head
    mask_o = offs_o < V
    b_norm_w = tl.load(norm_w + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    b_gate = _low_rank_up(g_a + i_b * stride_ga, g_b, i_h * V + offs_o, mask_o, RG, RC)       # [NV, BV]
    b_g = _low_rank_up(f_a + i_b * stride_fa, f_b, i_h * K + offs_k, mask_k, RF, RC)          # [BK]
    b_dt = tl.load(dt_bias + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    b_beta = tl.sigmoid(tl.load(beta + i_b * stride_beta + i_h).to(tl.float32))
    p_x, p_c = x + i_b * stride_x, conv + i_b * stride_conv
    ch_q, ch_k = i_h * K + offs_k, H * K + i_h * K + offs_k  # channels: [q | k | v]
    x_q, win_q, taps_q, last_q = _conv_load(p_x, p_c, conv_w, ch_q, mask_k, W, BW)
    x_k, win_k, taps_k, last_k = _conv_load(p_x, p_c, conv_w, ch_k, mask_k, W, BW)
    ch_v = 2 * H * K + i_h * V + offs_v
    v_next = _conv_load(p_x, p_c, conv_w, ch_v, offs_v < V, W, BW)
    tl.debug_barrier()  # every thread has read the old q, k windows before they shift
    _conv_shift(p_c, ch_q, mask_k, win_q, x_q, W, BW)
    _conv_shift(p_c, ch_k, mask_k, win_k, x_k, W, BW)
    b_q = _l2norm(_conv_silu(x_q, win_q, taps_q, last_q)) * scale
    b_k = _l2norm(_conv_silu(x_k, win_k, taps_k, last_k))
    decay = _decay(b_g, b_dt, tl.load(a_log + i_h).to(tl.float32))
    o_all = tl.zeros([NV, BV], dtype=tl.float32)  # o of every v block, kept for the norm over V
    for i_v in range(NV):  # one block ahead by hand (Triton pipelines only loads that feed tl.dot)
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        mask_s = mask_k[:, None] & mask_v[None, :]
        ch_v = 2 * H * K + i_h * V + offs_v
        S_cur = S_next
        x_v, win_v, taps_v, last_v = v_next
        if NV > 1:
            S_next = tl.load(p_s + BV + offs_v[None, :], mask=mask_k[:, None] & (offs_v + BV < V)[None, :], other=0.0)
            v_next = _conv_load(p_x, p_c, conv_w, ch_v + BV, offs_v + BV < V, W, BW)
        b_v = _conv_silu(x_v, win_v, taps_v, last_v)
        S, b_o = _delta_step(S_cur.to(tl.float32), b_q, b_k, b_v, decay, b_beta)
        tl.store(p_s + offs_v[None, :], S.to(state.dtype.element_ty), mask=mask_s)
        o_all = tl.where(blocks[:, None] == i_v, b_o[None, :], o_all)
        tl.debug_barrier()  # every thread has read this block's old conv windows before they shift
        _conv_shift(p_c, ch_v, mask_v, win_v, x_v, W, BW)
    # per-head RMSNorm over V, times the norm weight and the sigmoid output gate
    o_all = o_all * tl.rsqrt(tl.sum(tl.sum(o_all * o_all, axis=1), axis=0) / V + eps) * b_norm_w * tl.sigmoid(b_gate)
    tl.store(o + i_b * stride_o + i_h * V + offs_o, o_all.to(o.dtype.element_ty), mask=mask_o)


def _check_state(state, B, H, K, V, where):
    if tuple(state.shape) != (B, H, K, V) or state.stride()[1:] != (K * V, V, 1):
        raise ValueError(f"{where}: state must be [{B}, {H}, {K}, {V}] and contiguous past the batch dim, got "
                         f"{tuple(state.shape)} with strides {state.stride()}")
    if state.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{where}: state dtype {state.dtype}; use float32 or bfloat16")


def kda_decode(q, k, v, g, beta, state, *, A_log, dt_bias, out=None, block_v=32):
    """One KDA decode step. q, k, g (raw gate input) [B, H, K]; v [B, H, V]; beta (logits) [B, H];
    state [B, H, K, V] fp32 or bf16, updated in place; A_log [H], dt_bias [H*K]. Returns o [B, H, V] in v.dtype
    (into `out` if given, contiguous). block_v: the launch shape, on 4 warps (default: best measured on H100).

    The runtime launches kda_layer_step, which fuses this step with the layer around it; this is the step alone, the
    op fla's fused_recurrent_kda is too: bench/kernels.py times the two against each other and chains it for the
    bf16-state drift (BENCHMARKS.md), and tests/kernels/test_kda.py holds it to its twin."""
    B, H, K = q.shape
    V = v.shape[-1]
    _check_state(state, B, H, K, V, "kda_decode")
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if out is not None and (tuple(out.shape) != (B, H, V) or not out.is_contiguous()):
        raise ValueError(f"kda_decode: out must be a contiguous [{B}, {H}, {V}] tensor, got {tuple(out.shape)}")
    o = out if out is not None else torch.empty_like(v)
    bv = min(triton.next_power_of_2(block_v), triton.next_power_of_2(V))
    kda_decode_fwd_kernel[(triton.cdiv(V, bv), B * H)](
        q, k, v, g, beta, state, A_log.reshape(-1), dt_bias.reshape(-1), o, kda_q_scale(K),
        H, state.stride(0), K=K, V=V, BK=triton.next_power_of_2(K), BV=bv, num_warps=4)
    return o


def kda_layer_step(x_qkv, conv_state, conv_weight, f_a, beta_raw, g_a, state, *, f_b_weight, g_b_weight, A_log,
                   dt_bias, o_norm_weight, eps, out=None, block_v=None, num_warps=None):
    """The KDA mixer for one token per sequence, in one launch, from its input projections to the output projection.

    x_qkv [B, 2*H*K + H*V]: the q, k, v projection outputs concatenated; conv_state [B, 2*H*K + H*V, W-1]: the
    last W-1 inputs, oldest first, updated in place; conv_weight [2*H*K + H*V, W] (or [.., 1, W]) depthwise;
    f_a [B, RF] with f_b_weight [H*K, RF]: the forget gate's low-rank pair (g_raw = f_a f_b^T); beta_raw [B, H]
    (logits); g_a [B, RG] with g_b_weight [H*V, RG]: the output gate's (gate_raw = g_a g_b^T); state [B, H, K, V]
    fp32 or bf16, updated in place; A_log [H]; dt_bias [H*K]; o_norm_weight [V]. Computes silu(conv(x)) for q, k, v,
    the two gates' up-projections in fp32, then kda_decode's step, then
    rmsnorm_head(o) * o_norm_weight * sigmoid(gate_raw). Returns o [B, H*V] in x_qkv.dtype.
    Rows may be strided (e.g. slices of a cache); the last dim of each input must be contiguous.
    block_v, num_warps: the launch shape (defaults by batch: LAYER_STEP_LAUNCH).
    """
    B, H, K, V = state.shape
    launch = next(launch for bound, launch in LAYER_STEP_LAUNCH if B <= bound)
    block_v, num_warps = block_v or launch[0], num_warps or launch[1]
    C = 2 * H * K + H * V
    conv_weight = conv_weight.reshape(C, -1)
    W = conv_weight.shape[1]
    RF, RG = f_b_weight.shape[-1], g_b_weight.shape[-1]
    _check_state(state, B, H, K, V, "kda_layer_step")
    expected = {"x_qkv": (x_qkv, (B, C)), "conv_state": (conv_state, (B, C, W - 1)), "f_a": (f_a, (B, RF)),
                "beta_raw": (beta_raw, (B, H)), "g_a": (g_a, (B, RG)), "f_b_weight": (f_b_weight, (H * K, RF)),
                "g_b_weight": (g_b_weight, (H * V, RG))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape or t.stride(-1) != 1:
            raise ValueError(f"kda_layer_step: {name} must be {list(shape)} with a contiguous last dim "
                             f"(H={H}, K={K}, V={V}, W={W}), got {list(t.shape)} strides {t.stride()}")
    if conv_state.stride(1) != W - 1 or not (f_b_weight.is_contiguous() and g_b_weight.is_contiguous()):
        raise ValueError("kda_layer_step: conv_state must be contiguous past the batch dim, f_b_weight and "
                         "g_b_weight contiguous")
    o = out if out is not None else x_qkv.new_empty(B, H * V)
    bv = min(triton.next_power_of_2(block_v), triton.next_power_of_2(V))
    pdl = use_pdl(state.device)
    kda_layer_step_fwd_kernel[(B * H,)](
        x_qkv, conv_state, conv_weight.contiguous(), f_a, f_b_weight, beta_raw, g_a, g_b_weight, state,
        A_log.reshape(-1), dt_bias.reshape(-1), o_norm_weight, o, kda_q_scale(K), eps, H,
        x_qkv.stride(0), conv_state.stride(0), f_a.stride(0), beta_raw.stride(0), g_a.stride(0), state.stride(0),
        o.stride(0), K=K, V=V, W=W, BK=triton.next_power_of_2(K), BV=bv,
        NV=triton.next_power_of_2(triton.cdiv(V, bv)), BW=triton.next_power_of_2(max(W - 1, 1)), RF=RF, RG=RG,
        RC=min(32, triton.next_power_of_2(max(RF, RG))), PDL=pdl,
        PREFETCH=pdl and prefetch_fits(state.device, state.nbytes), launch_pdl=pdl, num_warps=num_warps)
    return o
