"""Plain-PyTorch fp32 twins of kda_decode, kda_layer_step, kda_prefill_conv and kda_chunk, one stage at a time;
kda_chunked is the chunked (WY) form of the recurrence that the runtime's model prefills and trains with."""
import torch
import torch.nn.functional as F

from .naive_rms_norm import rms_norm

CHUNK = 64  # tokens per chunk of kda_chunked (the memory plan sizes its pairwise-decay temporary from it, or T if less)
L2NORM_EPS = 1e-6  # q and k's l2norm: eps inside the sqrt, as fla and the release (the Triton kernels take it too)
SOFTPLUS_THRESHOLD = 20.0  # the gate's softplus is linear above this, as torch's F.softplus(threshold=20)


def kda_gate(g_raw, A_log, dt_bias):
    """Per-channel log decay g = -exp(A_log[h]) * softplus(g_raw + dt_bias), fp32 (softplus linear above 20).

    g_raw [..., H, K]; A_log holds H values, dt_bias H*K. The one PyTorch statement of the gate: the runtime's
    model uses it too; kda_decode's Triton kernel restates it (_decay)."""
    H, K = g_raw.shape[-2:]
    x = g_raw.float() + dt_bias.float().reshape(H, K)
    return -A_log.float().reshape(H, 1).exp() * F.softplus(x, threshold=SOFTPLUS_THRESHOLD)


def kda_short_conv(x, tail, weight):
    """Causal depthwise conv + SiLU over [tail, x], in fp32: x [B, T, C]; tail [B, C, W-1] the W-1 inputs before x
    (None: zeros), updated in place to the last W-1 of [tail, x]; weight [C, 1, W] or [C, W]. Returns [B, T, C]
    fp32. The PyTorch model's short conv, and kda_prefill_conv's twin."""
    B, T, C = x.shape
    weight = weight.reshape(C, 1, -1)
    W = weight.shape[-1]
    past = tail.to(x.dtype) if tail is not None else x.new_zeros(B, C, W - 1)
    xt = torch.cat([past, x.transpose(1, 2)], dim=-1)                   # [B, C, W-1+T]
    if tail is not None:
        tail.copy_(xt[..., -(W - 1):])
    if T == 1:  # one token (decode): a dot per channel; conv1d's setup costs ~6x that on a CPU at this size
        return F.silu((xt.float() * weight.float()[:, 0]).sum(-1)).unsqueeze(1)
    return F.silu(F.conv1d(xt.float(), weight.float(), groups=C)).transpose(1, 2)


def kda_q_scale(head_k_dim: int) -> float:
    """KDA's query scale, 1 / sqrt(head_k_dim): q is l2-normalised, then multiplied by it (fla's chunk_kda default).
    The one statement of it: the kernels, the PyTorch model, its CPU decode and the ONNX export all take it here."""
    return head_k_dim ** -0.5


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + L2NORM_EPS) over the last dim, in fp32: the one PyTorch statement of it."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def naive_kda_decode(q, k, v, g, beta, state, *, A_log, dt_bias):
    B, H, K = q.shape
    q = l2norm(q) * kda_q_scale(K)  # [B, H, K], fp32
    k = l2norm(k)
    gk = kda_gate(g, A_log, dt_bias)  # [B, H, K]
    b = beta.float().sigmoid()[..., None]  # [B, H, 1]
    S = state.float() * gk.exp()[..., None]  # [B, H, K, V]
    u = b * (v.float() - (S * k[..., None]).sum(-2))  # [B, H, V]
    S = S + k[..., None] * u[..., None, :]
    o = (S * q[..., None]).sum(-2)  # [B, H, V]
    state.copy_(S)
    return o.to(v.dtype)


def naive_kda_layer_step(x_qkv, conv_state, conv_weight, f_a, beta_raw, g_a, state, *, f_b_weight, g_b_weight, A_log,
                         dt_bias, o_norm_weight, eps):
    B, H, K, V = state.shape
    g_raw, gate_raw = f_a.float() @ f_b_weight.float().T, g_a.float() @ g_b_weight.float().T  # [B, HK], [B, HV]
    C = 2 * H * K + H * V
    w = conv_weight.float().reshape(C, -1)  # [C, W]
    window = torch.cat([conv_state.float(), x_qkv.float()[..., None]], -1)  # [B, C, W], oldest first
    y = F.silu((window * w).sum(-1))  # [B, C]
    conv_state.copy_(window[..., 1:])
    q, k, v = y.split([H * K, H * K, H * V], -1)
    o = naive_kda_decode(q.view(B, H, K), k.view(B, H, K), v.view(B, H, V), g_raw.float().view(B, H, K),
                         beta_raw.float(), state, A_log=A_log, dt_bias=dt_bias)  # [B, H, V] fp32
    o = rms_norm(o, o_norm_weight, eps)  # fp32 in, fp32 out: the gate applies before the one rounding
    return (o * gate_raw.float().view(B, H, V).sigmoid()).reshape(B, H * V).to(x_qkv.dtype)


def kda_chunked(q, k, v, g, beta, state):
    """The KDA recurrence (runtime/kda.py) over T tokens, chunk by chunk (the WY / UT-transform form).

    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] fp32, the state before the first
    token (not modified). Returns (o [B, T, H, V] fp32, the state after the last token). Nothing passed in is
    updated in place (the in-place ops write only tensors made here, whose old values autograd does not keep), so
    the same code trains (autograd) and prefills.
    Within a chunk, with G the cumulative log decay and D[t, s] = exp(G_t - G_s) (t >= s, so never above 1):
        (I + A) U = beta * (V - (K * exp(G)) S0),  A[t, s] = beta_t sum_i k_t,i k_s,i D[t, s, i]  (s < t)
        O = (Q * exp(G)) S0 + (sum_i q_t,i k_s,i D[t, s, i])_{s <= t} U
        S = exp(G_last) * S0 + (K * exp(G_last - G))^T U
    Each chunk writes its rows of one preallocated o. Where autograd records nothing (a prefill), every chunk builds
    its D, [B, H, C, C, K] -- by far the largest temporary of a chunk -- in one tensor made once for the call, and
    multiplies it by k in place; the rest of a chunk's temporaries are freed before the next starts. A new D per
    chunk (and the einsums' two products of its size) cost a CPU prefill a page fault per 4 KB wherever blocks of
    that size are mapped afresh (runtime/host_malloc.py), and once kept resident by glibc fragmented its heap.
    """
    B, T, H, K = k.shape
    records = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, state))
    q, k, v, g, beta = (x.float().transpose(1, 2) for x in (q, k, v, g, beta))  # [B, H, T, .]
    out = q.new_empty(B, H, T, v.shape[-1])
    C = min(CHUNK, T)                                                  # a shorter prompt's one chunk: no more
    decay = None if records else q.new_empty(B, H, C, C, K)           # autograd keeps each chunk's D: a new one
    for start in range(0, T, CHUNK):
        sl = slice(start, min(start + CHUNK, T))
        out[:, :, sl], state = _wy_chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], state,
                                         decay)
    return out.transpose(1, 2), state


def _wy_chunk(qc, kc, vc, gc, bc, state, decay=None):
    """One chunk of kda_chunked: qc, kc, gc [B, H, C, K], vc [B, H, C, V], bc [B, H, C] fp32, state [B, H, K, V]
    before the chunk -> (o [B, H, C, V], the state after it). `decay`: a [B, H, C', C', K] fp32 tensor (C' >= C) to
    build D in and multiply in place (nothing records autograd); None: D and its product with k made anew."""
    # q's and k's chunks contiguous: the products below read them as laid out (from strided chunks, each product
    # copied them once more)
    qc, kc = qc.contiguous(), kc.contiguous()
    G = gc.cumsum(dim=2)                                                # [B, H, C, K]
    C, K = G.shape[2:]
    causal = G.new_ones(C, C).tril()   # 1 where s <= t, else 0 (G's dtype, not the default): products by it exact
    # D[t, s, i] = exp(G_t - G_s), the exponent zeroed above the diagonal first (D is 1 there, masked out of the
    # products below): exp over finite values, twice as fast as over the -inf a masked_fill would write
    D = (G.unsqueeze(3) - G.unsqueeze(2) if decay is None
         else torch.sub(G.unsqueeze(3), G.unsqueeze(2), out=decay[:, :, :C, :C]))   # [B, H, C(t), C(s), K]
    D.mul_(causal[:, :, None]).exp_()
    kD = D * kc.unsqueeze(2) if decay is None else D.mul_(kc.unsqueeze(2))           # D[t, s, i] k_s,i
    # sum_i k_t,i k_s,i D[t, s, i] and sum_i q_t,i k_s,i D[t, s, i] from one pass over kD
    A, qk = (kD @ torch.stack([kc, qc], dim=-1)).unbind(-1)            # [B, H, C(t), C(s)] each
    eye = torch.eye(C, device=G.device, dtype=A.dtype)
    A = A * (causal - eye) * bc.unsqueeze(-1)                            # s < t
    rhs = torch.cat([bc.unsqueeze(-1) * vc, bc.unsqueeze(-1) * (kc * G.exp())], dim=-1)
    sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    u_tilde, w = sol.split([vc.shape[-1], K], dim=-1)
    u = u_tilde - w @ state                                             # [B, H, C, V]
    o = (qc * G.exp()) @ state + (qk * causal) @ u                      # s <= t
    g_last = G[:, :, -1:]                                                # [B, H, 1, K]
    return o, state * g_last.transpose(-1, -2).exp() + (kc * (g_last - G).exp()).transpose(-1, -2) @ u


def naive_kda_chunk(q, k, v, g, beta, state, *, A_log, dt_bias):
    """kda_chunk's twin: raw q, k (l2-normalised here, q scaled), g (gate input), beta (logits) [B, T, H, .];
    state [B, H, K, V] updated in place. Returns o [B, T, H, V] in v.dtype."""
    o, final = kda_chunked(l2norm(q) * kda_q_scale(q.shape[-1]), l2norm(k), v, kda_gate(g, A_log, dt_bias),
                           beta.float().sigmoid(), state.float())
    state.copy_(final)
    return o.to(v.dtype)
