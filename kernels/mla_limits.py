"""What the Triton MLA latent kernels (mla_decode, mla_cache) take, importing no Triton: the runtime picks them, or
refuses a cache they cannot read, before a kernel compiles or a weight is read."""
import torch

E4M3_CAPABILITY = (8, 9)  # Triton converts float8e4nv (an e4m3 cache's values) on Ada, Hopper and newer


def latent_dims_taken(latent: int, rope: int) -> bool:
    """Whether mla_decode takes a latent of `latent` values and a shared key of `rope`: each a power of two >= 16
    (the tensor-core tile); mla_cache's row write takes any power of two, so these too."""
    return all(n >= 16 and not n & (n - 1) for n in (latent, rope))


def e4m3_capable(device: torch.device) -> bool:
    """Whether the kernels can read and write an e4m3 cache on this CUDA device."""
    return torch.cuda.get_device_capability(device) >= E4M3_CAPABILITY
