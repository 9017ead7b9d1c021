"""kda_chunk and kda_prefill_conv against their twins (odd lengths, a non-zero initial state, extreme gates); bind's
prefill modules (ours, fla's chunk_kda) against the layer's PyTorch form on a GPU; a KDA layer prefilled then
decoded against the same layer decoded token by token from the start."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, poisoned

from klconvert.config import KimiLinearConfig
from klconvert.kernels.kda_chunk import kda_chunk, kda_prefill_conv
from klconvert.kernels.naive_kda import kda_short_conv, naive_kda_chunk
from klconvert.presets import preset_config
from klconvert.runtime.kernel_modules import FlaKDAChunk, FusedKDAStep, TritonKDAChunk, kda_chunk_module
from klconvert.runtime.model import KDAMixer
from klconvert.runtime.state import StateBuffers

# relative RMS bounds vs the fp32 twin: fp32 throughout; bf16 inputs/outputs or state, rounded once
BOUND = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
GPU_BOUND = 5e-3  # real shapes on a GPU: tl.dot takes fp32 operands as tf32 (measured 2.5e-3 on an H200)
FLA_BOUND = 1e-2  # fla's chunk_kda keeps some intermediates in its inputs' dtype (measured 4.5e-3 from bf16)


def chunk_inputs(B, T, H, K, V, dtype, g_raw=None, a_log=None, device=DEVICE):
    """q, k, g (gate input), v, beta (logits) as views of one projection-like buffer (strided token rows), the
    gate parameters, and a non-zero initial state."""
    qkgv = torch.randn(B, T, 3 * H * K + H * V + H, device=device, dtype=dtype)
    q, k, g, v, beta = qkgv.split([H * K, H * K, H * K, H * V, H], dim=-1)
    if g_raw is not None:
        g.fill_(g_raw)
    A_log = torch.randn(H, device=device) if a_log is None else torch.full((H,), a_log, device=device)
    dt_bias = torch.randn(H * K, device=device) if g_raw is None else torch.zeros(H * K, device=device)
    heads = (x.unflatten(-1, (H, -1)) for x in (q, k, v, g))
    return (*heads, beta), A_log, dt_bias, torch.randn(B, H, K, V, device=device)


def check_chunk(B, T, H, K, V, dtype=torch.float32, state_dtype=torch.float32, bound=None, precision="ieee", **gate):
    """precision: the kernel's fp32 products -- exact ("ieee": what BOUND's fp32 entry holds on any device), or the
    runtime's default ("tf32" on a GPU: GPU_BOUND)."""
    (q, k, v, g, beta), A_log, dt_bias, state = chunk_inputs(B, T, H, K, V, dtype, **gate)
    state = state.to(state_dtype)
    ref_state = state.clone()
    o = kda_chunk(q, k, v, g, beta, state, A_log=A_log, dt_bias=dt_bias, out=poisoned(B, T, H, V, dtype=dtype),
                  precision=precision)
    ref = naive_kda_chunk(q, k, v, g, beta, ref_state, A_log=A_log, dt_bias=dt_bias)
    assert_close(o, ref, bound or BOUND[dtype], f"o, T={T}")
    assert_close(state, ref_state, bound or BOUND[state_dtype], f"state, T={T}")


@pytest.mark.parametrize("T", [1, 63, 64, 65])
def test_kda_chunk_odd_lengths(T):
    check_chunk(1, T, 1, 16, 32)   # K, V: tl.dot's smallest tiles, so the interpreter is quick


@pytest.mark.slow
def test_kda_chunk_long():
    check_chunk(1, 2049, 1, 16, 16)   # 33 chunks, the last of one token: the state carried through every one


@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_kda_chunk_dtypes_and_padded_head_dims(dtype, state_dtype):
    check_chunk(1, 70, 1, 20, 24, dtype, state_dtype)   # K, V padded to the next power of two inside the kernels


@pytest.mark.parametrize("g_raw, a_log", [(-30.0, 0.0), (30.0, 3.0)])  # decay ~1; decay exp(-600) per token
def test_kda_chunk_extreme_gates(g_raw, a_log):
    """A decay of exp(-600) per token: every in-chunk exponent must stay <= 0, or the products overflow."""
    check_chunk(1, 80, 1, 16, 16, g_raw=g_raw, a_log=a_log)


@pytest.mark.parametrize("T, out_dtype", [(1, torch.float32), (2, torch.float32), (70, torch.float32),
                                          (70, torch.bfloat16)])
def test_kda_prefill_conv(T, out_dtype):
    B, C, W = 2, 40, 4
    x = torch.randn(B, T, C + 8, device=DEVICE).to(torch.bfloat16)[..., 4:C + 4]  # strided rows, as a projection's
    tail = torch.randn(B, C, W - 1, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(C, 1, W, device=DEVICE)
    ref_tail = tail.clone()
    y = kda_prefill_conv(x, tail, weight, out_dtype=out_dtype, block_t=16, block_c=32)
    assert y.dtype == out_dtype
    assert_close(y, kda_short_conv(x, ref_tail, weight), 1e-6 if out_dtype == torch.float32 else BOUND[out_dtype], "y")
    assert torch.equal(tail, ref_tail), "tail"


@GPU
@pytest.mark.parametrize("T", [4100])
def test_kda_chunk_real_shapes(T):
    check_chunk(1, T, 32, 128, 128, bound=GPU_BOUND, precision="tf32")


def random_layer(H=2, K=16, device=DEVICE):
    """A KDA layer of H heads of K, random weights of sensible scale, with bind's Triton decode and prefill."""
    config = preset_config("tiny", 1)
    config["linear_attn_config"].update(num_heads=H, head_dim=K)
    m = KDAMixer(KimiLinearConfig.from_dict(config), 0).to_empty(device=device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.o_norm.weight.fill_(1.0)
    m.chunk = TritonKDAChunk(m)
    m.step = FusedKDAStep(m, m.chunk)
    return m


def test_fla_on_cuda_when_installed_else_ours():
    try:
        import fla.ops.kda  # noqa: F401
        fla = DEVICE == "cuda"
    except ImportError:
        fla = False
    assert type(kda_chunk_module(random_layer())) is (FlaKDAChunk if fla else TritonKDAChunk)


@pytest.mark.slow
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_decode_only(state_dtype):
    """The state the chunked prefill leaves (and the conv tail) is the one the decode kernel reads: a layer
    prefilled over 65 tokens and then decoded equals the same layer decoded token by token from the start."""
    m = random_layer()
    B, P, steps, W = 2, 65, 3, m.q_conv1d.weight.shape[-1]
    x = torch.randn(B, P + steps, m.o_proj.weight.shape[0], device=DEVICE)

    def buffers():
        return StateBuffers(kda_state=torch.zeros(1, B, m.H, m.K, m.K, device=DEVICE, dtype=state_dtype),
                            conv_state=torch.zeros(1, B, 3 * m.H * m.K, W - 1, device=DEVICE),
                            mla_cache=torch.zeros(0, B, 1, 1, device=DEVICE))

    def at(t):
        return torch.full((B,), t, device=DEVICE)

    with torch.inference_mode():
        prefilled, alone = buffers(), buffers()
        out = [m(x[:, :P], prefilled, 0)] + [m.decode(x[:, t], prefilled, at(t)).unsqueeze(1)
                                             for t in range(P, P + steps)]
        ref = [m.decode(x[:, t], alone, at(t)).unsqueeze(1) for t in range(P + steps)]
    # bf16: decode rounds the state every token, the prefill once; a GPU takes the prefill's fp32 products as tf32
    bound = max(BOUND[state_dtype] * 4, GPU_BOUND if DEVICE == "cuda" else 0)
    assert_close(out[0], torch.cat(ref[:P], dim=1), bound, "prefill output")
    assert_close(torch.cat(out[1:], 1), torch.cat(ref[P:], 1), bound, "decode after prefill")
    assert_close(prefilled.kda_state, alone.kda_state, bound, "state")
    assert torch.equal(prefilled.conv_state, alone.conv_state), "conv tail"


@GPU
@pytest.mark.parametrize("module", [TritonKDAChunk, FlaKDAChunk])
def test_prefill_modules_at_real_shapes(module):
    """bind's prefill modules (ours; fla's chunk_kda with l2norm, gate and sigmoid(beta) in its kernels) against the
    PyTorch layer's own chunked form, at the released head shapes over 4100 tokens from a non-zero state."""
    if module is FlaKDAChunk:
        pytest.importorskip("fla.ops.kda")
    m = random_layer(H=32, K=128)
    B, T, C = 1, 4100, 3 * 32 * 128
    qkv, g_raw = torch.randn(B, T, C, device=DEVICE, dtype=torch.bfloat16), torch.randn(B, T, C // 3, device=DEVICE)
    beta_raw = torch.randn(B, T, 32, device=DEVICE)
    tail, S = torch.randn(B, C, 3, device=DEVICE).to(torch.bfloat16), torch.randn(B, 32, 128, 128, device=DEVICE)
    ref_tail, ref_S = tail.clone(), S.clone()
    o = module(m)(m, qkv, g_raw, beta_raw, tail, S)
    ref = m.recurrent(qkv, g_raw, beta_raw, ref_tail, ref_S)
    bound = FLA_BOUND if module is FlaKDAChunk else GPU_BOUND
    assert_close(o, ref, bound, "o")
    assert_close(S, ref_S, bound, "state")
    assert torch.equal(tail, ref_tail), "conv tail"
