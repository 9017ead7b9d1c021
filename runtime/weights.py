"""Weights on the device in the form the chosen kernels take: dense tensors for PyTorch, repacked int weights for
Triton. The choice is made once, here, at load; the model only calls what it is handed."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from klconvert.errors import KLError
from klconvert.extras import require
from klconvert.quant import QuantScheme
from klconvert.release import FP32_TENSORS

KERNEL_MODES = ("auto", "triton", "torch")
KEEP_FP32 = (*FP32_TENSORS, "gate.weight")  # read in fp32 whatever the dtype: the release's fp32 ones, and the router


def held_in_fp32(name: str, category: str) -> bool:
    """Whether the runtime holds this tensor in fp32: those read so, and the norms (the model keeps fp32 copies)."""
    return name.endswith(KEEP_FP32) or category == "norm"
Packed = Callable[[str], "tuple[dict[str, torch.Tensor], QuantScheme] | None"]


class DenseLinear(nn.Module):
    """y = x W^T with a dense weight [out, in]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TritonIntLinear(nn.Module):
    """y = x W^T with W held packed (int4/int8 groups), through klconvert.kernels.int_linear."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from klconvert.kernels.int_linear import int_linear

        return int_linear(x, self.packed)


def kernel_takes(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the Triton int kernels take a weight stored with `scheme`: their 128-wide k-tile must divide
    the row and the group."""
    from klconvert.kernels.int_linear import KT

    group = in_features if scheme.group_size == -1 else scheme.group_size
    return scheme.kind == "int" and in_features % KT == 0 and group % KT == 0


class HeldPacked:
    """The weights that stay packed on the device, in the shape of a Policy (`scheme_for`), for the memory plan."""

    def __init__(self, schemes: dict[str, QuantScheme]):
        self.schemes = schemes

    def scheme_for(self, name: str, shape) -> QuantScheme | None:
        return self.schemes.get(name)


def use_triton(kernels: str, device: torch.device) -> bool:
    """Resolve --kernels: auto means Triton on CUDA, PyTorch elsewhere."""
    if kernels not in KERNEL_MODES:
        raise KLError(f"--kernels {kernels!r}: choose one of {', '.join(KERNEL_MODES)}")
    chosen = device.type == "cuda" if kernels == "auto" else kernels == "triton"
    if chosen:
        require("triton", f"--kernels {kernels}" + (" (Triton on CUDA; --kernels torch runs without it)"
                                                    if kernels == "auto" else ""))
    return chosen


class WeightLoader:
    """Hands the model its weights on `device`: tensors, linear layers and (Triton only) packed expert stacks."""

    def __init__(self, read: Callable[[str], torch.Tensor], packed: Packed | None, device: torch.device,
                 dtype: torch.dtype, triton: bool):
        self.read, self._packed, self.device, self.dtype, self.triton = read, packed, device, dtype, triton
        if triton:
            from klconvert.kernels.kda_decode import kda_layer_step
        self.kda_layer_step = kda_layer_step if triton else None  # the fused KDA decode step, or None

    def tensor(self, name: str) -> torch.Tensor:
        """A canonical tensor (dequantized if packed) in the compute dtype, or fp32 for the few kept in fp32."""
        return self.read(name).to(device=self.device, dtype=torch.float32 if name.endswith(KEEP_FP32) else self.dtype)

    def _int_parts(self, name: str) -> tuple[dict[str, torch.Tensor], QuantScheme] | None:
        """The packed int parts of `name` on the device, if the Triton kernels can take them."""
        found = self._packed(name) if (self.triton and self._packed) else None
        if found is None or found[1].kind != "int":
            return None
        parts, scheme = found
        if not kernel_takes(scheme, int(parts["weight_shape"][1])):
            return None
        return {n: t.to(self.device) for n, t in parts.items()}, scheme

    def linear(self, name: str) -> nn.Module:
        """The layer `name` (a `.weight`): the Triton int kernel when it is packed and Triton is on, else dense."""
        found = self._int_parts(name)
        if found is None:
            return DenseLinear(self.tensor(name))
        from klconvert.kernels.int_linear import repack_int_weight

        parts, scheme = found
        return TritonIntLinear(repack_int_weight(parts["weight_packed"], parts["weight_scale"],
                                                 parts.get("weight_zero_point"), parts["weight_shape"], scheme.bits,
                                                 None if scheme.group_size == -1 else scheme.group_size))

    def packed_experts(self, prefix: str, num_experts: int):
        """The routed experts of one MoE block as one kernels.PackedExperts -- with the shared expert stacked in
        when it is stored alike -- or None when the Triton path is off or an expert is not packed as the others
        (the model then runs its PyTorch expert loop)."""
        names = {"gate": "w1", "up": "w3", "down": "w2"}
        experts = []
        for e in range(num_experts):
            one = {k: self._int_parts(f"{prefix}.experts.{e}.{w}.weight") for k, w in names.items()}
            if any(v is None for v in one.values()):
                return None
            experts.append(one)
        schemes = {v[1] for ex in experts for v in ex.values()}
        if len(schemes) != 1:
            return None
        scheme = schemes.pop()
        shared = {k: self._int_parts(f"{prefix}.shared_experts.{k}_proj.weight") for k in names}
        if any(v is None or v[1] != scheme for v in shared.values()):
            shared = None  # the model runs it through its own linear layers
        from klconvert.kernels.fused_moe import repack_moe_experts

        return repack_moe_experts([{k: v[0] for k, v in ex.items()} for ex in experts],
                                  shared=None if shared is None else {k: v[0] for k, v in shared.items()},
                                  bits=scheme.bits, group_size=None if scheme.group_size == -1 else scheme.group_size)
