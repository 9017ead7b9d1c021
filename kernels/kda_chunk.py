"""KDA (Kimi delta attention) prefill: the short conv + SiLU over T tokens (kda_prefill_conv), and the chunked
recurrence over T tokens (the WY form of naive_kda.kda_chunked)
with its matrix products on tensor cores, in four launches:

1. per chunk of BT tokens: the gate g = -exp(A_log) softplus(g_raw + dt_bias) and its cumulative sum G inside the
   chunk (the only thing written at full width besides the output);
2. per chunk: Akk[t, s] = beta_t sum_i k_t,i k_s,i exp(G_t,i - G_s,i) (s < t) and Aqk (same with q, s <= t), in
   BC-token sub-blocks: across sub-blocks as one tl.dot with both factors scaled by exp(G - G_ref), G_ref a token
   between the two (so every exponent is <= 0 and nothing overflows), inside a sub-block column by column;
3. per chunk: (I + Akk)^-1 by forward substitution, then w = (I + Akk)^-1 (beta k exp(G)), u = (I + Akk)^-1 beta v;
4. per (sequence, head, block of v): the chunks in order, the state [K, BV] in fp32 registers:
   u' = u - w S;  o = (q exp(G)) S + Aqk u';  S = exp(G_last) S + (k exp(G_last - G))^T u'.
q and k are l2-normalised (q times kda_q_scale(K)) and beta passed through a sigmoid inside the kernels that read
them, as kda_decode does; the state is [B, H, K, V] in kda_decode's layout and dtype, read and written in place.
"""
import torch
import triton
import triton.language as tl

from .naive_kda import L2NORM_EPS, SOFTPLUS_THRESHOLD, kda_q_scale

BT = 64  # tokens per chunk
_L2NORM_EPS = tl.constexpr(L2NORM_EPS)
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)
BC = 16  # tokens per sub-block of the in-chunk products (tl.dot's smallest tile)


@triton.jit
def kda_prefill_conv_kernel(x, tail, w, y, T, C, s_xb, s_xt, s_tail, W: tl.constexpr, BT: tl.constexpr,
                            BCH: tl.constexpr):
    """One (token block, channel block, sequence) per program: y[t, c] = silu(sum_j w[c, j] x[t - W + 1 + j, c]),
    inputs before the first token from the tail (oldest first)."""
    i_t, i_c, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i_t * BT + tl.arange(0, BT)
    ch = i_c * BCH + tl.arange(0, BCH)
    mask_c = ch < C
    acc = tl.zeros([BT, BCH], dtype=tl.float32)
    for j in tl.static_range(W):
        src = rows - (W - 1) + j  # the input row this tap reads; < 0: tail column W - 1 + src
        in_x = ((src >= 0) & (src < T))[:, None] & mask_c[None, :]
        b_x = tl.load(x + i_b * s_xb + src[:, None] * s_xt + ch[None, :], mask=in_x, other=0.0)
        in_tail = (src < 0)[:, None] & mask_c[None, :]
        b_tail = tl.load(tail + i_b * s_tail + ch[None, :] * (W - 1) + (W - 1 + src)[:, None], mask=in_tail, other=0.0)
        acc += (b_x.to(tl.float32) + b_tail.to(x.dtype.element_ty).to(tl.float32)) * \
            tl.load(w + ch * W + j, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(y + (i_b * T + rows)[:, None] * C + ch[None, :], (acc * tl.sigmoid(acc)).to(y.dtype.element_ty),
             mask=(rows < T)[:, None] & mask_c[None, :])


@triton.jit
def _rows_normed(p, s_t, rows, mask_t, offs_k, mask_k, scale):
    """Rows [len(rows), BK] of a [.., K] tensor with token stride s_t, l2-normalised (eps L2NORM_EPS inside the sqrt)
    and times scale; rows past T are zero."""
    x = tl.load(p + rows[:, None] * s_t + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                other=0.0).to(tl.float32)
    return x * (tl.rsqrt(tl.sum(x * x, axis=1) + _L2NORM_EPS) * scale)[:, None]


@triton.jit
def _cum_gate(G, rows, T, stride_G, offs_k, mask_k):
    """Rows of the in-chunk cumulative gate; rows past T repeat the last token's (a padded token: no decay)."""
    return tl.load(G + tl.minimum(rows, T - 1)[:, None] * stride_G + offs_k[None, :], mask=mask_k[None, :],
                   other=0.0)


@triton.jit
def kda_chunk_gate_kernel(g, a_log, dt_bias, G, T, H, s_g, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    mask = (rows < T)[:, None] & (offs_k < K)[None, :]
    x = tl.load(g + (i_b * T + rows)[:, None] * s_g + i_h * K + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) + tl.load(dt_bias + i_h * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    softplus = tl.where(x > _SOFTPLUS_THRESHOLD, x, tl.log(1.0 + tl.exp(tl.minimum(x, _SOFTPLUS_THRESHOLD))))
    gate = tl.where(mask, -tl.exp(tl.load(a_log + i_h).to(tl.float32)) * softplus, 0.0)
    tl.store(G + (i_b * T + rows)[:, None] * (H * K) + i_h * K + offs_k[None, :], tl.cumsum(gate, axis=0), mask=mask)


@triton.jit
def kda_chunk_intra_kernel(q, k, beta, G, Akk, Aqk, scale, T, H, s_q, s_k, s_beta, K: tl.constexpr,
                           BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * T * s_q + i_h * K
    k += i_b * T * s_k + i_h * K
    G += i_b * T * H * K + i_h * K
    Akk += (i_b * T * H + i_h) * BT
    Aqk += (i_b * T * H + i_h) * BT
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    offs_c = tl.arange(0, BC)
    for i in tl.static_range(BT // BC):  # row sub-block
        rows = i_t * BT + i * BC + offs_c
        mask_t = rows < T
        q_i = _rows_normed(q, s_q, rows, mask_t, offs_k, mask_k, scale)
        k_i = _rows_normed(k, s_k, rows, mask_t, offs_k, mask_k, 1.0)
        G_i = _cum_gate(G, rows, T, H * K, offs_k, mask_k)
        b_i = tl.sigmoid(tl.load(beta + (i_b * T + rows) * s_beta + i_h, mask=mask_t, other=0.0).to(tl.float32))
        p_kk = Akk + rows[:, None] * (H * BT)
        p_qk = Aqk + rows[:, None] * (H * BT)
        if i > 0:  # the sub-blocks left of the diagonal, through the last token before this sub-block
            G_ref = tl.load(G + tl.minimum(i_t * BT + i * BC - 1, T - 1) * (H * K) + offs_k, mask=mask_k, other=0.0)
            kg_i = k_i * tl.exp(G_i - G_ref[None, :])
            qg_i = q_i * tl.exp(G_i - G_ref[None, :])
            for j in tl.static_range(i):
                cols = i_t * BT + j * BC + offs_c
                k_j = _rows_normed(k, s_k, cols, cols < T, offs_k, mask_k, 1.0)
                k_j = tl.trans(k_j * tl.exp(G_ref[None, :] - _cum_gate(G, cols, T, H * K, offs_k, mask_k)))
                a_kk = tl.dot(kg_i, k_j, input_precision=DOT) * b_i[:, None]
                tl.store(p_kk + j * BC + offs_c[None, :], a_kk, mask=mask_t[:, None])
                tl.store(p_qk + j * BC + offs_c[None, :], tl.dot(qg_i, k_j, input_precision=DOT), mask=mask_t[:, None])
        a_kk = tl.zeros([BC, BC], dtype=tl.float32)
        a_qk = tl.zeros([BC, BC], dtype=tl.float32)
        for c in range(BC):  # the diagonal sub-block, one column (key token) at a time
            col = i_t * BT + i * BC + c
            k_c = tl.load(k + tl.minimum(col, T - 1) * s_k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            k_c = k_c * tl.rsqrt(tl.sum(k_c * k_c, axis=0) + _L2NORM_EPS)
            G_c = tl.load(G + tl.minimum(col, T - 1) * (H * K) + offs_k, mask=mask_k, other=0.0)
            below = (offs_c >= c)[:, None]
            decay = tl.exp(tl.where(below, G_i - G_c[None, :], 0.0)) * k_c[None, :]
            kk = tl.where(offs_c > c, tl.sum(k_i * decay, axis=1) * b_i, 0.0)
            qk = tl.where(offs_c >= c, tl.sum(q_i * decay, axis=1), 0.0)
            a_kk = tl.where(offs_c[None, :] == c, kk[:, None], a_kk)
            a_qk = tl.where(offs_c[None, :] == c, qk[:, None], a_qk)
        tl.store(p_kk + i * BC + offs_c[None, :], a_kk, mask=mask_t[:, None])
        tl.store(p_qk + i * BC + offs_c[None, :], a_qk, mask=mask_t[:, None])


@triton.jit
def kda_chunk_solve_kernel(k, v, beta, G, Akk, w, u, T, H, s_k, s_v, s_beta, K: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BT)
    rows = i_t * BT + offs_t
    mask_t = rows < T
    Akk += (i_b * T * H + i_h) * BT
    # X = (I + L)^-1 - I, L the strictly lower Akk: row r of X is -L[r] - sum_{c<r} L[r, c] X[c]
    L = tl.load(Akk + rows[:, None] * (H * BT) + offs_t[None, :],
                mask=mask_t[:, None] & (offs_t[None, :] < offs_t[:, None]), other=0.0)
    X = -L
    for r in range(1, BT):
        a = -tl.load(Akk + (i_t * BT + r) * (H * BT) + offs_t, mask=offs_t < tl.where(i_t * BT + r < T, r, 0),
                     other=0.0)
        a += tl.sum(a[:, None] * X, axis=0)
        X = tl.where(offs_t[:, None] == r, a[None, :], X)
    X += (offs_t[:, None] == offs_t[None, :]).to(tl.float32)
    b = tl.sigmoid(tl.load(beta + (i_b * T + rows) * s_beta + i_h, mask=mask_t, other=0.0).to(tl.float32))
    offs_k, offs_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    k_n = _rows_normed(k + i_b * T * s_k + i_h * K, s_k, rows, mask_t, offs_k, mask_k, 1.0)
    G_t = _cum_gate(G + i_b * T * H * K + i_h * K, rows, T, H * K, offs_k, mask_k)
    b_w = tl.dot(X, k_n * tl.exp(G_t) * b[:, None], input_precision=DOT)
    tl.store(w + ((i_b * T + rows) * H + i_h)[:, None] * K + offs_k[None, :], b_w,
             mask=mask_t[:, None] & mask_k[None, :])
    mask_tv = mask_t[:, None] & mask_v[None, :]
    b_v = tl.load(v + (i_b * T + rows)[:, None] * s_v + i_h * V + offs_v[None, :], mask=mask_tv, other=0.0)
    b_u = tl.dot(X, b_v.to(tl.float32) * b[:, None], input_precision=DOT)
    tl.store(u + ((i_b * T + rows) * H + i_h)[:, None] * V + offs_v[None, :], b_u, mask=mask_tv)


@triton.jit
def kda_chunk_state_kernel(q, k, G, Aqk, w, u, state, o, scale, T, H, s_q, s_k, s_o, stride_state,
                           K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           DOT: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t, offs_k = tl.arange(0, BT), tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    p_s = state + i_b * stride_state + i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
    mask_s = mask_k[:, None] & mask_v[None, :]
    S = tl.load(p_s, mask=mask_s, other=0.0).to(tl.float32)
    q += i_b * T * s_q + i_h * K
    k += i_b * T * s_k + i_h * K
    G += i_b * T * H * K + i_h * K
    for i_t in range(tl.cdiv(T, BT)):
        rows = i_t * BT + offs_t.to(tl.int64)
        mask_t = rows < T
        q_n = _rows_normed(q, s_q, rows, mask_t, offs_k, mask_k, scale)
        k_n = _rows_normed(k, s_k, rows, mask_t, offs_k, mask_k, 1.0)
        G_t = _cum_gate(G, rows, T, H * K, offs_k, mask_k)
        G_last = tl.load(G + tl.minimum(i_t * BT + BT - 1, T - 1) * (H * K) + offs_k, mask=mask_k, other=0.0)
        tok = (i_b * T + rows) * H + i_h
        b_w = tl.load(w + tok[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        mask_tv = mask_t[:, None] & mask_v[None, :]
        b_u = tl.load(u + tok[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0)
        a_qk = tl.load(Aqk + tok[:, None] * BT + offs_t[None, :],
                       mask=mask_t[:, None] & (offs_t[None, :] <= offs_t[:, None]), other=0.0)
        b_u -= tl.dot(b_w, S, input_precision=DOT)
        b_o = tl.dot(q_n * tl.exp(G_t), S, input_precision=DOT) + tl.dot(a_qk, b_u, input_precision=DOT)
        tl.store(o + (i_b * T + rows)[:, None] * s_o + i_h * V + offs_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=mask_tv)
        k_end = tl.trans(k_n * tl.exp(G_last[None, :] - G_t))  # each key decayed to the chunk's end
        S = S * tl.exp(G_last)[:, None] + tl.dot(k_end, b_u, input_precision=DOT)
    tl.store(p_s, S.to(state.dtype.element_ty), mask=mask_s)


def kda_prefill_conv(x, tail, weight, *, out_dtype=torch.float32, block_t=64, block_c=128):
    """Causal depthwise conv + SiLU over T tokens. x [B, T, C] (rows may be strided, the last dim contiguous);
    tail [B, C, W-1]: the W-1 inputs before x, oldest first, updated in place to the last W-1 of [tail, x];
    weight [C, W] (or [C, 1, W]). Returns y [B, T, C] in out_dtype (computed in fp32), contiguous."""
    B, T, C = x.shape
    weight = weight.reshape(C, -1).contiguous()
    W = weight.shape[1]
    if tuple(tail.shape) != (B, C, W - 1) or tail.stride()[1:] != (W - 1, 1) or x.stride(-1) != 1:
        raise ValueError(f"kda_prefill_conv: x must be [B, T, C] with a contiguous last dim and tail [{B}, {C}, "
                         f"{W - 1}] contiguous past the batch dim; got {tuple(x.shape)}, {tuple(tail.shape)}")
    y = torch.empty(B, T, C, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c), B)
    kda_prefill_conv_kernel[grid](x, tail, weight, y, T, C, x.stride(0), x.stride(1), tail.stride(0), W=W, BT=block_t,
                                  BCH=block_c)
    tail.copy_(torch.cat([tail, x[:, -(W - 1):].transpose(1, 2).to(tail.dtype)], dim=-1)[..., -(W - 1):])
    return y


def _token_stride(x, D):
    """x [B, T, H, D] with a contiguous head row and rows of a batch evenly spaced; returns x (copied if needed)
    and its token stride."""
    T = x.shape[1]
    if x.stride(-1) != 1 or x.stride(-2) != D or x.stride(0) != T * x.stride(1):
        x = x.contiguous()
    return x, x.stride(1)


def kda_chunk(q, k, v, g, beta, state, *, A_log, dt_bias, out=None, block_v=32, num_warps=8,
              num_stages=1, precision="tf32"):
    """KDA over T tokens of each sequence from `state`. q, k, g (raw gate input) [B, T, H, K]; v [B, T, H, V];
    beta (logits) [B, T, H]; state [B, H, K, V] fp32 or bf16 (kda_decode's), updated in place to the state after
    the last token; A_log [H]; dt_bias [H*K]. Token rows may be strided (views of one projection). Returns
    o [B, T, H, V] in v.dtype (into `out` if given). block_v, num_warps, num_stages: the recurrence's launch shape
    (its chunk loop holds four [64, 128] fp32 tiles at once: 8 warps keep them in registers, and pipelining them
    needs more shared memory than an H200 has);
    precision: tl.dot's input_precision for the fp32 products ("tf32", or "ieee": exact fp32, slower)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K) or tuple(g.shape) != (B, T, H, K) or tuple(v.shape[:3]) != (B, T, H) \
            or tuple(beta.shape) != (B, T, H):
        raise ValueError(f"kda_chunk: q, k, g must be [B, T, H, K] and v [B, T, H, V], beta [B, T, H]; got "
                         f"{[tuple(t.shape) for t in (q, k, v, g, beta)]}")
    if tuple(state.shape) != (B, H, K, V) or state.stride()[1:] != (K * V, V, 1):
        raise ValueError(f"kda_chunk: state must be [{B}, {H}, {K}, {V}] and contiguous past the batch dim, got "
                         f"{tuple(state.shape)} with strides {state.stride()}")
    (q, s_q), (k, s_k), (v, s_v), (g, s_g) = (_token_stride(x, D) for x, D in ((q, K), (k, K), (v, V), (g, K)))
    beta = beta if beta.stride(-1) == 1 and beta.stride(0) == T * beta.stride(1) else beta.contiguous()
    o = out if out is not None else v.new_empty(B, T, H, V)
    if tuple(o.shape) != (B, T, H, V) or o.stride(-1) != 1 or o.stride(-2) != V or o.stride(0) != T * o.stride(1):
        raise ValueError(f"kda_chunk: out must be [{B}, {T}, {H}, {V}] with contiguous heads, got {tuple(o.shape)}")
    scale = kda_q_scale(K)
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    f32 = dict(device=q.device, dtype=torch.float32)
    G, w = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)
    Akk, Aqk, u = torch.empty(B, T, H, BT, **f32), torch.empty(B, T, H, BT, **f32), torch.empty(B, T, H, V, **f32)
    grid = (triton.cdiv(T, BT), B * H)
    kda_chunk_gate_kernel[grid](g, A_log.reshape(-1), dt_bias.reshape(-1), G, T, H, s_g, K=K, BT=BT, BK=BK)
    kda_chunk_intra_kernel[grid](q, k, beta, G, Akk, Aqk, scale, T, H, s_q, s_k, beta.stride(1), K=K, BT=BT, BC=BC,
                                 BK=BK, DOT=precision)
    kda_chunk_solve_kernel[grid](k, v, beta, G, Akk, w, u, T, H, s_k, s_v, beta.stride(1), K=K, V=V, BT=BT, BK=BK,
                                 BV=BV, DOT=precision, num_warps=8)
    bv = min(triton.next_power_of_2(block_v), BV)
    kda_chunk_state_kernel[(triton.cdiv(V, bv), B * H)](
        q, k, G, Aqk, w, u, state, o, scale, T, H, s_q, s_k, o.stride(1), state.stride(0), K=K, V=V, BT=BT, BK=BK,
        BV=bv, DOT=precision, num_warps=num_warps, num_stages=num_stages)
    return o
