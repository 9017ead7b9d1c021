"""fused_moe (decode kernels on the CUDA and the tensor cores, grouped prefill GEMM) against its per-expert fp32
twin; the kernel choice and launch tables."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, ct_compress, poisoned

from klconvert.kernels.naive_moe import naive_fused_moe
from klconvert.kernels.fused_moe import (DECODE_MAX_TOKENS, MOE_CROSSOVER, MOE_DECODE_LAUNCH, MOE_PREFILL_LAUNCH,
                                         align_pairs, decode_launch, dense_mlp_experts, fused_moe, moe_decode_fwd,
                                         moe_grouped_fwd, moe_kernel, prefill_launch, repack_moe_experts)
from klconvert.kernels.int_linear import MMA_M, repack_int_weight
from klconvert.kernels.naive_int_linear import dequantize_int_weight

BOUND = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # relative RMS vs the fp32 twin, by output dtype
GROUPED_BOUND = 1.5e-2  # the grouped path also rounds x and the SiLU product to bf16 for the tensor cores


def expert_tensors(num, hidden, inter, bits, symmetric, shared=True, stacked=False, device=DEVICE):
    """The compressed-tensors tensors of `num` routed experts (a list, or with `stacked` one dict) and a shared one."""
    def expert():
        w = lambda n, k: ct_compress((torch.randn(n, k, device=device) * 0.05).to(torch.bfloat16), bits, 128,
                                     symmetric)
        return {"gate": w(inter, hidden), "up": w(inter, hidden), "down": w(hidden, inter)}
    routed = [expert() for _ in range(num)]
    if stacked:  # one dict of tensors with a leading expert dim, as a stacked checkpoint holds them
        routed = {p: {name: torch.stack([ex[p][name] for ex in routed]) for name in routed[0][p]}
                  for p in ("gate", "up", "down")}
    return routed, expert() if shared else None


def make_experts(num, hidden, inter, bits, symmetric, shared=True, stacked=False, device=DEVICE):
    routed, shared_expert = expert_tensors(num, hidden, inter, bits, symmetric, shared, stacked, device)
    return repack_moe_experts(routed, shared=shared_expert, bits=bits, group_size=128)


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


def test_stacked_experts_repack_alike_under_an_apps_default_device():
    """Under torch.set_default_device("meta") the stacked split moved each weight_shape there (torch.as_tensor takes
    the default device), so reading its [n, k] failed ('Tensor.item() cannot be called on meta tensors'). It is read
    on the host: the same codes, scales, zero points and locks as under the default."""
    routed, shared = expert_tensors(4, 128, 128, 8, False, stacked=True)
    want = repack_moe_experts(routed, shared=shared, bits=8, group_size=128)
    torch.set_default_device("meta")
    try:
        got = repack_moe_experts(routed, shared=shared, bits=8, group_size=128)
    finally:
        torch.set_default_device(None)
    for g, w in ((got.gate, want.gate), (got.up, want.up), (got.down, want.down)):
        assert all(torch.equal(a, b) for a, b in zip((g.qweight, g.scales, g.zeros, g.locks),
                                                     (w.qweight, w.scales, w.zeros, w.locks)))


@pytest.mark.parametrize("bits, symmetric, m", [(4, True, 1), (4, False, 3), (8, False, 2)])
def test_a_dense_mlp_restacked_as_experts_runs_it(bits, symmetric, m):
    """dense_mlp_experts moves a SwiGLU MLP's codes into chunk experts (each chunk's dequantized weights are the
    MLP's rows or columns, exactly), and fused_moe with every chunk taken at weight 1 gives the MLP."""
    D, I, chunk = 128, 384, 128
    gate, up, down = _packed(I, D, bits, symmetric), _packed(I, D, bits, symmetric), _packed(D, I, bits, symmetric)
    experts = dense_mlp_experts(gate, up, down, chunk)
    assert (experts.num_experts, experts.has_shared) == (I // chunk - 1, True)
    g, u, d = (dequantize_int_weight(p) for p in (gate, up, down))
    for e in range(I // chunk):
        rows = slice(e * chunk, (e + 1) * chunk)
        ge, ue, de = (dequantize_int_weight(p) for p in experts.expert(e))
        assert torch.equal(ge, g[rows]) and torch.equal(ue, u[rows]) and torch.equal(de, d[:, rows])
    x = torch.randn(m, D, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.arange(experts.num_experts, device=DEVICE).expand(m, -1)
    y = fused_moe(x, ids, torch.ones(ids.shape, device=DEVICE), experts, out=poisoned(m, D, dtype=x.dtype))
    ref = (torch.nn.functional.silu(x.float() @ g.t()) * (x.float() @ u.t())) @ d.t()
    assert_close(y, ref, BOUND[x.dtype], "a dense MLP through fused_moe")
    with pytest.raises(ValueError, match="chunks of 256 rows"):
        dense_mlp_experts(gate, up, down, 256)
    with pytest.raises(ValueError, match="2 format"):
        dense_mlp_experts(gate, up, _packed(D, I, bits, not symmetric), chunk)


def _packed(n, k, bits, symmetric):
    """A random [n, k] linear, quantized by compressed-tensors and repacked."""
    t = ct_compress((torch.randn(n, k, device=DEVICE) * 0.05).to(torch.bfloat16), bits, 128, symmetric)
    return repack_int_weight(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), t["weight_shape"],
                             bits, 128)


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


@pytest.mark.slow
@pytest.mark.parametrize("mma, bits, symmetric, shared, tokens, split_k", [
    (True, 4, False, False, 16, None), (False, 4, False, False, 6, None), (True, 8, True, True, 3, None),
    (False, 8, True, True, 3, None), (True, 4, True, True, 1, None), (False, 4, True, True, 1, None),
    (True, 4, False, True, 4, None), (True, 4, True, True, 9, (2, 2))])
def test_decode_kernels(mma, bits, symmetric, shared, tokens, split_k):
    """Both decode kernels at ragged token counts, on their default launches by token count (MOE_DECODE_LAUNCH: on
    the tensor cores k split (3, 2) at 1 token, (2, 1) at 3, 128-row tiles of 8 warps unsplit at 4, unsplit at 16);
    the last case splits where the default does not. 5 experts for 3 slots, so tokens share experts (one program
    serves all of an expert's tokens); without the shared expert 3 slots pad to 4, aliasing the next token's pairs.
    A second call reuses the locks, which must be re-armed."""
    experts = make_experts(5, 256, 128, bits, symmetric, shared)
    x = torch.randn(tokens, 256, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(tokens, 5, 3)
    for _ in range(2):
        y = moe_decode_fwd(x, ids, weights, experts, poisoned(tokens, 256, dtype=x.dtype), mma=mma, split_k=split_k)
        assert_close(y, naive_fused_moe(x, ids, weights, experts), BOUND[x.dtype], f"decode, mma {mma}")
    assert int(experts.gate.locks.abs().sum()) == 0 and int(experts.down.locks.abs().sum()) == 0


def test_decode_launch_table():
    """Each kernel's table covers 1 to DECODE_MAX_TOKENS in rising bounds; a wgmma with the weights as A takes 64 rows
    of block_n a warpgroup."""
    for kind, table in MOE_DECODE_LAUNCH.items():
        bounds = [bound for bound, _ in table]
        assert bounds == sorted(set(bounds)) and bounds[-1] == DECODE_MAX_TOKENS
        for i, (bound, launch) in enumerate(table):  # each entry serves from past the one before up to its bound
            assert decode_launch(kind, table[i - 1][0] + 1 if i else 1) == launch == decode_launch(kind, bound)
    for _, (block_n, split_k, num_warps, raw) in MOE_DECODE_LAUNCH["mma"]:
        assert block_n == 64 * (num_warps // 4) and len(split_k) == 2 and min(split_k) >= 1 and raw in (True, False)
    assert not any(raw for _, (*_, raw) in MOE_DECODE_LAUNCH["fma"])  # the RAW unpack is the tensor cores' PTX


def test_moe_kernel_table():
    for bits, (fma_max, mma_max) in MOE_CROSSOVER.items():
        assert bits in (4, 8) and 0 <= fma_max <= DECODE_MAX_TOKENS and mma_max >= 0
        for t in range(1, 40):
            want = "fma" if t <= fma_max else "mma" if t <= min(mma_max, DECODE_MAX_TOKENS) else "grouped"
            assert moe_kernel(t, bits, torch.bfloat16) == want
            assert moe_kernel(t, bits, torch.float32) == ("fma" if t <= DECODE_MAX_TOKENS else "grouped")


# (bits, symmetric, shared, tokens, launch): ragged token counts, blocks of 16 and 32 rows, the weights as the A operand
GROUPED_CASES = [(4, False, True, 7, dict(block_m=16, block_n=16)), (4, True, False, 20, {}),
                 (8, False, True, 11, dict(block_m=32, block_n=32, weights_as_a=True)),
                 (8, True, True, 5, dict(block_m=16, block_n=64, num_warps=4))]


@pytest.mark.parametrize("bits, symmetric, shared, m, launch", GROUPED_CASES)
def test_fused_moe_grouped(bits, symmetric, shared, m, launch):
    """The prefill grouped GEMM; experts 3 and 4 of 5 get no token (their blocks do no work, write nothing)."""
    experts = make_experts(5, 256, 128, bits, symmetric, shared)
    x = torch.randn(m, 256, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 3, 2)
    y = moe_grouped_fwd(x, ids, weights, experts, poisoned(m, 256, dtype=x.dtype), **launch)
    assert_close(y, naive_fused_moe(x, ids, weights, experts), GROUPED_BOUND, "fused_moe grouped")


def test_prefill_launch_table():
    bounds = [bound for bound, _ in MOE_PREFILL_LAUNCH]
    assert bounds == sorted(bounds) and prefill_launch(1 << 40) == MOE_PREFILL_LAUNCH[-1][1]
    for bound, launch in MOE_PREFILL_LAUNCH:
        assert prefill_launch(bound) == launch and launch[0] >= MMA_M


def test_align_pairs():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], device=DEVICE)
    pair_ids, block_expert = align_pairs(ids, 5, 2)
    rows = pair_ids.view(-1, 2)
    for b, e in enumerate(block_expert.tolist()):
        pairs = [p for p in rows[b].tolist() if p >= 0]
        assert all(ids.view(-1)[p] == e for p in pairs) and (e >= 0 or not pairs)
    assert sorted(p for p in pair_ids.tolist() if p >= 0) == list(range(6))


@GPU
@pytest.mark.parametrize("m", [1, 4, 64, 600])
@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
def test_fused_moe_real_shapes(bits, symmetric, m):
    experts = make_experts(32, 2304, 1024, bits, symmetric)
    x = torch.randn(m, 2304, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 32, 8)
    y = fused_moe(x, ids, weights, experts, out=poisoned(m, 2304, dtype=x.dtype))
    bound = BOUND[x.dtype] if m <= DECODE_MAX_TOKENS else GROUPED_BOUND
    assert_close(y, naive_fused_moe(x, ids, weights, experts), bound, "fused_moe")


def test_decode_prefetches_only_what_fits_half_the_l2(monkeypatch):
    """With PDL the down launch prefetches every pair's expert only while they fit in half the L2 (at the 48B's
    shapes 16 tokens' ~100 experts do not: 2,604 -> 2,670 tokens/s at batch 16 on an H200 without it); gate+up
    prefetches the shared expert. A later launch's weight (`after`) goes with the down launch's own prefetch while
    the two fit in half the L2 together."""
    from klconvert.kernels import fused_moe, pdl
    from klconvert.kernels.int_linear import packed_bytes

    launches = []

    class Capture:  # stands in for the kernel: records each launch's (GATED, PREFETCH, AFTER, bytes of `after`)
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["GATED"], kw["PREFETCH"], kw["AFTER"], args[-2]))
    experts = make_experts(32, 256, 128, 4, True, device="cpu")
    down_expert = packed_bytes(experts.down) // 33
    later = torch.zeros(down_expert // 4, dtype=torch.int32)  # a later launch's weight, one expert's size
    monkeypatch.setattr(fused_moe, "moe_decode_fwd_kernel", Capture())
    monkeypatch.setattr(fused_moe, "use_pdl", lambda device: True)
    monkeypatch.setattr(pdl, "_l2_bytes", lambda device: 2 * 10 * down_expert)  # half: one token's 8 + shared + 1
    x1 = torch.randn(1, 256, dtype=torch.bfloat16)
    for m in (1, 2):
        ids, weights = routing(m, 32, 8, device="cpu")
        moe_decode_fwd(torch.randn(m, 256, dtype=torch.bfloat16), ids, weights, experts, torch.empty(m, 256), mma=True,
                       after=later)
    assert launches == [(True, True, False, 0), (False, True, True, later.nbytes), (True, True, False, 0),
                        (False, False, False, 0)]
    too_big = torch.zeros(down_expert // 4 + 1, dtype=torch.int32)  # with one token's experts, past half the L2
    moe_decode_fwd(x1, ids[:1], weights[:1], experts, torch.empty(1, 256), mma=True, after=too_big)
    moe_decode_fwd(x1, ids[:1], weights[:1], experts, torch.empty(1, 256), mma=True)
    assert launches[-4:] == [(True, True, False, 0), (False, True, False, 0)] * 2
    monkeypatch.setattr(fused_moe, "use_pdl", lambda device: False)
    moe_decode_fwd(x1, ids[:1], weights[:1], experts, torch.empty(1, 256), mma=True, after=later)
    assert launches[-2:] == [(True, False, False, 0), (False, False, False, 0)]


def test_takes_x_sums_where_the_launch_table_says(monkeypatch):
    """x's k-tile sums are worth writing only where fused_moe's defaults run the RAW unpack: int4, bf16 x, the PTX
    unpack (CUDA), and a decode launch marked RAW in MOE_DECODE_LAUNCH."""
    from klconvert.kernels import fused_moe as fm

    int4, int8 = make_experts(2, 128, 128, 4, True, device="cpu"), make_experts(2, 128, 128, 8, True, device="cpu")
    x = lambda m, dtype=torch.bfloat16: torch.zeros(m, 128, dtype=dtype)
    assert not fm.takes_x_sums(int4, x(1))                                   # the CPU: no PTX unpack
    monkeypatch.setattr(fm, "fast_unpack", lambda bits, device: True)
    assert [fm.takes_x_sums(int4, x(m)) for m in range(1, DECODE_MAX_TOKENS + 1)] == \
        [decode_launch("mma", m)[3] for m in range(1, DECODE_MAX_TOKENS + 1)]
    assert not fm.takes_x_sums(int4, x(1, torch.float32)) and not fm.takes_x_sums(int8, x(1))
    assert not fm.takes_x_sums(int4, x(DECODE_MAX_TOKENS + 1))              # the grouped prefill path


def test_x_sums_leave_the_ptx_free_paths_alone():
    """x's k-tile sums serve only the PTX unpack (CUDA, int4, tensor cores): elsewhere the result is the same."""
    experts = make_experts(5, 256, 128, 4, True)
    x = torch.randn(2, 256, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(2, 5, 3)
    sums = x.float().view(2, 2, 128).sum(-1)
    plain = moe_decode_fwd(x, ids, weights, experts, poisoned(2, 256, dtype=x.dtype), fast=False)
    assert torch.equal(moe_decode_fwd(x, ids, weights, experts, poisoned(2, 256, dtype=x.dtype), fast=False,
                                      x_sums=sums, raw=True), plain)


@GPU
@pytest.mark.parametrize("m", [1, 2, 4, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_raw_unpack_real_shapes(m, symmetric):
    """The gate+up launch's RAW unpack (codes as 128 + code, x's k-tile sums taking 128 + zero off after the dots) at
    the model's expert shape, on and off at each token count, against the twin and the centred unpack."""
    experts = make_experts(32, 2304, 1024, 4, symmetric)
    x = torch.randn(m, 2304, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 32, 8)
    sums = x.float().view(m, -1, 128).sum(-1)
    centred = moe_decode_fwd(x, ids, weights, experts, poisoned(m, 2304, dtype=x.dtype))
    raw = moe_decode_fwd(x, ids, weights, experts, poisoned(m, 2304, dtype=x.dtype), x_sums=sums, raw=True)
    assert_close(raw, naive_fused_moe(x, ids, weights, experts), BOUND[x.dtype], "RAW unpack")
    assert_close(raw, centred, 2e-3, "RAW against the centred unpack")  # the same products, rounded to bf16 once
    assert torch.equal(moe_decode_fwd(x, ids, weights, experts, poisoned(m, 2304, dtype=x.dtype), x_sums=sums),
                       raw if decode_launch("mma", m)[3] else centred)
    with pytest.raises(ValueError, match="x_sums"):
        moe_decode_fwd(x, ids, weights, experts, poisoned(m, 2304, dtype=x.dtype), x_sums=sums[:, :5], raw=True)


@GPU
def test_prefetching_a_later_weight_changes_nothing():
    """The down launch's L2 prefetch of a later launch's weight (with PDL) is a hint: the output is the same bit for
    bit, and the weight untouched."""
    experts = make_experts(32, 2304, 1024, 4, True)
    x = torch.randn(1, 2304, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(1, 32, 8)
    later = torch.randint(-2**31, 2**31 - 1, (12288, 288), device=DEVICE, dtype=torch.int32)  # KDA q,k,v's codes
    kept = later.clone()
    plain = fused_moe(x, ids, weights, experts)
    assert torch.equal(fused_moe(x, ids, weights, experts, after=later), plain) and torch.equal(later, kept)


@GPU
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("launch", [dict(mma=False), dict(mma=True, fast=True), dict(mma=True, fast=False),
                                    dict(mma=True, fast=True, weights_as_a=False), dict(mma=True, block_n=128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_decode_kernels_real_shapes(m, launch, symmetric):
    """Each decode variant (the PTX unpack among them) at the model's expert shape, 8 of 32 experts + shared."""
    experts = make_experts(32, 2304, 1024, 4, symmetric)
    x = torch.randn(m, 2304, device=DEVICE, dtype=torch.bfloat16)
    ids, weights = routing(m, 32, 8)
    for _ in range(2):
        y = moe_decode_fwd(x, ids, weights, experts, poisoned(m, 2304, dtype=x.dtype), **launch)
        assert_close(y, naive_fused_moe(x, ids, weights, experts), BOUND[x.dtype], f"decode {launch}")
    assert int(experts.gate.locks.abs().sum()) == 0 and int(experts.down.locks.abs().sum()) == 0
