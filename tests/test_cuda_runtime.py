"""The engine on a CUDA GPU: fp32 matches the CPU reference, bf16 runs both paths and decodes consistently."""
from __future__ import annotations

import pytest
import torch

import klconvert
from testkit import rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_fp32_matches_cpu(trained_like):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ids = torch.randint(0, 1024, (2, 70))
    cpu = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=80, batch=2)
    gpu = klconvert.load(trained_like, device="cuda", dtype=torch.float32, max_context=80, batch=2)
    assert rel_error(gpu.forward(ids), cpu.forward(ids)) < 1e-4


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_cuda_bf16_decode_matches_prefill(trained_like, kernels):
    engine = klconvert.load(trained_like, device="cuda", max_context=80, kernels=kernels)
    assert engine.dtype == torch.bfloat16 and engine.triton is (kernels == "auto")
    ids = torch.randint(0, 1024, (1, 40), device="cuda")
    full = engine.forward(ids)
    engine.forward(ids[:, :32])
    steps = torch.stack([engine.decode_step(ids[:, t:t + 1], t) for t in range(32, 40)], dim=1)
    assert rel_error(steps, full[:, 32:]) < 2e-2
    out = engine.generate(ids, max_new_tokens=16)
    assert out.shape == (1, 16) and out.device.type == "cpu"   # new ids come back to the host
