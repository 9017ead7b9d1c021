"""`kernels="triton"` against `kernels="torch"` on a quantized tiny checkpoint: the same logits, prefill and decode.

On a CPU this runs Triton's interpreter (TRITON_INTERPRET=1, set in conftest); on a GPU the real kernels.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import klconvert
from calm_checkpoint import calm_copy
from klconvert.quant.group_rules import CHANNEL
from klconvert.quantize import quantize
from klconvert.synth.checkpoint import synth
from klconvert.kernels.int_linear import MMA_BLOCK_M, repack_int_weight, sum_parked
from klconvert.runtime import kernel_modules
from klconvert.runtime.kernel_modules import (FlaKDAChunk, FusedDenseMLP, FusedExperts, FusedKDAStep, FusedNormMoE,
                                              FusedRouter, PackedDenseLinear, PackedIntLinear, SharedInStack,
                                              TritonKDAChunk)
from klconvert.runtime.model import Experts, KDAMixer, Linear, StackedLinear
from testkit import module_bytes, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2  # relative RMS of the logits: the kernels take bf16 activations, a bf16-sized difference


def calm_tiny(tmp_path_factory, layers: int) -> Path:
    """The tiny preset cut to `layers` layers, calmed: the interpreter is slow."""
    folder = tmp_path_factory.mktemp("wired")
    return calm_copy(synth("tiny", folder / "tiny", layers=layers, seed=2, progress=False).path, folder / "calm")


@pytest.fixture(scope="module")
def calm4(tmp_path_factory):
    """4 layers: KDA x3 + MLA; dense layer 0, 3 MoE."""
    return calm_tiny(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def calm2(tmp_path_factory):
    """2 layers: KDA with the dense MLP, MLA with the MoE -- for a test of one MoE layer's wiring, or of the latent
    attention, which need not run calm4's three KDA layers and three MoE layers through the interpreter."""
    return calm_tiny(tmp_path_factory, 2)


SCHEMES = dict(params=[dict(bits=4, symmetric=True), dict(bits=8, symmetric=False)], ids=["int4-sym", "int8-asym"])


def quantized_copy(calm: Path, request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wired") / "q"
    quantize(calm, out, group_size=128, device="cpu", progress=False, **request.param)
    return out


@pytest.fixture(scope="module", **SCHEMES)
def quantized(request, calm4, tmp_path_factory):
    return quantized_copy(calm4, request, tmp_path_factory)


@pytest.fixture(scope="module", **SCHEMES)
def quantized2(request, calm2, tmp_path_factory):
    """calm2 quantized as `quantized` is: one MoE layer, one MLA layer."""
    return quantized_copy(calm2, request, tmp_path_factory)


def test_triton_path_uses_the_kernels(quantized):
    engine = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    blocks = engine.model.blocks
    attn = blocks[0].self_attn
    assert isinstance(engine.model.lm_head, PackedIntLinear)                     # int8 lm_head
    qkv = attn.in_proj.parts[0]                                                  # q, k, v (and what shares their
    assert isinstance(qkv, PackedIntLinear) and qkv.packed.n >= 3 * 128          # scheme, in whole row blocks)
    assert attn.in_proj.order[:3] == ["q_proj", "k_proj", "v_proj"]              # as one kernel
    rows = sum(p.packed.n if isinstance(p, PackedIntLinear) else p.weight.shape[0] for p in attn.in_proj.parts)
    assert rows == sum(attn.in_proj.sizes.values())
    assert isinstance(attn.step, FusedKDAStep) and isinstance(attn.chunk, (TritonKDAChunk, FlaKDAChunk))
    assert len(blocks) == 4 and all(isinstance(b.ffn.experts, FusedExperts) for b in blocks[1:])  # every MoE fused
    assert isinstance(blocks[0].ffn, FusedDenseMLP) == (qkv.packed.bits == 4)    # layer 0's int4 MLP as chunk experts
    assert all(isinstance(b.ffn.shared_experts, SharedInStack) for b in blocks[1:])                # shared stacked in
    assert all(type(b.ffn) is FusedNormMoE and type(b.ffn.gate) is FusedRouter for b in blocks[1:])  # norm in router
    assert not any(p.is_meta for p in engine.model.parameters())
    reference = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch")
    assert isinstance(reference.model.lm_head, Linear) and isinstance(reference.model.blocks[1].ffn.experts, Experts)


@pytest.mark.slow
def test_triton_and_torch_paths_agree(quantized, request):
    if "int8" in request.node.callspec.id and DEVICE == "cpu":
        pytest.skip("one scheme through the whole model is enough for the interpreter; tests/kernels covers int8")
    ref = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch")
    tri = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    ids = torch.randint(0, ref.config.vocab_size, (1, 22))
    # prefill of 20 tokens: the int GEMM (M > 16) and the grouped MoE (M > 8)
    assert rel_error(tri.forward(ids[:, :20]), ref.forward(ids[:, :20])) < TOLERANCE
    for t in (20, 21):                                  # decode from that state: GEMV, fused KDA step, fused MoE
        a, b = tri.decode_step(ids[:, t:t + 1].to(DEVICE), t), ref.decode_step(ids[:, t:t + 1].to(DEVICE), t)
        assert rel_error(a, b) < TOLERANCE, t


@pytest.mark.slow
def test_biased_router_weights_agree_on_both_paths(quantized2, request):
    """biased_router_weights=True (the remote code's weights: the biased scores) reaches the Triton routers -- the
    one-launch router and its add+norm form in decode, the cuBLAS GEMV + route launch in a 20-token prefill -- and
    they give what the PyTorch path gives; both differ from the unbiased output (the calm bias of 10 makes the
    biased weights near 1/k each)."""
    if "int8" in request.node.callspec.id and DEVICE == "cpu":
        pytest.skip("one scheme through the whole model is enough for the interpreter")
    ref = klconvert.load(quantized2, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch",
                         biased_router_weights=True)
    tri = klconvert.load(quantized2, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton",
                         biased_router_weights=True)
    unbiased = klconvert.load(quantized2, device=DEVICE, dtype=DTYPE, max_context=64, kernels="torch")
    routers = [b.ffn.gate for b in tri.model.blocks[1:]]
    assert all(type(r) is FusedRouter and r.biased for r in routers)
    assert routers[0].FUSED_ROUTER_TOKENS < 20                                   # the prefill takes the other form
    x = torch.randn(4, ref.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(DEVICE, DTYPE)
    for fused, plain in zip(routers, (b.ffn.gate for b in ref.model.blocks[1:])):   # the one-launch router alone
        (got_ids, got_w), (want_ids, want_w) = fused(x), plain(x)
        dense = [torch.zeros(4, ref.config.num_experts, device=DEVICE).scatter(1, i.long(), w.float())
                 for i, w in ((got_ids, got_w), (want_ids, want_w))]
        torch.testing.assert_close(*dense, rtol=1e-3, atol=1e-4)
    ids = torch.randint(0, ref.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(3))
    want = ref.forward(ids[:, :20])
    assert rel_error(tri.forward(ids[:, :20]), want) < TOLERANCE
    assert rel_error(unbiased.forward(ids[:, :20]), want) > 2 * TOLERANCE       # the option changes the output
    a, b = tri.decode_step(ids[:, 20:].to(DEVICE), 20), ref.decode_step(ids[:, 20:].to(DEVICE), 20)
    assert rel_error(a, b) < TOLERANCE
    assert rel_error(unbiased.decode_step(ids[:, 20:].to(DEVICE), 20), b) > 2 * TOLERANCE


@pytest.fixture
def packed_and_dense():
    """A projection group as bind stacks it: 48 int4 rows, then 40 dense bf16 rows."""
    n, k = 48, 256
    words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=DEVICE)
    packed = repack_int_weight(words, torch.rand(n, k // 128, device=DEVICE).to(torch.bfloat16) * 0.01, None,
                               (n, k), 4, 128)
    dense = Linear(0, 0)
    dense.weight = torch.nn.Parameter(torch.randn(40, k, device=DEVICE, dtype=torch.bfloat16) * 0.05,
                                      requires_grad=False)
    return StackedLinear([PackedIntLinear(packed), dense], ["q_proj", "kv_a_proj_with_mqa"],
                         {"q_proj": n, "kv_a_proj_with_mqa": 40})


def test_a_packed_and_a_dense_part_run_in_one_launch(packed_and_dense, monkeypatch):
    """KDA's projection group on the 48B is [int4 rows | bf16 g_a rows]: at decode sizes PackedDenseLinear
    computes both in int_mma_fwd's one launch (int_linear and torch's linear are not called), past one row block
    through the two kernels and a cat; either way what the StackedLinear gives."""
    group = packed_and_dense
    assert PackedDenseLinear.takes(group)
    fused = PackedDenseLinear(group)
    calls = []
    monkeypatch.setattr(kernel_modules, "int_linear", lambda *a, f=kernel_modules.int_linear, **kw: calls.append(1)
                        or f(*a, **kw))
    k = group.parts[1].weight.shape[1]
    for shape in ((1, k), (2, 1, k), (MMA_BLOCK_M + 3, k)):
        x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
        assert rel_error(fused(x), group(x)) < 1e-2, shape
    assert len(calls) == 1 + 3  # the StackedLinear each time; PackedDenseLinear past one row block only


def test_the_bench_floor_counts_both_parts(packed_and_dense):
    """klconvert bench's bytes per step count a PackedDenseLinear's packed and dense weights, as the group's."""
    assert module_bytes(PackedDenseLinear(packed_and_dense)) == sum(module_bytes(p) for p in packed_and_dense.parts)


def test_per_channel_weights_bind_as_kernels_of_one_group_a_row(calm4, tmp_path):
    """A per-channel folder (compressed-tensors' strategy channel, the scheme's group_size CHANNEL) stays packed on the
    Triton path, each weight's one group spanning its row: its linear layers and its fused experts alike."""
    out = quantize(calm4, tmp_path / "q", bits=8, group_size=CHANNEL, device="cpu", progress=False).path
    engine = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton")
    head, experts = engine.model.lm_head, engine.model.blocks[1].ffn.experts
    assert isinstance(head, PackedIntLinear) and head.packed.group_size == head.packed.k == engine.config.hidden_size
    assert isinstance(experts, FusedExperts)


def test_auto_picks_torch_without_cuda(quantized):
    engine = klconvert.load(quantized, device="cpu", max_context=32)
    assert engine.triton is False
    assert not isinstance(engine.model.lm_head, PackedIntLinear)


def test_unknown_kernels_choice_is_refused(quantized):
    with pytest.raises(klconvert.KLError, match=r"^kernels='cuda' \(--kernels\): choose one of"):
        klconvert.load(quantized, device="cpu", kernels="cuda")


def test_plan_sizes_what_stays_packed(quantized):
    ref = klconvert.load(quantized, device=DEVICE, max_context=32, kernels="torch")
    tri = klconvert.load(quantized, device=DEVICE, max_context=32, kernels="triton")   # Triton runs on CUDA only
    assert tri.plan.weight_bytes["experts"] < ref.plan.weight_bytes["experts"] / 1.8   # packed vs dequantized
    assert tri.plan.weight_bytes["embedding"] == ref.plan.weight_bytes["embedding"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_triton_bind_holds_each_weight_once(quantized, dtype):
    """A shared expert stacked into its layer's FusedExperts is held there alone. bind walked the modules it had
    listed before stacking, so each of the stacked shared expert's projections, met later, got a packed copy of its
    own hung on the SharedInStack, never called: on tiny q4 354,816 bytes, at the 48B's int4 90.5 MiB of the GPU
    outside the plan (h267). The weights held, each storage once, are the plan's, symmetric or not: the plan sizes a
    packed weight as the repack holds it, its rows padded and zero points as wide as the scales (it sized them as
    stored: int8 asymmetric here 27,212 bytes under, h270). In fp32 too: the repack keeps the scales as stored
    (bf16), which the plan reads from the headers (it sized them in the compute dtype: int8 92,544 bytes over)."""
    from klconvert.bench import module_weights

    engine = klconvert.load(quantized, device=DEVICE, dtype=dtype, max_context=16, kernels="triton")
    stand_ins = [m for m in engine.model.modules() if isinstance(m, SharedInStack)]
    assert len(stand_ins) == 3 and not any(list(m.children()) for m in stand_ins)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in engine.model.modules()
                for t in module_weights(m)}   # parameters and packed weights
    assert sum(storages.values()) == engine.plan.weights


def test_the_kda_chunk_and_its_mixer_hold_the_conv_weights_once(calm4):
    """TritonKDAChunk's [3HK, W] conv taps were a torch.cat of the mixer's three conv weights, held beside them (tiny:
    18,432 bytes, h270); the mixer's are now views of the chunk's, the same values."""
    engine = klconvert.load(calm4, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton")
    mixers = [m for m in engine.model.modules() if isinstance(m, KDAMixer)]
    assert mixers
    for m in mixers:
        convs = (m.q_conv1d.weight, m.k_conv1d.weight, m.v_conv1d.weight)
        assert {w.untyped_storage().data_ptr() for w in convs} == {m.chunk.conv.untyped_storage().data_ptr()}
        assert torch.equal(m.chunk.conv, torch.cat(convs).flatten(1))


@pytest.mark.slow
def test_shared_expert_stored_otherwise_runs_beside_the_fused_moe(calm2, tmp_path):
    """recipes/32gb.yaml keeps the shared expert at int8 while the routed ones are int4: the fused kernel takes
    the routed stack alone and the shared expert runs through its own int8 layers."""
    recipe = Path(__file__).parents[1] / "recipes" / "32gb.yaml"
    out = quantize(calm2, tmp_path / "q", recipe=recipe, device="cpu", progress=False).path
    ref = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="torch")
    tri = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton")
    moe = tri.model.blocks[1].ffn
    assert isinstance(moe.experts, FusedExperts) and not moe.experts.packed.has_shared
    assert isinstance(moe.shared_experts.gate_proj, PackedIntLinear)
    ids = torch.randint(0, ref.config.vocab_size, (1, 3), device=DEVICE)
    ref.forward(ids[:, :2])
    tri.forward(ids[:, :2])
    assert rel_error(tri.decode_step(ids[:, 2:], 2), ref.decode_step(ids[:, 2:], 2)) < TOLERANCE


def recipe_beside_int4(tmp_path, target: str, weights: str) -> Path:
    """A recipe of every linear layer at int4 by groups of 128, symmetric, but `target`'s at `weights`."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: ["re:.*\\\\.(block_sparse_moe|mlp)\\\\.gate$", "re:.*\\\\.(f_b|g_a|g_b)_proj$", "re:.*conv1d$"]
      config_groups:
        int4:
          targets: ["Linear"]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}}
        beside:
          targets: ["{target}"]
          weights: {{{weights}, type: int, strategy: group, group_size: 128}}
""")
    return path


def test_a_shared_expert_stored_partly_otherwise_runs_beside_the_fused_moe(calm4, tmp_path):
    """The fused kernel carries the shared expert only where all three of its projections are stored as the routed
    experts are: with its down_proj at int8 beside int4 gate and up, it runs through its own layers."""
    recipe = recipe_beside_int4(tmp_path, r"re:.*\\.shared_\\w+\\.down_proj$", "num_bits: 8, symmetric: true")
    out = quantize(calm4, tmp_path / "q", recipe=recipe, device="cpu", progress=False).path
    moe = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton").model.blocks[1].ffn
    assert isinstance(moe.experts, FusedExperts) and not moe.experts.packed.has_shared
    assert moe.shared_experts.down_proj.packed.bits == 8 and moe.shared_experts.up_proj.packed.bits == 4


def test_projections_with_and_without_zero_points_stack_apart(calm4, tmp_path):
    """q_proj asymmetric beside symmetric k and v (a split vLLM would refuse, made with allow_split_fused): the
    stacked input projection keeps q_proj's codes, the only ones with zero points, in a kernel of their own."""
    recipe = recipe_beside_int4(tmp_path, r"re:.*\\.self_attn\\.q_proj$", "num_bits: 4, symmetric: false")
    out = quantize(calm4, tmp_path / "q", recipe=recipe, device="cpu", progress=False, allow_split_fused=True).path
    engine = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton")
    in_proj = engine.model.blocks[0].self_attn.in_proj
    with_zeros = [p.packed.n for p in in_proj.parts if isinstance(p, PackedIntLinear) and p.packed.zeros is not None]
    assert with_zeros == [in_proj.sizes["q_proj"]]


@pytest.mark.slow
def test_decode_through_the_latent_attention_kernel(quantized2, request):
    """bf16 binds the Triton latent attention (it reads bf16 or e4m3 caches); its decode steps match the PyTorch
    path's, one sequence alone and then a batch of two at different positions (each row against its own)."""
    if "int8" in request.node.callspec.id and DEVICE == "cpu":
        pytest.skip("one scheme is enough for the interpreter")
    from klconvert.runtime.kernel_modules import TritonLatentAttention, TritonPrefillAttention

    ref = klconvert.load(quantized2, device=DEVICE, dtype=torch.bfloat16, max_context=32, batch=2, kernels="torch")
    tri = klconvert.load(quantized2, device=DEVICE, dtype=torch.bfloat16, max_context=32, batch=2, kernels="triton")
    assert isinstance(tri.model.blocks[1].self_attn.attend, TritonLatentAttention)
    assert isinstance(tri.model.blocks[1].self_attn.prefill_attention, TritonPrefillAttention)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3, 6], [8, 4, 11, 12, 13, 14, 15]], device=DEVICE)
    for engine in (ref, tri):
        engine.forward(ids[:, :6])                                   # both sequences hold positions 0..5
    alone = [engine.decode_step(ids[:1, 6], 6) for engine in (tri, ref)]    # the first moves on to position 7
    assert rel_error(*alone) < 3e-2
    tokens, positions = torch.tensor([9, 15], device=DEVICE), torch.tensor([7, 6], device=DEVICE)
    got, want = (engine.decode_step(tokens, positions) for engine in (tri, ref))
    assert got.shape == want.shape == (2, ref.config.vocab_size)
    for row in range(2):
        assert rel_error(got[row], want[row]) < 3e-2, row


def test_each_moe_prefetches_the_next_blocks_input_projection(quantized):
    """bind hands each fused MoE the next block's input projection codes (KDA's q, k, v group, MLA's q and kv_a),
    which its down launch pulls into L2 on a GPU with PDL; the last block has none to fetch."""
    engine = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    blocks = engine.model.blocks
    for block, following in zip(blocks[1:], blocks[2:]):  # KDA, KDA -> MLA (layer 3)
        proj = following.self_attn.in_proj
        codes = (proj.packed if hasattr(proj, "packed") else proj.parts[0].packed).qweight
        assert block.ffn.experts.after is codes
    assert blocks[-1].ffn.experts.after is None


def test_the_moe_folds_its_norm_into_the_router_unless_the_router_is_watched(quantized, monkeypatch):
    engine = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    block = engine.model.blocks[1]
    folded = []
    launch = kernel_modules.moe_add_norm_router
    monkeypatch.setattr(kernel_modules, "moe_add_norm_router", lambda *a, **k: folded.append(1) or launch(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, branch = (torch.randn(2, engine.config.hidden_size, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    fused = block.ffn.decode(block.post_attention_layernorm, x, branch)
    seen = []
    hook = block.ffn.gate.register_forward_hook(lambda m, a, r: seen.append(r[0]))
    watched = block.ffn.decode(block.post_attention_layernorm, x, branch)  # the router called, for its hook
    hook.remove()
    assert folded == [1] and len(seen) == 1
    assert torch.equal(fused[0], watched[0])                                 # the residual stream, x + branch
    assert rel_error(fused[1], watched[1]) < TOLERANCE


def test_an_moe_blocks_o_proj_leaves_its_sum_to_the_router(quantized):
    """bind parks the packed o_proj of each MoE block, not the dense block's. A parked projection at decode (in
    16 bits, up to PARK_MAX_TOKENS tokens, where its launch splits k: the tiny model's o_proj is one k-tile, so a
    4-tile one here) returns its split-K partials unsummed; the MoE block then gives what it gives their sum, bit
    for bit, adding them up in the router's launch -- or, with the router watched, summing them as the projection
    would have."""
    engine = klconvert.load(quantized, device=DEVICE, dtype=torch.bfloat16, max_context=64, kernels="triton")
    blocks = engine.model.blocks
    assert [b.self_attn.o_proj.park for b in blocks] == [False] + [True] * (len(blocks) - 1)
    D = engine.config.hidden_size
    words = torch.randint(-2**31, 2**31 - 1, (D, 512 // 8), dtype=torch.int32, device=DEVICE)
    proj = PackedIntLinear(repack_int_weight(words, torch.rand(D, 4, device=DEVICE).to(torch.bfloat16) * 0.001, None,
                                             (D, 512), 4, 128))
    o = torch.randn(2, 512, device=DEVICE, dtype=torch.bfloat16)
    summed = proj(o)
    proj.park = True
    assert torch.equal(proj(o), summed) and proj(o[None]).shape == (1, 2, D)   # past PARK_MAX_TOKENS, or prefill
    proj.PARK_MAX_TOKENS = 2
    parked = proj(o)
    assert parked.dtype == torch.float32 and parked.shape[1:] == (2, D) and parked.shape[0] > 1
    assert torch.equal(sum_parked(parked, o.dtype), summed)
    block = blocks[1]
    x = torch.randn(2, D, device=DEVICE, dtype=torch.bfloat16)
    together = block.ffn.decode(block.post_attention_layernorm, x, parked)
    apart = block.ffn.decode(block.post_attention_layernorm, x, summed)
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    hook = block.ffn.gate.register_forward_hook(lambda m, a, r: None)          # watched: the reference decode
    watched = block.ffn.decode(block.post_attention_layernorm, x, parked)
    hook.remove()
    assert torch.equal(watched[0], together[0]) and rel_error(watched[1], together[1]) < TOLERANCE


def test_the_dense_mlp_runs_as_its_chunk_experts(quantized):
    """Layer 0's packed MLP (256 rows, the tiny MoE's 128-wide experts: two chunks) through the fused MoE's decode
    launches up to DECODE_MAX_TOKENS tokens and the chunks' projections past that, against the reference MLP on the
    same codes; klconvert bench counts its bytes as the three projections'. bind takes int4 MLPs only (the case
    measured); an int8 one, built here by hand, runs the same way."""
    tri = klconvert.load(quantized, device=DEVICE, dtype=torch.bfloat16, max_context=64, kernels="triton")
    ref = klconvert.load(quantized, device=DEVICE, dtype=torch.bfloat16, max_context=64, kernels="torch")
    c, bound, mlp = tri.config, tri.model.blocks[0].ffn, ref.model.blocks[0].ffn
    if isinstance(bound, FusedDenseMLP):
        fused = bound
        assert fused.after is not None                                          # prefetches layer 1's projection
    else:
        assert bound.gate_proj.packed.bits == 8 and FusedDenseMLP.chunk(bound, c) is None
        fused = FusedDenseMLP(bound, c.moe_intermediate_size)
    assert fused.packed.num_experts + 1 == 2
    for tokens in (1, 5, 20):
        x = torch.randn(tokens, c.hidden_size, device=DEVICE, dtype=torch.bfloat16)
        assert rel_error(fused(x), mlp(x)) < TOLERANCE, tokens
    bits = fused.packed.gate.bits
    per_group = 2 * (1 + (fused.packed.gate.zeros is not None))                 # a bf16 scale (and zero point)
    weights = 3 * c.intermediate_size * c.hidden_size
    assert module_bytes(fused) == weights * bits // 8 + weights // 128 * per_group


def test_a_packed_lm_head_writes_the_logits_in_fp32(quantized):
    """bind has the packed lm_head write fp32, the dtype the model returns logits in, so the model's widening is no
    copy: the same kernel's sums, unrounded (rounded to bf16, they are its bf16 output bit for bit)."""
    engine = klconvert.load(quantized, device=DEVICE, dtype=torch.bfloat16, max_context=64, kernels="triton")
    head = engine.model.lm_head
    assert head.out_dtype == torch.float32
    x = torch.randn(3, engine.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    logits = head(x)
    head.out_dtype = None
    rounded = head(x)
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(logits.to(torch.bfloat16), rounded)
    head.out_dtype = torch.float32
    ids = torch.randint(0, engine.config.vocab_size, (1, 3))
    step = engine.decode_step(ids[:, :1].to(DEVICE), 0)
    assert step.dtype == torch.float32 and step.shape[-1] == engine.config.vocab_size


def test_the_fused_router_hands_the_experts_h_k_tile_sums(quantized, monkeypatch):
    """The fused router's launch writes h's sums over each 128-input k-tile into the experts' buffer (on CUDA, for
    int4 experts at token counts whose launch takes them -- 1, not 2: their gate+up launch then skips a subtraction,
    fused_moe's x_sums), which reach fused_moe with h."""
    engine = klconvert.load(quantized, device=DEVICE, dtype=DTYPE, max_context=64, kernels="triton")
    block = engine.model.blocks[1]
    D = engine.config.hidden_size
    x, branch = (torch.randn(2, D, device=DEVICE).to(DTYPE) for _ in range(2))
    real = block.ffn.experts.sums_buffer(x[:1])
    assert (real is None) == (DEVICE != "cuda" or block.ffn.experts.packed.gate.bits != 4)
    assert real is None or (real.shape == (1, D // 128) and real.dtype == torch.float32)
    assert block.ffn.experts.sums_buffer(x) is None                          # 2 tokens: their launch does not
    monkeypatch.setattr(FusedExperts, "sums_buffer", lambda self, x: torch.full((x.shape[0], D // 128), float("nan"),
                                                                               device=x.device))
    seen = []
    launch = kernel_modules.fused_moe
    monkeypatch.setattr(kernel_modules, "fused_moe",
                        lambda h, *a, **k: seen.append((h, k["x_sums"])) or launch(h, *a, **k))
    block.ffn.decode(block.post_attention_layernorm, x, branch)
    (h, sums), = seen
    assert torch.allclose(sums, h.float().view(2, -1, 128).sum(-1), rtol=1e-5, atol=1e-5)


def test_declaring_the_model_loads_no_compiler(tiny_released):
    """nn.Embedding's own init, even on meta, imported torch._dynamo, sympy and Triton (~1 s, ~265 MB of address
    space) at every load; the model declares its embedding's weight without it."""
    import subprocess
    import sys

    check = ("import sys, klconvert\n"
             f"klconvert.load({str(tiny_released)!r}, device='cpu', max_context=64, kernels='torch')\n"
             "assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_kda_layer_with_one_gate_projection_packed_keeps_the_pytorch_step(tmp_path):
    """The fused KDA step takes f_b_proj and g_b_proj as dense weights: with f_b_proj packed (the bundled model's KDA
    head_dim 128 is what the int kernels take; the tiny preset's 32 is not) and g_b_proj dense, the layer keeps the
    PyTorch step, which calls each projection as it is bound (mutation testing of bind: fusing when either is dense
    passed every test)."""
    from klconvert.models import bundled_dir

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""\
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: ["re:.*\\\\.(block_sparse_moe|mlp)\\\\.gate$", "re:.*\\\\.(g_a|g_b)_proj$", "re:.*conv1d$"]
      config_groups:
        int4:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
""")
    out = quantize(bundled_dir(), tmp_path / "q", recipe=recipe, device="cpu", progress=False,
                   allow_split_fused=True).path
    attn = klconvert.load(out, device=DEVICE, dtype=DTYPE, max_context=16, kernels="triton").model.blocks[1].self_attn
    assert isinstance(attn.f_b_proj, PackedIntLinear) and isinstance(attn.g_b_proj, Linear)
    assert not isinstance(attn.step, FusedKDAStep)
