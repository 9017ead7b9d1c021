"""Fused low-precision Triton kernels for decode and prefill, each with a naive_ twin in plain fp32 PyTorch."""
from .fused_moe import PackedExperts, fused_moe, repack_moe_experts
from .int_linear import PackedLinear, concat_packed_linears, int_linear, repack_int_weight
from .kda_decode import kda_decode, kda_layer_step
from .moe_route import moe_route
from .naive_int_linear import dequantize_int_weight, naive_int_linear
from .naive_kda import naive_kda_decode, naive_kda_layer_step
from .naive_moe import naive_fused_moe
from .naive_moe_route import naive_moe_route
from .naive_rms_norm import naive_add_rms_norm
from .rms_norm import add_rms_norm

__all__ = [
    "PackedExperts", "PackedLinear", "add_rms_norm", "concat_packed_linears", "dequantize_int_weight", "fused_moe",
    "int_linear", "kda_decode", "kda_layer_step", "moe_route", "naive_add_rms_norm", "naive_fused_moe",
    "naive_int_linear", "naive_kda_decode", "naive_kda_layer_step", "naive_moe_route", "repack_int_weight",
    "repack_moe_experts",
]
