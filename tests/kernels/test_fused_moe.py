"""fused_moe (decode GEMV pair and grouped prefill GEMM) against its per-token, per-expert fp32 twin."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, ct_compress, poisoned

from klconvert.kernels.fused_moe import align_pairs, fused_moe, moe_decode_fwd, moe_grouped_fwd, repack_moe_experts
from klconvert.kernels.naive_moe import naive_fused_moe

BOUND = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # relative RMS vs the fp32 twin, by output dtype
GROUPED_BOUND = 1.5e-2  # the grouped path also rounds x and the SiLU product to bf16 for the tensor cores


def make_experts(num, hidden, inter, bits, symmetric, shared=True, stacked=False, device=DEVICE):
    def expert():
        w = lambda n, k: ct_compress((torch.randn(n, k, device=device) * 0.05).to(torch.bfloat16), bits, 128,
                                     symmetric)
        return {"gate": w(inter, hidden), "up": w(inter, hidden), "down": w(hidden, inter)}
    routed = [expert() for _ in range(num)]
    if stacked:  # one dict of tensors with a leading expert dim, as a stacked checkpoint holds them
        routed = {p: {name: torch.stack([ex[p][name] for ex in routed]) for name in routed[0][p]}
                  for p in ("gate", "up", "down")}
    return repack_moe_experts(routed, shared=expert() if shared else None, bits=bits, group_size=128)


def routing(m, num, topk, device=DEVICE):
    ids = torch.stack([torch.randperm(num, device=device)[:topk] for _ in range(m)])
    weights = torch.rand(m, topk, device=device)
    return ids, weights / weights.sum(-1, keepdim=True) * 2.446


@pytest.mark.parametrize("bits, symmetric, shared, stacked, m", [(4, True, True, False, 3), (8, False, True, True, 1),
                                                                  (4, False, False, False, 2)])
def test_fused_moe_decode(bits, symmetric, shared, stacked, m):
    experts = make_experts(6, 128, 128, bits, symmetric, shared, stacked)
    x = torch.randn(m, 128, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 6, 3)
    y = fused_moe(x, ids, weights, experts, out=poisoned(m, 128, dtype=x.dtype))
    assert_close(y, naive_fused_moe(x, ids, weights, experts), BOUND[x.dtype], "fused_moe decode")


@pytest.mark.slow
def test_fused_moe_decode_split_k():
    """3 k-tiles for gate/up and 2 for down, split across programs and reduced in-launch; locks re-armed."""
    experts = make_experts(4, 384, 256, 4, False)
    x = torch.randn(1, 384, device=DEVICE, dtype=torch.float32)
    ids, weights = routing(1, 4, 2)
    for _ in range(2):  # the second call reuses the locks
        y = moe_decode_fwd(x, ids, weights, experts, poisoned(1, 384, dtype=x.dtype), block_n=64)
        assert_close(y, naive_fused_moe(x, ids, weights, experts), BOUND[x.dtype], "fused_moe split-K")
    assert int(experts.gate.locks.abs().sum()) == 0 and int(experts.down.locks.abs().sum()) == 0


@pytest.mark.parametrize("m, block_m", [(7, 16), (20, None)])
def test_fused_moe_grouped(m, block_m):
    experts = make_experts(5, 256, 128, 4, False)
    x = torch.randn(m, 256, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 5, 2)
    y = moe_grouped_fwd(x, ids, weights, experts, poisoned(m, 256, dtype=x.dtype), block_m=block_m)
    assert_close(y, naive_fused_moe(x, ids, weights, experts), GROUPED_BOUND, "fused_moe grouped")


def test_align_pairs():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], device=DEVICE)
    pair_ids, block_expert = align_pairs(ids, 5, 2)
    rows = pair_ids.view(-1, 2)
    for b, e in enumerate(block_expert.tolist()):
        pairs = [p for p in rows[b].tolist() if p >= 0]
        assert all(ids.view(-1)[p] == e for p in pairs) and (e >= 0 or not pairs)
    assert sorted(p for p in pair_ids.tolist() if p >= 0) == list(range(6))


@GPU
@pytest.mark.parametrize("m", [1, 4, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_moe_real_shapes(bits, m):
    experts = make_experts(32, 2304, 1024, bits, True)
    x = torch.randn(m, 2304, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 32, 8)
    y = fused_moe(x, ids, weights, experts, out=poisoned(m, 2304, dtype=x.dtype))
    bound = BOUND[x.dtype] if m <= 8 else GROUPED_BOUND
    assert_close(y, naive_fused_moe(x, ids, weights, experts), bound, "fused_moe")
