"""How many SMs a device's kernels share, which the kernels that split their work (int_linear's split-K, mla_decode's
split of the sequence) size their grids by."""
import functools

import torch

# Assumed off CUDA (the interpreter): an H200's, the GPU the kernels are tuned on, so CPU tests split work as it does
OFF_CUDA_SMS = 132


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else OFF_CUDA_SMS
