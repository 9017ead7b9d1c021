"""Kernel test helpers: the relative-error bound, NaN-poisoned outputs, and weights quantized by compressed-tensors
itself."""
import pytest
import torch

from testkit import rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a GPU")


def assert_close(got, ref, bound, what):
    err = rel_error(got, ref)
    assert err <= bound, f"{what}: relative RMS error {err:.3g} > {bound:g}"  # NaN also lands here
    return err


def poisoned(*shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def ct_compress(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> dict:
    """Quantize a Linear weight [N, K] with compressed-tensors (min/max observer math) and pack it as
    `pack-quantized`: {weight_packed, weight_scale, weight_zero_point (asymmetric), weight_shape}."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct.quantization.QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                                            group_size=group_size)
    scheme = ct.quantization.QuantizationScheme(targets=["Linear"], weights=args)
    n, k = weight.shape
    groups = weight.view(n, k // group_size, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    return PackedQuantizationCompressor.compress(state, scheme)


def ct_decompress(tensors: dict, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    args = ct.quantization.QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                                            group_size=group_size)
    scheme = ct.quantization.QuantizationScheme(targets=["Linear"], weights=args)
    return PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
