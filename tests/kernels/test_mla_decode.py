"""mla_decode against its fp32 twin: split boundaries hit and missed, bf16 and fp8 caches, garbage past each length,
fp8 against bf16, real shapes up to 1M tokens, CUDA-graph capture."""
import importlib

import pytest
import torch
from helpers import DEVICE, GPU, assert_close, poisoned

from klconvert.kernels.mla_decode import mla_decode
from klconvert.kernels.naive_mla import naive_mla_decode, quantize_mla_cache_rows
from klconvert.kernels.mla_decode import mla_decode_splits

mla = importlib.import_module("klconvert.kernels.mla_decode")  # the module (the package attribute is the function)

BOUND = 5e-3  # vs the twin on the same cache values: q and p are rounded to bf16 for the tensor cores
FP8_BOUND = 5e-2  # fp8 cache vs the bf16 cache it was quantized from: e4m3 keeps 3 mantissa bits (~2.7% RMS)
SCALE = 192 ** -0.5  # the model's softmax scale (qk_nope 128 + shared key 64)


def make_cache(B, L_max, lengths, width, fp8, device=DEVICE):
    """A bf16 cache (or its fp8 quantization and scales) holding NaN past each sequence's length."""
    rows = torch.randn(B, L_max, width, device=device).to(torch.bfloat16)
    cache, scale = quantize_mla_cache_rows(rows) if fp8 else (rows, None)
    for b, n in enumerate(lengths.tolist()):
        cache[b, n:] = float("nan")
        if scale is not None:
            scale[b, n:] = float("nan")
    return cache, scale


def queries(B, H, R, Dr, dtype, device=DEVICE):
    return torch.randn(B, H, R, device=device, dtype=dtype), torch.randn(B, H, Dr, device=device, dtype=dtype)


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """The split workspace starts as NaN: reading a split that did not run fails the bounds. Returns the list of
    workspaces handed out, (part_o, part_lse) per call."""
    handed = []

    def workspace(B, S, H, R, device):
        handed.append((poisoned(B, S, H, R, dtype=torch.float32, device=device),
                       poisoned(B, S, H, dtype=torch.float32, device=device)))
        return handed[-1]
    monkeypatch.setattr(mla, "_workspace", workspace)
    return handed


# (block_n, min_split_tokens, num_splits, qk_tokens_as_m): splits from the default rule (10 of 32 tokens for 300), a
# forced split count whose chunk (80) is not a multiple of the length's tiles, one split for everything, the default
# launch, the scores with tokens as the M dim
SPLITS = [(16, 32, None, False), (16, 16, 4, False), (32, 16, 1, False), (None, 256, None, False),
          (64, 64, None, True)]


@pytest.mark.parametrize("block_n, min_split, num_splits, tokens_m", SPLITS)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_mla_decode(block_n, min_split, num_splits, tokens_m, fp8, q_dtype, poisoned_workspace):
    B, H, R, Dr, L_max = 3, 5, 64, 16, 320
    lengths = torch.tensor([1, 37, 300], dtype=torch.int32, device=DEVICE)
    cache, scale = make_cache(B, L_max, lengths, R + Dr, fp8)
    q_lat, q_rope = queries(B, H, R, Dr, q_dtype)
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale, out=poisoned(B, H, R, dtype=torch.float32),
                   block_n=block_n, min_split_tokens=min_split, num_splits=num_splits, qk_tokens_as_m=tokens_m)
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale), BOUND, "o_lat")


def test_merge_over_more_splits_than_one_round_trip(poisoned_workspace):
    """69 active splits: the merge takes them 64 at a time, rescaling its running max between the two rounds."""
    B, H, R, Dr, L_max = 2, 3, 32, 16, 1200
    lengths = torch.tensor([1100, 40], dtype=torch.int32, device=DEVICE)
    cache, _ = make_cache(B, L_max, lengths, R + Dr, False)
    q_lat, q_rope = queries(B, H, R, Dr, torch.float32)
    assert mla.merge_blocks(70, R)[0] == 64
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, out=poisoned(B, H, R, dtype=torch.float32), block_n=16,
                   min_split_tokens=16, num_splits=70)
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE), BOUND, "o_lat")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_mla_decode_positions_and_a_16_bit_output(out_dtype, poisoned_workspace):
    """What the model passes: its int64 positions with length_offset 1 (rows 0..position attended; the row past
    it is NaN, so one row too many fails), the output in the queries' dtype (the merge rounds once)."""
    B, H, R, Dr, L_max = 2, 4, 64, 16, 200
    positions = torch.tensor([2, 176], dtype=torch.int64, device=DEVICE)
    cache, scale = make_cache(B, L_max, positions + 1, R + Dr, False)
    q_lat, q_rope = queries(B, H, R, Dr, torch.bfloat16)
    o = mla_decode(q_lat, q_rope, cache, positions, SCALE, scale, out_dtype=out_dtype, min_split_tokens=32,
                   length_offset=1)
    assert o.dtype == out_dtype
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, positions, SCALE, scale, length_offset=1), BOUND, "o_lat")
    fp32 = mla_decode(q_lat, q_rope, cache, (positions + 1).int(), SCALE, scale, min_split_tokens=32)
    assert torch.equal(o, fp32.to(out_dtype))                  # the same sum, rounded once


def test_mla_decode_head_blocks_and_strided_inputs(poisoned_workspace):
    """H over two head blocks (the second part padding); q slices of a wider projection; the cache a slot view."""
    B, H, R, Dr, L_max = 2, 20, 32, 16, 100
    lengths = torch.tensor([100, 61], dtype=torch.int32, device=DEVICE)
    slots, _ = make_cache(B + 1, L_max, torch.tensor([100, 100, 61]), R + Dr, False)
    cache = slots[1:]
    q = torch.randn(B, H, R + Dr + 8, device=DEVICE)
    q_lat, q_rope = q[..., :R], q[..., R:R + Dr]
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, block_h=16, block_n=16, min_split_tokens=16)
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE), BOUND, "o_lat")


def test_split_counts():
    """One 1M sequence fills an H200 (one wave over its 132 SMs) and no batch spills into a second wave; a 4K cache
    is not over-split."""
    assert mla_decode_splits(1, 32, 1 << 20, "cpu") == 132
    assert mla_decode_splits(4, 32, 1 << 20, "cpu") == 33
    assert mla_decode_splits(16, 32, 1 << 20, "cpu") == 8                 # 128 programs, not 9 x 16 = 144
    assert all(b * mla_decode_splits(b, 32, 1 << 20, "cpu") <= 132 for b in range(1, 133))
    assert mla_decode_splits(200, 32, 1 << 20, "cpu") == 1
    assert mla_decode_splits(1, 32, 4096, "cpu") == 16
    assert mla_decode_splits(1, 32, 100, "cpu") == 1


@pytest.mark.slow
def test_short_length_in_a_long_cache_runs_few_splits(poisoned_workspace):
    """Splits are sized from the device length: 300 tokens in a 4096-token cache run 5 splits of 64, not 64 of 5."""
    B, H, R, Dr, L_max = 2, 4, 64, 16, 4096
    lengths = torch.tensor([300, L_max], dtype=torch.int32, device=DEVICE)
    cache, _ = make_cache(B, L_max, lengths, R + Dr, False)
    q_lat, q_rope = queries(B, H, R, Dr, torch.float32)
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, block_n=16, min_split_tokens=64)
    _, part_lse = poisoned_workspace[-1]
    assert part_lse.shape[1] == 64
    assert (~part_lse.isnan()).sum(1).tolist() == [[5] * H, [64] * H]
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE), BOUND, "o_lat")


def test_fp8_cache_against_bf16_cache():
    B, H, R, Dr, L_max = 2, 4, 64, 16, 200
    lengths = torch.tensor([200, 123], dtype=torch.int32, device=DEVICE)
    rows = torch.randn(B, L_max, R + Dr, device=DEVICE).to(torch.bfloat16)
    values, scale = quantize_mla_cache_rows(rows)
    q_lat, q_rope = queries(B, H, R, Dr, torch.float32)
    kw = dict(block_n=16, min_split_tokens=32)
    o16 = mla_decode(q_lat, q_rope, rows, lengths, SCALE, **kw)
    o8 = mla_decode(q_lat, q_rope, values, lengths, SCALE, scale, **kw)
    err = assert_close(o8, o16, FP8_BOUND, "fp8 cache vs bf16 cache")
    print(f"fp8 vs bf16 cache: relative RMS {err:.3g}")


def test_lengths_zero_and_past_the_cache():
    """Length 0 gives zeros; a length past L_max is clamped to L_max."""
    B, H, R, Dr, L_max = 2, 4, 32, 16, 48
    lengths = torch.tensor([0, L_max + 5], dtype=torch.int32, device=DEVICE)
    cache, _ = make_cache(B, L_max, torch.tensor([L_max, L_max]), R + Dr, False)
    q_lat, q_rope = queries(B, H, R, Dr, torch.float32)
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, block_n=16, min_split_tokens=16)
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE), BOUND, "o_lat")


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("fp8", [False, True])
def test_a_nan_in_the_cache_gives_nan_not_zeros(num_splits, fp8, poisoned_workspace):
    """A NaN inside a sequence's length makes its output NaN, as the twin's, where the merge's `den > 0` (false for
    NaN) gave zeros: in the latent (the scores and the sum) or the shared key (the scores only), in the middle split
    of three or the last (one row), or in the one split. Length 0 still gives zeros; a sequence beside is finite."""
    B, H, R, Dr, L_max = 4, 3, 32, 16, 80
    lengths = torch.tensor([70, 0, 50, 33], dtype=torch.int32, device=DEVICE)
    cache, scale = make_cache(B, L_max, lengths, R + Dr, fp8)
    cache[0, 45, 3] = cache[3, 32, R + 1] = float("nan")
    if fp8:  # a row holding a NaN gets a NaN scale (quantize_mla_cache_rows, mla_write_rows); the interpreter also
        scale[0, 45] = scale[3, 32] = float("nan")  # reads an e4m3 NaN as 480 (its fp8 -> fp16 conversion)
    q_lat, q_rope = queries(B, H, R, Dr, torch.float32)
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale, out=poisoned(B, H, R, dtype=torch.float32),
                   block_n=16, min_split_tokens=16, num_splits=num_splits)
    ref = naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale)
    assert ref[[0, 3]].isnan().all() and not ref[[1, 2]].isnan().any()
    assert torch.equal(o.isnan(), ref.isnan())
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert_close(o[2], ref[2], BOUND, "o_lat")


def test_quantize_mla_cache_rows():
    rows = torch.randn(3, 7, 80, device=DEVICE) * torch.logspace(-3, 3, 7, device=DEVICE)[:, None]
    rows[1, 2] = 0.0
    values, scale = quantize_mla_cache_rows(rows.to(torch.bfloat16))
    assert values.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (3, 7)
    back = values.float() * scale[..., None]
    assert torch.equal(back[1, 2], torch.zeros(80, device=DEVICE)) and scale[1, 2] > 0
    amax = values.float().abs().amax(-1)
    assert torch.equal(amax[scale > 1e-10], torch.full_like(amax[scale > 1e-10], 448.0))  # each row's largest -> 448
    ref = rows.to(torch.bfloat16).float()
    # e4m3: half an ulp is 2^-4 relative for normals, 2^-10 of the scale for subnormals
    assert ((back - ref).abs() <= ref.abs().amax(-1, keepdim=True) / 448 * 2 ** -9 + ref.abs() * 2 ** -4).all()
    assert_close(back, ref, 4e-2, "fp8 round trip")


@pytest.mark.parametrize("bad, match", [
    (dict(q_rope=torch.zeros(2, 3, 12), cache=torch.zeros(2, 40, 44, dtype=torch.bfloat16)), "power of two"),
    (dict(cache_scale=torch.ones(2, 40)), "cache_scale goes with"),
    (dict(lengths=torch.ones(2, dtype=torch.float32)), "lengths must be"),
    (dict(cache=torch.zeros(2, 40, 60, dtype=torch.bfloat16)), "cache \\[2, L, 48\\]"),
    (dict(length_offset=torch.ones(1, dtype=torch.int64)), "length_offset must be an int"),
])
def test_rejects_bad_input(bad, match):
    args = dict(q_lat=torch.zeros(2, 3, 32), q_rope=torch.zeros(2, 3, 16), cache=torch.zeros(2, 40, 48,
                dtype=torch.bfloat16), lengths=torch.ones(2, dtype=torch.int32), scale=1.0, cache_scale=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mla_decode(**args)


# real shapes: H=32 heads, a 512-d latent, a 64-d shared key
H, R, DR = 32, 512, 64
HEADS = [0, 9, 22, 31]  # the twin's sample at long context


def real_case(lengths, L_max, fp8, heads=None, **launch):
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cache, scale = make_cache(len(lengths), L_max, lengths, R + DR, fp8)
    q_lat, q_rope = queries(len(lengths), H, R, DR, torch.bfloat16)
    o = mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale, out=poisoned(len(lengths), H, R, dtype=torch.float32),
                   **launch)
    heads = slice(None) if heads is None else heads
    ref = naive_mla_decode(q_lat[:, heads], q_rope[:, heads], cache, lengths, SCALE, scale)
    assert_close(o[:, heads], ref, BOUND, "o_lat")


@GPU
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_decode_real_shapes_4k(fp8):
    real_case([4096], 4096, fp8)


@GPU
def test_mla_decode_real_shapes_tokens_as_m():
    real_case([100003], 100003, False, block_n=128, num_warps=8, num_stages=2, qk_tokens_as_m=True)


@GPU
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_decode_real_shapes_1m(fp8):
    """One sequence of 1M tokens (NaN rows after it), the twin on a sample of heads."""
    real_case([1 << 20], (1 << 20) + 64, fp8, heads=HEADS)


@GPU
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_decode_real_shapes_mixed_batch(fp8):
    real_case([1, 4097, 65536, 200003], 1 << 18, fp8, heads=HEADS)


@GPU
def test_mla_decode_cuda_graph():
    """Captured once, replayed: the same result as eager, and lengths are read from the device at each replay."""
    lengths = torch.tensor([5000, 77777], dtype=torch.int32, device=DEVICE)
    cache, scale = make_cache(2, 1 << 17, torch.tensor([1 << 17, 1 << 17]), R + DR, True)
    q_lat, q_rope = queries(2, H, R, DR, torch.bfloat16)
    call = lambda: mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o = call()
    for n in ([5000, 77777], [1, 131072], [4096, 99]):
        lengths.copy_(torch.tensor(n, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(o, call()), n
        assert_close(o, naive_mla_decode(q_lat, q_rope, cache, lengths, SCALE, scale), BOUND, f"lengths {n}")
