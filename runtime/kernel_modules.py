"""The Triton implementations bind swaps into the declared model: each has the call signature of the module it
replaces in runtime/model.py (a packed int linear for `Linear` or a whole `ParallelLinear` group, the fused KDA
decode step, the fused MoE experts, the Triton latent attention). Only imported when Triton is chosen."""
from __future__ import annotations

import torch
from torch import nn

from klconvert import kernels as K


class PackedIntLinear(nn.Module):
    """y = x W^T with W held packed (int4/int8 groups); one kernel for a whole ParallelLinear group, whose rows
    are stacked in the group's order."""

    def __init__(self, packed: K.PackedLinear):
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.int_linear(x, self.packed)


class FusedRMSNorm(nn.Module):
    """RMSNorm, and its residual add, in one launch."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.add_rms_norm(x, None, self.weight, self.eps)[1]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return K.add_rms_norm(x, residual, self.weight, self.eps)


class FusedRouter(nn.Module):
    """Router: the fp32 router GEMV, then sigmoid + bias + top-k + renormalize in one launch (ungrouped)."""

    def __init__(self, router: nn.Module):
        super().__init__()
        c = router.c
        self.weight, self.bias = router.weight, router.e_score_correction_bias
        self.k, self.scaling, self.renorm, self.biased = (c.num_experts_per_token, c.routed_scaling_factor,
                                                          c.moe_renormalize, router.biased)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight)
        return K.moe_route(logits, self.bias, self.k, self.scaling, renormalize=self.renorm,
                           biased_weights=self.biased)


class FusedKDAStep(nn.Module):
    """KDAStep in one launch (conv + SiLU + l2norm + gate + delta rule + gated norm), weights prepared once."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.conv = mixer.conv_weight.reshape(-1, mixer.conv_weight.shape[-1]).contiguous()   # [3HK, W]
        self.A_log, self.dt_bias = mixer.A_log.float().flatten(), mixer.dt_bias.float()
        self.o_norm, self.eps = mixer.o_norm.weight.float(), mixer.eps

    def forward(self, m, qkv, g_raw, beta_raw, gate_raw, tail, S) -> torch.Tensor:
        return K.kda_layer_step(qkv, tail, self.conv, g_raw, beta_raw, gate_raw, S, A_log=self.A_log,
                                dt_bias=self.dt_bias, o_norm_weight=self.o_norm, eps=self.eps)


class FusedExperts(nn.Module):
    """The routed experts (and the shared one, when it is stacked in) through kernels.fused_moe."""

    def __init__(self, packed: K.PackedExperts):
        super().__init__()
        self.packed = packed

    def forward(self, x, ids, weights, shared: nn.Module) -> torch.Tensor:
        y = K.fused_moe(x, ids, weights, self.packed)
        return y if self.packed.has_shared else y + shared(x)


class SharedInStack(nn.Module):
    """Stands in for a shared expert that FusedExperts carries in its stack; never called."""

    def forward(self, x):
        raise RuntimeError("the shared expert runs inside FusedExperts")
