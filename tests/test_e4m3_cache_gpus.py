"""Where the Triton latent kernels read the MLA cache, and the GPUs an e4m3 cache runs on: a float8_e4m3fn cache on a
GPU without e4m3 (compute capability under 8.9: Ampere's A100, A10, A6000 -- the 48 GB recipe's tier) is refused in
one line before a weight is read, by load and by bench, where the kernel raised a plain ValueError mid-run; a config
whose latent sizes the kernels do not take is attended by PyTorch, not refused by the kernel (helper h182)."""
import pytest
import torch

import klconvert
import klconvert.bench as B
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.kernels.mla_limits import latent_dims_taken
from klconvert.presets import preset_config
from klconvert.runtime.bind import latent_kernel_reads
from klconvert.runtime.engine import check_e4m3_cache_readable

REFUSED = (r"^mla_cache_dtype='float8_e4m3fn' \(--mla-cache-dtype\): the Triton kernels read an e4m3 cache on compute "
           r"capability 8\.9 or newer, and NVIDIA A10 \(cuda(:0)?\) has 8\.6; use a bfloat16 cache$")
RELEASE = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
CUDA = torch.device("cuda")


@pytest.fixture
def ampere(monkeypatch):
    """torch sees one compute capability 8.6 GPU (nothing runs on it: every path here refuses first)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")


def test_load_refuses_an_e4m3_cache_on_ampere_before_the_weights(ampere, tiny_released):
    with pytest.raises(KLError, match=REFUSED):
        klconvert.load(tiny_released, device="cuda", mla_cache_dtype="float8_e4m3fn")


def test_bench_refuses_it_before_its_checks(ampere):
    with pytest.raises(KLError, match=REFUSED):
        B.bench(RELEASE, None, bits=4, contexts=[4096], batches=[1], mla_cache_dtype="float8_e4m3fn")


@pytest.mark.parametrize("capability, cache, triton, dtype", [
    ((9, 0), torch.float8_e4m3fn, True, torch.bfloat16),     # Hopper reads it
    ((8, 9), torch.float8_e4m3fn, True, torch.bfloat16),     # so does Ada
    ((8, 6), torch.bfloat16, True, torch.bfloat16),          # a bf16 cache runs anywhere
    ((8, 6), torch.float8_e4m3fn, False, torch.bfloat16),    # PyTorch's attention reads e4m3 on any GPU
    ((8, 6), torch.float8_e4m3fn, True, torch.float32),      # fp32 compute: PyTorch's attention, not the kernels
], ids=["hopper", "ada", "bf16-cache", "torch-kernels", "fp32-compute"])
def test_what_runs_is_let_through(monkeypatch, capability, cache, triton, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    check_e4m3_cache_readable(RELEASE, CUDA, dtype, triton, cache)


def test_the_latent_kernels_read_only_the_sizes_they_take():
    assert latent_dims_taken(512, 64) and latent_dims_taken(16, 16)
    assert not latent_dims_taken(96, 64) and not latent_dims_taken(512, 0) and not latent_dims_taken(8, 64)
    assert latent_kernel_reads(RELEASE, torch.bfloat16) and not latent_kernel_reads(RELEASE, torch.float32)
    odd = KimiLinearConfig.from_dict({**preset_config("kimi-linear-48b"), "kv_lora_rank": 96})
    assert not latent_kernel_reads(odd, torch.bfloat16)    # PyTorch's attention, where the kernel raised
