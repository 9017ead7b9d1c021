"""The engine on a CUDA GPU: fp32 matches the CPU reference, bf16 runs both paths and decodes consistently."""
from __future__ import annotations

import pytest
import torch

import klconvert
from klconvert.release import NUM_SPECIAL_TOKENS
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
    out = engine.generate(ids, max_new_tokens=16, stop_ids=frozenset())
    assert out.shape == (1, 16) and out.device.type == "cpu"   # new ids come back to the host


@pytest.mark.parametrize("default", ["meta", "cuda"])
def test_an_apps_default_device_changes_no_cuda_output(trained_like, default):
    """Under an app's torch.set_default_device a CUDA engine's generate (its pinned host buffers among what it
    makes), forward and decode_step give what they give under the default, where they give it."""
    def outputs() -> list[torch.Tensor]:
        engine = klconvert.load(trained_like, device="cuda", max_context=80)
        ids = [list(range(1, 40))]
        return [engine.generate(ids, 8, stop_ids=frozenset()), engine.forward(ids), engine.decode_step([7], 39)]

    want = outputs()
    torch.set_default_device(default)
    try:
        got = outputs()
    finally:
        torch.set_default_device(None)
    assert [t.device.type for t in got] == [t.device.type for t in want] == ["cpu", "cuda", "cuda"]
    assert torch.equal(got[0], want[0]) and rel_error(got[1], want[1]) < 1e-3 and rel_error(got[2], want[2]) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_blockwise_mla_prefill_at_real_shapes(dtype):
    """The released MLA shapes through the CUDA attention kernel chosen for the dtype (cuDNN for bf16, the
    memory-efficient one for fp32): key blocks merged by their log-sum-exp equal the whole-context form in fp32."""
    import torch.nn.functional as F

    from klconvert.config import KimiLinearConfig
    from klconvert.presets import preset_config
    from klconvert.runtime import model as M

    m = M.MLAMixer(KimiLinearConfig.from_dict(preset_config("kimi-linear-48b")), 0)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(m.H * (m.dn + m.dv), m.r, device="cuda", generator=g) / m.r ** 0.5
    start, T = 9000, 700
    q = torch.randn(1, T, m.H, m.dn + m.dr, device="cuda", generator=g)
    rows = torch.randn(1, start + T, m.r + m.dr, device="cuda", generator=g)
    m.kv_b_proj.weight = torch.nn.Parameter(w, requires_grad=False)
    k, v = M.PrefillAttention.expand(m, rows)
    mask = torch.ones(T, start + T, dtype=torch.bool, device="cuda").tril(diagonal=start)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=m.scale).transpose(1, 2)
    m.kv_b_proj.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
    got = M.PrefillAttention(4096)(m, q.to(dtype), rows.to(dtype), None, start)
    assert rel_error(got, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.slow
def test_cuda_long_prefill_then_decode_matches_the_reference_path():
    """A 131,072-token prefill then 64 decode steps on the Triton path (chunked KDA kernel or fla, blockwise MLA,
    prefill GEMMs, the graph-captured step) against the PyTorch path, both bf16, at 4 real-size layers (KDA x3,
    MLA) on pinned-router weights: the last prefill logits and every step's within 1e-2 relative."""
    from klconvert import bench as B
    from klconvert.config import KimiLinearConfig
    from klconvert.presets import preset_config
    from klconvert.runtime.engine import Engine

    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", 4))
    weights = B.random_quantized_weights(config, 4, "cuda", calm=True)
    prompt, steps = 131072, 64
    ids = torch.randint(0, config.vocab_size - NUM_SPECIAL_TOKENS, (1, prompt + steps),
                        generator=torch.Generator().manual_seed(0)).cuda()
    logits = {}
    for kernels in ("torch", "triton"):
        engine = Engine(config, weights.read, torch.device("cuda"), torch.bfloat16, prompt + steps, 1,
                        packed=weights.packed, kernels=kernels, stored_schemes=weights.schemes)
        step = engine.decoder(1)                  # captured before the prefill writes the state
        got = [engine.prefill(ids[:, :prompt])[0]]
        for t in range(prompt, prompt + steps):
            step.tokens.copy_(ids[:, t])
            step.positions.fill_(t)
            got.append(step.step()[0].clone())
        logits[kernels] = torch.stack(got).float()
        del engine, step
        torch.cuda.empty_cache()
    assert rel_error(logits["triton"], logits["torch"]) < 1e-2
