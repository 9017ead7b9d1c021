"""add_rms_norm and moe_route against their twins: odd widths, with and without the residual, NaN-poisoned outputs;
tied router scores chosen alike by the kernel, the twin and the model."""
from dataclasses import replace

import pytest
import torch
from helpers import DEVICE, GPU, assert_close, poisoned

from klconvert.config import KimiLinearConfig
from klconvert.presets import preset_config
from klconvert.runtime import model as M
from klconvert.kernels.int_linear import sum_parked
from klconvert.kernels.moe_route import moe_add_norm_router, moe_route, moe_router, moe_router_locks
from klconvert.kernels.naive_moe_route import naive_moe_add_norm_router, naive_moe_route, naive_moe_router
from klconvert.kernels.naive_rms_norm import naive_add_rms_norm
from klconvert.kernels.rms_norm import add_rms_norm


@pytest.mark.parametrize("rows, n", [(1, 130), (5, 384), (3, 2304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(rows, n, dtype, with_residual):
    x = torch.randn(rows, n, device=DEVICE).to(dtype)
    r = torch.randn(rows, n, device=DEVICE).to(dtype) if with_residual else None
    w = torch.randn(n, device=DEVICE)
    summed, y = add_rms_norm(x, r, w, 1e-5, out=poisoned(rows, n, dtype=dtype))
    ref_sum, ref_y = naive_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, ref_sum)                        # the residual stream is rounded as the twin rounds it
    assert_close(y, ref_y, 1e-6 if dtype == torch.float32 else 8e-3, "normed")


def test_add_rms_norm_takes_a_leading_batch_of_tokens():
    x, r = torch.randn(2, 3, 256, device=DEVICE), torch.randn(2, 3, 256, device=DEVICE)
    w = torch.randn(256, device=DEVICE)
    summed, y = add_rms_norm(x, r, w, 1e-6)
    assert summed.shape == y.shape == (2, 3, 256)
    assert_close(y, naive_add_rms_norm(x, r, w, 1e-6)[1], 1e-6, "normed")


@pytest.mark.parametrize("N, E, k", [(1, 16, 4), (5, 256, 8), (3, 37, 5)])
@pytest.mark.parametrize("biased", [False, True])
def test_moe_route(N, E, k, biased):
    logits = torch.randn(N, E, device=DEVICE) * 3
    bias = torch.randn(E, device=DEVICE) * 0.1
    ids, wts = moe_route(logits, bias, k, 2.446, biased_weights=biased)
    ref_ids, ref_wts = naive_moe_route(logits, bias, k, 2.446, biased_weights=biased)
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)          # the same set (order inside the set is free)
    assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices), 1e-6, "weights")


# tied choices (sigmoid + bias): all equal, the sigmoid saturated at 1.0, logits of three levels over an E that is
# not a power of two, and ties made by the bias over saturated scores
TIES = {"all equal": (torch.zeros(2, 8), torch.zeros(8), 2),
        "saturated": (torch.full((1, 16), 40.0), torch.zeros(16), 4),
        "three levels": (torch.randint(-1, 2, (6, 37), generator=torch.Generator().manual_seed(0)).float(),
                         torch.zeros(37), 5),
        "by the bias": (torch.full((3, 16), 40.0), torch.tensor([0.0, 0.5] * 8), 3)}


@pytest.mark.parametrize("case", TIES)
def test_tied_scores_go_to_the_lowest_ids_in_the_kernel_the_twin_and_the_model(case):
    """moe_route's promise (ties: the lowest id), kept by its twin and the CPU model's Router too, ids in order:
    torch.topk (the twin's and the model's before) picked others ([6, 5] of 8 all tied, where the kernel picks
    [0, 1]), so the CPU and GPU runtimes routed a saturated token to different experts."""
    logits, bias, k = TIES[case]
    logits, bias = logits.to(DEVICE), bias.to(DEVICE)
    choice = torch.sigmoid(logits) + bias
    want = torch.tensor([sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in choice.tolist()],
                        device=DEVICE)
    assert torch.equal(moe_route(logits, bias, k, 2.446)[0], want)
    assert torch.equal(naive_moe_route(logits, bias, k, 2.446)[0], want)
    config = replace(KimiLinearConfig.from_dict(preset_config("tiny")), num_experts=logits.shape[1],
                     num_experts_per_token=k)
    router = M.Router(config, biased=False)
    router.e_score_correction_bias = torch.nn.Parameter(bias, requires_grad=False)
    assert torch.equal(router.route(logits)[0], want)


def test_tied_expert_groups_go_to_the_lowest_group_ids_in_the_model():
    """Grouped routing (the CPU model's alone) ranks its groups with the same rule: all 16 scores tied, the best 2
    of 4 groups are groups 0 and 1, and their lowest 4 experts win."""
    config = replace(KimiLinearConfig.from_dict(preset_config("tiny")), num_expert_group=4, topk_group=2)
    router = M.Router(config, biased=False)
    router.e_score_correction_bias = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
    assert router.route(torch.zeros(3, 16))[0].tolist() == [[0, 1, 2, 3]] * 3


# the routing options the runtime passes: config.json's moe_renormalize, and the biased scores as weights (the original
# remote code's routing)
ROUTING = [dict(), dict(renormalize=False, biased_weights=True)]


@pytest.mark.parametrize("N, E, D, k", [(1, 16, 128, 4), (3, 37, 200, 5), (2, 256, 384, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ROUTING, ids=["default", "biased-unnormalized"])
def test_moe_router_computes_the_logits_and_routes_in_one_launch(N, E, D, k, dtype, routing):
    x = torch.randn(N, D, device=DEVICE).to(dtype)
    w, bias = torch.randn(E, D, device=DEVICE) / D ** 0.5 * 3, torch.randn(E, device=DEVICE) * 0.1
    locks = moe_router_locks(4, DEVICE)
    for _ in range(2):                                           # the locks re-arm: a second call routes the same
        ids, wts = moe_router(x, w, bias, k, 2.446, locks, block_e=8, block_d=64, **routing)
        ref_ids, ref_wts = naive_moe_router(x, w, bias, k, 2.446, **routing)
        order, ref_order = ids.sort(-1), ref_ids.sort(-1)
        assert torch.equal(order.values, ref_order.values)
        assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices), 1e-5, "weights")
    assert int(locks.abs().sum()) == 0


@pytest.mark.parametrize("N, E, D, k", [(1, 16, 128, 4), (3, 37, 200, 5), (2, 256, 384, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ROUTING, ids=["default", "biased-unnormalized"])
def test_moe_add_norm_router_folds_the_pre_norm_in(N, E, D, k, dtype, routing):
    x, r = torch.randn(N, D, device=DEVICE).to(dtype) * 4, torch.randn(N, D, device=DEVICE).to(dtype)
    gamma = torch.rand(D, device=DEVICE) + 0.5
    w, bias = torch.randn(E, D, device=DEVICE) / D ** 0.5 * 3, torch.randn(E, device=DEVICE) * 0.1
    locks = moe_router_locks(4, DEVICE)
    for _ in range(2):                                           # the locks re-arm: a second call routes the same
        s, h, ids, wts = moe_add_norm_router(x, r, gamma, 1e-6, w, bias, k, 2.446, locks, block_e=8, block_d=64,
                                             **routing)
        ref_s, ref_h, ref_ids, ref_wts = naive_moe_add_norm_router(x, r, gamma, 1e-6, w, bias, k, 2.446, **routing)
        assert torch.equal(s, ref_s)                             # the residual stream, rounded as add_rms_norm does
        assert_close(h, ref_h, 1e-6 if dtype == torch.float32 else 8e-3, "h")
        assert torch.equal(ref_h, naive_add_rms_norm(x, r, gamma, 1e-6)[1])   # the twins' pre-norm is add_rms_norm's
        order, ref_order = ids.sort(-1), ref_ids.sort(-1)
        assert torch.equal(order.values, ref_order.values)
        assert_close(wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices), 1e-5, "weights")
    assert int(locks.abs().sum()) == 0


@pytest.mark.parametrize("E, D, block_e", [(16, 384, 8), (256, 2304, 4), (37, 256, 4)])
def test_moe_add_norm_router_writes_h_k_tile_sums(E, D, block_e):
    """h_sums: each token's sums of h as rounded over each k-tile of 128 inputs (the fused MoE's x_sums), also where
    the programs are fewer than the tiles (16 experts in blocks of 8: 2 programs for 3 tiles)."""
    x, r = torch.randn(3, D, device=DEVICE).to(torch.bfloat16) * 4, torch.randn(3, D, device=DEVICE).to(torch.bfloat16)
    gamma = torch.rand(D, device=DEVICE) + 0.5
    w, bias = torch.randn(E, D, device=DEVICE) / D ** 0.5 * 3, torch.randn(E, device=DEVICE) * 0.1
    sums = torch.full((3, D // 128), float("nan"), device=DEVICE)
    s, h, ids, _ = moe_add_norm_router(x, r, gamma, 1e-6, w, bias, 4, 2.446, moe_router_locks(4, DEVICE),
                                       block_e=block_e, h_sums=sums)
    plain = moe_add_norm_router(x, r, gamma, 1e-6, w, bias, 4, 2.446, moe_router_locks(4, DEVICE), block_e=block_e)
    assert torch.equal(s, plain[0]) and torch.equal(h, plain[1]) and torch.equal(ids, plain[2])
    assert_close(sums, h.float().view(3, -1, 128).sum(-1), 1e-6, "h sums")
    with pytest.raises(ValueError, match="h_sums"):
        moe_add_norm_router(x, r, gamma, 1e-6, w, bias, 4, 2.446, moe_router_locks(4, DEVICE), h_sums=sums[:, :1])


@pytest.mark.parametrize("N, E, D, parts", [(1, 16, 384, 3), (3, 37, 256, 8), (2, 256, 2304, 1),
                                            pytest.param(1, 256, 2304, 8, marks=GPU)])   # the 48B's o_proj's parts
def test_moe_add_norm_router_adds_up_a_parked_residual(N, E, D, parts):
    """The residual as a projection's parked split-K partials, fp32 [parts, N, D]: the same launch gives what it
    gives the partials' sum in split order, rounded to x's dtype (sum_parked), bit for bit; h sums too."""
    x = torch.randn(N, D, device=DEVICE).to(torch.bfloat16) * 4
    partials = torch.randn(parts, N, D, device=DEVICE) / parts ** 0.5
    gamma = torch.rand(D, device=DEVICE) + 0.5
    w, bias = torch.randn(E, D, device=DEVICE) / D ** 0.5 * 3, torch.randn(E, device=DEVICE) * 0.1
    sums, ref_sums = (torch.full((N, D // 128), float("nan"), device=DEVICE) for _ in range(2))
    got = moe_add_norm_router(x, partials, gamma, 1e-6, w, bias, 4, 2.446, moe_router_locks(4, DEVICE), block_e=4,
                              h_sums=sums)
    want = moe_add_norm_router(x, sum_parked(partials, x.dtype), gamma, 1e-6, w, bias, 4, 2.446,
                               moe_router_locks(4, DEVICE), block_e=4, h_sums=ref_sums)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(sums, ref_sums)
    with pytest.raises(ValueError, match="parked"):
        moe_add_norm_router(x, partials.to(x.dtype), gamma, 1e-6, w, bias, 4, 2.446, moe_router_locks(4, DEVICE))


def test_moe_route_ties_go_to_the_lowest_ids():
    logits = torch.zeros(2, 40, device=DEVICE)
    logits[1, 30:] = 1.0  # ten tied leaders, then ties among the rest
    ids, _ = moe_route(logits, torch.zeros(40, device=DEVICE), 12, 1.0)
    assert ids[0].sort().values.tolist() == list(range(12))
    assert ids[1].sort().values.tolist() == [0, 1] + list(range(30, 40))


def test_moe_route_without_renormalization():
    logits, bias = torch.randn(2, 32, device=DEVICE), torch.zeros(32, device=DEVICE)
    ids, wts = moe_route(logits, bias, 3, 1.0, renormalize=False)
    assert_close(wts, torch.sigmoid(logits).gather(1, ids), 1e-6, "weights")


@GPU
def test_real_shapes_on_the_gpu():
    x, r = (torch.randn(16, 2304, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(2304, device="cuda")
    assert_close(add_rms_norm(x, r, w, 1e-5)[1], naive_add_rms_norm(x, r, w, 1e-5)[1], 8e-3, "normed")
    logits, bias = torch.randn(16, 256, device="cuda"), torch.randn(256, device="cuda") * 0.1
    ids, _ = moe_route(logits, bias, 8, 2.446)
    assert torch.equal(ids.sort(-1).values, naive_moe_route(logits, bias, 8, 2.446)[0].sort(-1).values)
