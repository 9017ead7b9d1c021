"""The kernel choice and the weight-holding rules it rests on: which --kernels runs where, which stored schemes
the Triton int kernels take, which tensors the runtime keeps in fp32. runtime/bind.py applies them."""
from __future__ import annotations

import os
from typing import Callable

import torch

from klconvert.errors import KLError, argument
from klconvert.extras import require
from klconvert.quant import QuantScheme
from klconvert.quant.group_rules import CHANNEL
from klconvert.release import FP32_TENSORS

KERNEL_MODES = ("auto", "triton", "torch")
KEEP_FP32 = (*FP32_TENSORS, "gate.weight")  # read in fp32 whatever the dtype: the release's fp32 ones, and the router


def held_in_fp32(name: str, category: str) -> bool:
    """Whether the runtime holds this tensor in fp32: those read so, and the norms (the model keeps fp32 copies)."""
    return name.endswith(KEEP_FP32) or category == "norm"
Packed = Callable[[str], "tuple[dict[str, torch.Tensor], QuantScheme] | None"]


def kernel_takes(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the Triton int kernels take a weight stored with `scheme`: their 128-wide k-tile must divide
    the row and the group."""
    from klconvert.kernels.int_layout import KT   # no Triton: the plan reads it on a machine without

    group = in_features if scheme.group_size == CHANNEL else scheme.group_size
    return scheme.kind == "int" and in_features % KT == 0 and group % KT == 0


class HeldPacked:
    """The weights that stay packed on the device, in the shape of a Policy (`scheme_for`), for the memory plan;
    `scale_dtypes`: the dtype each one's scales are stored in (Checkpoint.scale_dtypes), which the repack keeps --
    where not known (a policy not yet written), the plan takes the compute dtype."""

    def __init__(self, schemes: dict[str, QuantScheme], scale_dtypes: dict[str, torch.dtype] | None = None):
        self.schemes, self.scale_dtypes = schemes, scale_dtypes or {}

    def scheme_for(self, name: str, shape) -> QuantScheme | None:
        return self.schemes.get(name)


def refuse_triton_off_cuda(kernels: str, device: torch.device) -> None:
    """KLError when --kernels triton is asked for off CUDA: Triton's kernels run on a CUDA GPU (or under
    TRITON_INTERPRET=1, Triton's CPU interpreter, as the tests run them); elsewhere the first step would fail in
    Triton's driver ("0 active drivers")."""
    if kernels != "triton" or device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    where = (argument("device", "--device", str(device)) if torch.cuda.is_available() else
             "this machine (no CUDA GPU is visible)")
    raise KLError(f"{argument('kernels', '--kernels', kernels)} needs a CUDA GPU, but it was asked for on {where}; "
                  "use kernels='torch' (--kernels torch), or auto, the default")


def use_triton(kernels: str, device: torch.device) -> bool:
    """Resolve --kernels: auto means Triton on CUDA, PyTorch elsewhere."""
    if kernels not in KERNEL_MODES:
        raise KLError(f"{argument('kernels', '--kernels', kernels)}: choose one of {', '.join(KERNEL_MODES)}")
    refuse_triton_off_cuda(kernels, device)
    chosen = device.type == "cuda" if kernels == "auto" else kernels == "triton"
    if chosen:
        auto = ", Triton on CUDA (--kernels torch runs without it)," if kernels == "auto" else ""
        require("triton", argument("kernels", "--kernels", kernels) + auto)
    return chosen
