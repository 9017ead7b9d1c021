"""`kernels="triton"` against `kernels="torch"` on a quantized tiny checkpoint: the same logits, prefill and decode.

On a CPU this runs Triton's interpreter (TRITON_INTERPRET=1, set in conftest); on a GPU the real kernels.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import klconvert
from calm_checkpoint import calm_copy
from klconvert.quantize import quantize
from klconvert.synth.checkpoint import synth
from klconvert.runtime.weights import DenseLinear, TritonIntLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2  # relative RMS of the logits: the kernels take bf16 activations, a bf16-sized difference


@pytest.fixture(scope="module")
def calm4(tmp_path_factory):
    """The tiny preset cut to 4 layers (KDA x3 + MLA; dense layer 0, 3 MoE), calmed: the interpreter is slow."""
    folder = tmp_path_factory.mktemp("wired")
    return calm_copy(synth("tiny", folder / "tiny4", layers=4, seed=2, progress=False).path, folder / "calm4")


@pytest.fixture(scope="module", params=[dict(bits=4, symmetric=True), dict(bits=8, symmetric=False)],
                ids=["int4-sym", "int8-asym"])
def quantized(request, calm4, tmp_path_factory):
    out = tmp_path_factory.mktemp("wired") / "q"
    quantize(calm4, out, group_size=128, device="cpu", progress=False, **request.param)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_triton_path_uses_the_kernels(quantized):
    engine = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    blocks = engine.model.blocks
    assert isinstance(engine.model.lm_head, TritonIntLinear)                     # int8 lm_head
    assert isinstance(blocks[0].mixer.q_proj, TritonIntLinear)                   # a KDA projection
    assert isinstance(blocks[0].mixer.f_a, TritonIntLinear)                      # with q/k/v (vLLM fuses them)
    assert isinstance(blocks[0].mixer.g_a, DenseLinear)                          # kept in bf16 by the policy
    assert blocks[0].mixer.fused_decode is not None
    assert len(blocks) == 4 and all(b.ffn.packed is not None for b in blocks[1:])  # every MoE block fused
    reference = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch")
    assert isinstance(reference.model.lm_head, DenseLinear) and reference.model.blocks[1].ffn.packed is None


def test_triton_and_torch_paths_agree(quantized, request):
    if "int8" in request.node.callspec.id and DEVICE == "cpu":
        pytest.skip("one scheme through the whole model is enough for the interpreter; tests/kernels covers int8")
    ref = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch")
    tri = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    ids = torch.randint(0, ref.config.vocab_size, (1, 22))
    # prefill of 20 tokens: the int GEMM (M > 16) and the grouped MoE (M > 8)
    assert rel(tri.forward(ids[:, :20]), ref.forward(ids[:, :20])) < TOLERANCE
    for t in (20, 21):                                  # decode from that state: GEMV, fused KDA step, fused MoE
        a, b = tri.decode_step(ids[:, t:t + 1].to(DEVICE), t), ref.decode_step(ids[:, t:t + 1].to(DEVICE), t)
        assert rel(a, b) < TOLERANCE, t


def test_auto_picks_torch_without_cuda(quantized):
    engine = klconvert.load(quantized, device="cpu", max_context=32)
    assert engine.triton is False
    assert not isinstance(engine.model.lm_head, TritonIntLinear)


def test_unknown_kernels_choice_is_refused(quantized):
    with pytest.raises(klconvert.KLError, match="--kernels 'cuda'"):
        klconvert.load(quantized, device="cpu", kernels="cuda")


def test_plan_sizes_what_stays_packed(quantized):
    ref = klconvert.load(quantized, device="cpu", max_context=32, kernels="torch")
    tri = klconvert.load(quantized, device="cpu", max_context=32, kernels="triton")
    assert tri.plan.weight_bytes["experts"] < ref.plan.weight_bytes["experts"] / 1.8   # packed vs dequantized
    assert tri.plan.weight_bytes["embedding"] == ref.plan.weight_bytes["embedding"]


def test_shared_expert_stored_otherwise_runs_beside_the_fused_moe(calm4, tmp_path):
    """recipes/32gb.yaml keeps the shared expert at int8 while the routed ones are int4: the fused kernel takes
    the routed stack alone and the shared expert runs through its own int8 layers."""
    recipe = Path(__file__).parents[1] / "recipes" / "32gb.yaml"
    out = quantize(calm4, tmp_path / "q", recipe=recipe, device="cpu", progress=False).path
    ref = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="torch")
    tri = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton")
    moe = tri.model.blocks[1].ffn
    assert moe.packed is not None and not moe.packed.has_shared and isinstance(moe.shared[0], TritonIntLinear)
    ids = torch.randint(0, ref.config.vocab_size, (1, 5), device=DEVICE)
    ref.forward(ids[:, :4])
    tri.forward(ids[:, :4])
    assert rel(tri.decode_step(ids[:, 4:], 4), ref.decode_step(ids[:, 4:], 4)) < TOLERANCE
