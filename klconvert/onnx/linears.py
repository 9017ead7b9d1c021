"""Each linear of the bound model as graph nodes: MatMulNBits fed from the checkpoint's packed parts where the weight
is stored packed, else a MatMul over the bound module's float weight."""
from __future__ import annotations

import numpy as np
import torch

from klconvert.onnx.graph import GraphBuilder
from klconvert.onnx.matmul_nbits import NBitsWeight, nbits_weight
from klconvert.quant import decompress_weight
from klconvert.runtime import model as M
from klconvert.runtime.weights import Packed


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class Linears:
    """The bound model's config and the checkpoint's packed-parts reader (Checkpoint.packed)."""

    def __init__(self, config, packed: Packed):
        self.config, self.packed = config, packed

    def stored(self, weight_name: str) -> NBitsWeight | None:
        """A canonical weight's MatMulNBits form, or None when the checkpoint stores it as floats or as nf4 (which
        MatMulNBits cannot express: the bound, dequantized weight is exported)."""
        found = self.packed(weight_name)
        return None if found is None or found[1].kind != "int" else nbits_weight(*found, name=weight_name)

    def apply(self, g: GraphBuilder, x: str, module_name: str, weight: torch.Tensor) -> str:
        """x [..., in] through the linear `module_name` of the declared tree (bound weight `weight` [out, in])."""
        return self.named(g, x, self._canonical(module_name), weight)

    def as_floats(self, module_name: str, weight: torch.Tensor) -> np.ndarray:
        """The linear `module_name`'s weight [out, in] in fp32 as `apply` multiplies by it: stored packed int, its
        codes dequantized as MatMulNBits does ((code - zero) * scale, in fp32); else the bound weight."""
        found = self.packed(self._canonical(module_name))
        if found is None or found[1].kind != "int":
            return as_numpy(weight)
        parts, scheme = found
        return decompress_weight({**parts, "weight_scale": parts["weight_scale"].float()}, scheme).numpy()

    def _canonical(self, module_name: str) -> str:
        return M.canonical_names(self.config, f"{module_name}.weight")[0][0]

    def named(self, g: GraphBuilder, x: str, canonical: str, weight: torch.Tensor) -> str:
        """x [..., in] through the checkpoint weight `canonical` (bound as `weight` [out, in])."""
        stored = self.stored(canonical)
        if stored is not None:
            return g.matmul_nbits(x, stored, canonical.removesuffix(".weight"))
        return g.matmul_dense(x, as_numpy(weight), canonical.removesuffix(".weight"))

    def module(self, g: GraphBuilder, x: str, module_name: str, module) -> str:
        return self.apply(g, x, module_name, module.weight)
