"""Plain-PyTorch fp32 twins of kda_decode and kda_layer_step, one stage at a time."""
import torch
import torch.nn.functional as F


def kda_gate(g_raw, A_log, dt_bias):
    """Per-channel log decay g = -exp(A_log[h]) * softplus(g_raw + dt_bias), fp32 (softplus linear above 20).

    g_raw [..., H, K]; A_log holds H values, dt_bias H*K. The one PyTorch statement of the gate: the runtime's
    model uses it too; kda_decode's Triton kernel restates it (_decay)."""
    H, K = g_raw.shape[-2:]
    x = g_raw.float() + dt_bias.float().reshape(H, K)
    return -A_log.float().reshape(H, 1).exp() * F.softplus(x, threshold=20.0)


def _l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def naive_kda_decode(q, k, v, g, beta, state, *, A_log, dt_bias, scale=None, out=None):
    B, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    q = _l2norm(q.float()) * scale  # [B, H, K]
    k = _l2norm(k.float())
    gk = kda_gate(g, A_log, dt_bias)  # [B, H, K]
    b = beta.float().sigmoid()[..., None]  # [B, H, 1]
    S = state.float() * gk.exp()[..., None]  # [B, H, K, V]
    u = b * (v.float() - (S * k[..., None]).sum(-2))  # [B, H, V]
    S = S + k[..., None] * u[..., None, :]
    o = (S * q[..., None]).sum(-2)  # [B, H, V]
    state.copy_(S)
    o = o.to(v.dtype)
    return o if out is None else out.copy_(o)


def naive_kda_layer_step(x_qkv, conv_state, conv_weight, g_raw, beta_raw, gate_raw, state, *, A_log, dt_bias,
                         o_norm_weight, eps, scale=None, out=None):
    B, H, K, V = state.shape
    C = 2 * H * K + H * V
    w = conv_weight.float().reshape(C, -1)  # [C, W]
    window = torch.cat([conv_state.float(), x_qkv.float()[..., None]], -1)  # [B, C, W], oldest first
    y = F.silu((window * w).sum(-1))  # [B, C]
    conv_state.copy_(window[..., 1:])
    q, k, v = y.split([H * K, H * K, H * V], -1)
    o = naive_kda_decode(q.view(B, H, K), k.view(B, H, K), v.view(B, H, V), g_raw.float().view(B, H, K),
                         beta_raw.float(), state, A_log=A_log, dt_bias=dt_bias, scale=scale)  # [B, H, V] fp32
    o = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + eps) * o_norm_weight.float()
    o = (o * gate_raw.float().view(B, H, V).sigmoid()).reshape(B, H * V).to(x_qkv.dtype)
    return o if out is None else out.copy_(o)
