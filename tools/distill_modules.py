"""The torch modules tools/distill_bundled.py puts into its student: RoundTrip, the quantize-dequantize round trip each
quantized weight is seen through (the gradient passed straight through it), and FlaChunk, the KDA delta rule through
fla-core's kernels. Apart from the tool, whose --help and refusals of its arguments import no torch (~2 s of CPU)."""
from __future__ import annotations

import torch
from torch import nn

from klconvert.kernels.naive_kda import kda_short_conv
from klconvert.quant.groupwise import dequantize_groupwise, quantize_groupwise
from klconvert.quant.scheme import QuantScheme
from klconvert.runtime import model as M


class RoundTrip(nn.Module):
    """A weight as the quantized folder will hold it: rounded to bf16, quantized and dequantized by `scheme` in
    groups along its last dim (stacked experts: per expert, per row), the gradient passed straight through.

    scale_gradient: also pass the gradient through each group's scale to the weights that set it (LSQ's gradient,
    d w_hat / d scale = code - w / scale, taken on to the group's extremes through the min-max rule, scale = range /
    levels, as d scale / d range = scale / range): a weight at a group's edge then moves for the resolution it
    gives the whole group, not only for its own error -- clipping learned inside the folder's own scales rule.
    The forward value is the same."""

    def __init__(self, scheme: QuantScheme, scale_gradient: bool = False):
        super().__init__()
        self.scheme, self.scale_gradient = scheme, scale_gradient

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        flat = w.detach().to(torch.bfloat16).reshape(-1, w.shape[-1])
        q, scale, zero = quantize_groupwise(flat, s.bits, s.group_size, s.symmetric, observer=s.observer)
        stored = dequantize_groupwise(q, scale, zero).to(w.dtype).view_as(w)
        if not self.scale_gradient:
            return w + (stored - w).detach()
        groups = w.reshape(-1, scale.shape[-1], w.shape[-1] // scale.shape[-1])       # [rows, G, group]
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)            # as the min-max rule
        spread = torch.maximum(-lo, hi) if s.symmetric else hi - lo                    # what the scale divides
        fixed = spread.detach()
        g_scale = scale.to(w.dtype) * torch.where(fixed > 0, spread / fixed.clamp_min(1e-30), 1.0)  # its value
        code = q.view(groups.shape) if zero is None else q.view(groups.shape) - zero.unsqueeze(-1)
        code = code.to(w.dtype)
        x = groups / g_scale.unsqueeze(-1)
        lsq = g_scale.unsqueeze(-1) * (code + x - x.detach())                          # value: code * scale
        return stored + (lsq - lsq.detach()).view_as(w)                                # + exactly zero


class FlaChunk(nn.Module):
    """The training-mode KDA delta rule through fla-core's chunk_kda, whose forward and backward are Triton kernels
    (CUDA, `pip install 'klconvert[fast]'`), in place of kda_chunked's PyTorch chunks: the same conventions as the
    runtime's FlaKDAChunk, q, k, v from the PyTorch short conv in fp32, a fresh pass (no state in or kept). Its
    products are TF32 (~1e-3 from fp32): for the tuning only; the folder is measured in fp32 on the CPU."""

    def forward(self, m: M.KDAMixer, qkv, g_raw, beta_raw, tail, S) -> torch.Tensor:
        from fla.ops.kda import chunk_kda

        assert tail is None and S is None, "the training-mode forward keeps no state"
        B, T, _ = qkv.shape
        q, k, v = kda_short_conv(qkv, None, m.conv_weight).view(B, T, 3, m.H, m.K).unbind(2)
        o, _ = chunk_kda(q, k, v, g_raw.view(B, T, m.H, m.K), beta_raw, A_log=m.A_log.float().flatten(),
                         dt_bias=m.dt_bias.float(), use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                         use_beta_sigmoid_in_kernel=True)
        return o.float()
