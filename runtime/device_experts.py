"""Routed experts held dense (a folder whose experts are not quantized, the bundled model's bf16 one among them)
with the dispatch on the device, so that a decode step holding them is captured in a CUDA graph: the reference
loop (model.Experts) asks the host which experts were chosen, which a graph cannot do. bind adopts it on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klconvert.runtime.model import Experts


class DeviceExperts(Experts):
    """Experts whose forward never waits on the host up to MAX_TOKENS tokens: every expert runs over every token,
    weighted by an [N, E] matrix that is zero off the chosen experts -- all E experts read once a call, no weight
    copied, temporaries [E, N, 2I] and [E, N, D] (under the stack's own size at these token counts). More tokens (a
    prefill) take the reference loop, which computes only what was chosen. `adopt` turns a stack of at most
    MAX_BYTES into one (the same parameters): reading a layer's every expert each step then costs at most ~15 us at
    an H200's copy bandwidth; a larger stack (a bf16 48B layer's is 3.6 GB) keeps the loop, which reads only the
    chosen experts but asks the host, so its model decodes eagerly."""

    MAX_TOKENS = 64
    MAX_BYTES = 64 * 2**20

    @classmethod
    def adopt(cls, experts: Experts) -> None:
        size = sum(w.numel() * w.element_size() for w in (experts.w13, experts.w2))
        if type(experts) is Experts and size <= cls.MAX_BYTES:
            experts.__class__ = cls

    def on_device(self, tokens: int) -> bool:
        return tokens <= self.MAX_TOKENS

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared: nn.Module) -> torch.Tensor:
        N = x.shape[0]
        if not self.on_device(N):
            return super().forward(x, ids, weights, shared)
        I = self.w2.shape[-1]
        gate_up = torch.matmul(x, self.w13.transpose(1, 2))                                       # [E, N, 2I]
        y = torch.bmm(F.silu(gate_up[..., :I]) * gate_up[..., I:], self.w2.transpose(1, 2))      # [E, N, D]
        share = torch.zeros(N, self.w13.shape[0], device=x.device, dtype=torch.float32).scatter_(1, ids,
                                                                                                 weights.float())
        return (shared(x).float() + torch.einsum("ne,end->nd", share, y.float())).to(x.dtype)
