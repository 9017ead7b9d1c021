"""Group-wise int quantization and pack-quantized packing, checked bit for bit against compressed-tensors."""
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized import helpers as ct_pack
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from klconvert.errors import KLError
from klconvert.quant import (
    QuantScheme,
    compress_weight,
    decompress_weight,
    dequantize_groupwise,
    pack_to_int32,
    policy_from_options,
    quantize_groupwise,
    unpack_from_int32,
)
from klconvert.quant.group_rules import CHANNEL, whole_groups_advice
from klconvert.quant.groupwise import MSE_GRID, MSE_MAX_SHRINK, MSE_NORM, MSE_PATIENCE, qrange
from klconvert.quant.pack_quantized import check_scales

CASES = [(bits, sym, gs, dtype) for bits in (4, 8) for sym in (True, False) for gs in (32, 128)
         for dtype in (torch.float32, torch.bfloat16)]


def weight(out, n_in, dtype, seed=0):
    """Gaussian weights with the awkward cases: an outlier, an all-zero group, a one-signed group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.02
    w[3, 5] = 0.9                 # outlier
    w[1, :128] = 0.0              # all-zero group (0/0 zero point in compressed-tensors)
    w[2, :128] = w[2, :128].abs()  # all-positive group (min widened to 0)
    return w.to(dtype)


def ct_args(bits, sym, gs):
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=gs)


def ct_qparams(w, args):
    """llm-compressor's min-max observer: per-group amin/amax in the weight's dtype, then calculate_qparams."""
    groups = w.unflatten(-1, (-1, args.group_size))
    return calculate_qparams(groups.amin(-1), groups.amax(-1), args)


@pytest.mark.parametrize("bits,sym,gs,dtype", CASES)
def test_quantize_matches_compressed_tensors(bits, sym, gs, dtype):
    w = weight(70, 256, dtype)  # 70 rows: zero points do not fill whole int32 words
    q, scale, zp = quantize_groupwise(w, bits, gs, sym)
    args = ct_args(bits, sym, gs)
    ct_scale, ct_zp = ct_qparams(w, args)
    assert scale.dtype == dtype and torch.equal(scale, ct_scale)
    assert q.dtype == torch.int8
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(q.min()) >= lo and int(q.max()) <= hi
    if sym:
        assert zp is None
        assert int(q.min()) == lo  # ct's symmetric int range reaches -2**(bits-1): absmax/7.5 for int4
    else:
        assert zp.dtype == torch.int8 and torch.equal(zp, ct_zp)
    assert torch.equal(q, ct_quantize(w, ct_scale, None if sym else ct_zp, args, dtype=torch.int8))


@pytest.mark.parametrize("bits,sym,gs,dtype", CASES)
def test_compressed_tensors_decompressor_gives_our_dequantized_weight(bits, sym, gs, dtype):
    w = weight(70, 256, dtype, seed=1)
    scheme = QuantScheme(bits, gs, sym)
    ours = compress_weight("m", w, scheme)
    q, scale, zp = quantize_groupwise(w, bits, gs, sym)
    expected = dequantize_groupwise(q, scale, zp)

    ct_scheme = QuantizationScheme(targets=["Linear"], weights=ct_args(bits, sym, gs))
    ct_scale, ct_zp = ct_qparams(w, ct_scheme.weights)
    ct_state = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": ct_scale, "weight_zero_point": ct_zp}, ct_scheme)
    local = {k.removeprefix("m."): v for k, v in ours.items()}
    assert set(local) == set(ct_state)  # the same tensors, under the same names
    for k in local:
        assert local[k].dtype == ct_state[k].dtype and torch.equal(local[k], ct_state[k]), k

    ct_w = PackedQuantizationCompressor.decompress(local, ct_scheme)["weight"]
    assert ct_w.dtype == dtype
    assert torch.equal(ct_w, expected)
    assert torch.equal(decompress_weight(ours, scheme), expected)


@pytest.mark.parametrize("bits,packed_dim", [(4, 1), (8, 1), (4, 0), (8, 0)])
def test_pack_unpack_roundtrip_and_layout(bits, packed_dim):
    g = torch.Generator().manual_seed(2)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (37, 72), generator=g, dtype=torch.int8)
    packed = pack_to_int32(q, bits, packed_dim)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, ct_pack.pack_to_int32(q, bits, packed_dim))
    assert torch.equal(unpack_from_int32(packed, bits, q.shape, packed_dim), q)
    assert torch.equal(ct_pack.unpack_from_int32(packed, bits, q.shape, packed_dim), q)


def test_int4_word_layout():
    """Element j of a word sits at bits 4j..4j+3, offset by +8: [-8, -7, ..., -1] -> 0x76543210."""
    q = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    assert pack_to_int32(q, 4).item() == 0x76543210
    q = torch.full((1, 8), 7, dtype=torch.int8)
    assert pack_to_int32(q, 4).item() == -1  # 0xFFFFFFFF


@pytest.mark.parametrize("bits,sym,bound", [(4, True, 0.13), (4, False, 0.11), (8, True, 0.009), (8, False, 0.008)])
def test_error_within_bounds(bits, sym, bound):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    q, scale, zp = quantize_groupwise(w, bits, 128, sym)
    dq = dequantize_groupwise(q, scale, zp)
    rel = ((dq - w).norm() / w.norm()).item()
    assert rel < bound, rel
    assert rel > bound / 4, rel  # it is really quantized
    # every element is within half a step (the symmetric +absmax, clamped to qmax, is exactly half a step off)
    step = scale.repeat_interleave(128, dim=1)
    assert bool(((dq - w).abs() <= step * 0.5 + 1e-6).all())


def test_per_channel():
    w = weight(16, 256, torch.bfloat16)
    q, scale, zp = quantize_groupwise(w, 4, CHANNEL, False)
    assert scale.shape == (16, 1) and zp.shape == (16, 1)
    tensors = compress_weight("m", w, QuantScheme(4, CHANNEL, False))
    assert tensors["m.weight_zero_point"].shape == (2, 1)  # 16 rows x 4 bits = 2 int32 words
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="channel")
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    ct_w = PackedQuantizationCompressor.decompress({k[2:]: v for k, v in tensors.items()}, ct_scheme)["weight"]
    assert torch.equal(ct_w, dequantize_groupwise(q, scale, zp))


BF16_MAX = torch.finfo(torch.bfloat16).max


def scale_parts(scale: float, zero_point: int | None = None) -> dict:
    """One int4 group's scale (fp32, 8 rows) and, asymmetric, its zero point packed as the folder holds it."""
    parts = {"weight_scale": torch.full((8, 1), scale)}
    if zero_point is not None:
        parts["weight_zero_point"] = pack_to_int32(torch.full((8, 1), zero_point, dtype=torch.int8), 4, packed_dim=0)
    return parts


@pytest.mark.parametrize("scale, zero_point, refused", [
    (BF16_MAX / 8, None, False),      # -8 steps reach bf16's largest exactly
    (BF16_MAX / 7.5, None, True),     # -8 steps pass it (7 would not: the symmetric range reaches -8)
    (BF16_MAX * 1.002 / 8, None, True),  # past bf16's largest, within fp32's: bf16 is what a runtime holds weights in
    (BF16_MAX / 15.1, 7, False),      # zero point 7: code -8 is 15 steps from it
    (BF16_MAX / 14.5, 7, True),
    (BF16_MAX / 14.5, -8, True),      # zero point -8: code 7 is 15 steps from it
], ids=["sym-edge", "sym-minus-8", "fp32-past-bf16", "asym-edge", "asym-15-steps", "asym-low-zero"])
def test_the_scale_check_holds_the_farthest_code_to_bf16(scale, zero_point, refused):
    """check_scales against the format's arithmetic written out: the code farthest from a group's zero point times
    its scale must be finite in bf16, whatever the scale's dtype -- else that weight dequantizes to infinity."""
    scheme = QuantScheme(4, CHANNEL, zero_point is None)
    if refused:
        with pytest.raises(KLError, match=r"^w: its scale .* past the largest finite value 3\.39e\+38; fix it$"):
            check_scales(scale_parts(scale, zero_point), scheme, "w", lambda: "fix it")
    else:
        check_scales(scale_parts(scale, zero_point), scheme, "w", lambda: "fix it")


def test_an_asymmetric_weight_without_its_zero_points_is_refused():
    """Read without them, the codes were taken as centred on 0 -- or a KeyError, not the line naming what is missing."""
    tensors = compress_weight("m", torch.randn(8, 64), QuantScheme(4, 32, False))
    del tensors["m.weight_zero_point"]
    with pytest.raises(KLError, match=r"lack \['weight_zero_point'\]; the checkpoint is incomplete"):
        decompress_weight(tensors, QuantScheme(4, 32, False))


def test_group_size_must_divide_in_dim():
    w = torch.zeros(8, 200)
    with pytest.raises(KLError, match=r"layers\.1\.w2\.weight.*group size 128.*\[8, 200\]"):
        quantize_groupwise(w, 4, 128, True, name="model.layers.1.w2.weight")
    with pytest.raises(KLError, match="multiple of 8"):
        quantize_groupwise(w, 4, 20, True)
    with pytest.raises(KLError, match=r"^weight: 3-bit integer quantization is not supported; use 4 or 8 bits$"):
        quantize_groupwise(w, 3, 8, True)
    with pytest.raises(KLError, match=r"^integer quantization supports 4 or 8 bits, got 3$"):
        QuantScheme(3, 128, True)
    for size in (0, -8, 20):   # 0 and -8 pass "% 8"; CHANNEL (-1) is the one size under 8 taken
        line = rf"group size {size} is not a positive multiple of 8 \(or -1 for per-channel\); use 32, 64 or 128$"
        with pytest.raises(KLError, match="^" + line):
            QuantScheme(4, size, True)
        with pytest.raises(KLError, match=r"^w: " + line):   # a scheme's rule, said of the tensor it was asked for
            quantize_groupwise(w, 4, size, True, name="w")
    for bad in ("nan", "inf", "-inf"):   # not the scale check's "a fine-tune that diverged?" after it
        w = torch.randn(8, 64)
        w[3, 17] = float(bad)
        with pytest.raises(KLError, match=r"^weight: the weight holds NaN or Inf values; the checkpoint is damaged -- "
                                          r"re-download it$"):
            quantize_groupwise(w, 4, 32, True)


def test_the_sizes_offered_for_partial_groups_divide_every_input_dim():
    """The largest group size that divides every weight's input dim (their gcd, a multiple of 8) and the usual ones
    under it that divide it too; where no multiple of 8 divides them all, one scale per row."""
    said = "the input dim of w"
    assert whole_groups_advice([2304, 4096, 512], "--group-size", "w") == (
        f"use --group-size 256, the largest that divides {said}, or a smaller one that does: 32, 64 or 128")
    assert whole_groups_advice([96, 192], "--group-size", "w") == (
        f"use --group-size 96, the largest that divides {said}, or a smaller one that does: 32")
    assert whole_groups_advice([8, 16], "group_size", "w") == f"use group_size 8, the largest that divides {said}"
    assert whole_groups_advice([12, 24], "group_size", "w") == (
        f"no multiple of 8 divides {said} (their greatest common divisor is 12); use group_size -1 for one scale per "
        "row")


def test_on_disk_names_dtypes_shapes():
    w = torch.randn(1024, 2304).to(torch.bfloat16)
    sym = compress_weight("model.layers.1.block_sparse_moe.experts.0.w1", w, QuantScheme(4, 128, True))
    asym = compress_weight("model.layers.1.block_sparse_moe.experts.0.w1", w, QuantScheme(4, 128, False))
    p = "model.layers.1.block_sparse_moe.experts.0.w1."
    layout = {k.removeprefix(p): (v.dtype, tuple(v.shape)) for k, v in asym.items()}
    assert layout == {"weight_packed": (torch.int32, (1024, 288)), "weight_scale": (torch.bfloat16, (1024, 18)),
                      "weight_shape": (torch.int64, (2,)), "weight_zero_point": (torch.int32, (128, 18))}
    assert set(sym) == {p + n for n in ("weight_packed", "weight_scale", "weight_shape")}
    assert sym[p + "weight_shape"].tolist() == [1024, 2304]


def test_compressed_tensors_dequantizes_a_checkpoint_from_our_config(tmp_path):
    """A small checkpoint quantized by the default policy, read back by compressed-tensors' model-free
    dequantizer from nothing but our config.json and tensors."""
    g = torch.Generator().manual_seed(4)
    shapes = {
        "model.embed_tokens.weight": (64, 256),
        "model.layers.1.self_attn.q_proj.weight": (128, 256),
        "model.layers.1.self_attn.b_proj.weight": (32, 256),
        "model.layers.1.block_sparse_moe.gate.weight": (8, 256),
        "model.layers.1.block_sparse_moe.experts.0.w1.weight": (64, 256),
        "model.layers.1.block_sparse_moe.experts.0.w2.weight": (256, 64),
        "model.layers.1.input_layernorm.weight": (256,),
        "lm_head.weight": (64, 256),
    }
    state = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    policy = policy_from_options(bits=4, group_size=32, symmetric=False).check_against(
        [(n, t.shape) for n, t in state.items()])
    tensors, expected = {}, {}
    for name, t in state.items():
        scheme = policy.scheme_for(name, t.shape)
        if scheme is None:
            tensors[name] = expected[name] = t
        else:
            prefix = name.removesuffix(".weight")
            part = compress_weight(prefix, t, scheme)
            tensors.update(part)
            expected[name] = decompress_weight(part, scheme)
    assert policy.scheme_for("lm_head.weight", (64, 256)).bits == 8
    assert "model.layers.1.self_attn.q_proj.weight_packed" in tensors
    assert "model.layers.1.block_sparse_moe.gate.weight" in tensors

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": policy.quantization_config()}))
    out = CompressedTensorsDequantizer(tmp_path, dtype=torch.bfloat16).process(dict(tensors))
    assert set(out) == set(expected)
    for name in expected:
        assert torch.equal(out[name], expected[name]), name


def group_error(w, q, scale, zp, gs, norm=2.4):
    dq = dequantize_groupwise(q, scale, zp).float()
    return (dq - w.float()).abs().pow(norm).unflatten(-1, (-1, gs)).sum(-1)


@pytest.mark.parametrize("bits,sym,gs,dtype", [(4, True, 128, torch.bfloat16), (4, False, 32, torch.float32),
                                                (8, True, 128, torch.float32)])
def test_mse_observer_never_loses_to_min_max_and_decompresses_exactly(bits, sym, gs, dtype):
    """The MSE observer's range is min-max's shrunk to the least round-trip error: per group never worse (p = 1 is
    its first candidate), better in all on heavy-tailed weights; its folder decompresses, through compressed-tensors'
    own decompressor, to exactly our dequantized weight."""
    w = (torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02).to(dtype)
    q0, s0, z0 = quantize_groupwise(w, bits, gs, sym)
    q1, s1, z1 = quantize_groupwise(w, bits, gs, sym, observer="mse")
    e0, e1 = group_error(w, q0, s0, z0, gs), group_error(w, q1, s1, z1, gs)
    assert bool((e1 <= e0 * (1 + 1e-6)).all())
    assert e1.sum() < (0.97 if bits == 4 else 1.0) * e0.sum()      # int8's steps are too fine to gain much
    scheme = QuantScheme(bits, gs, sym, observer="mse")
    ours = compress_weight("m", w, scheme)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=ct_args(bits, sym, gs))
    ct_w = PackedQuantizationCompressor.decompress({k.removeprefix("m."): v for k, v in ours.items()},
                                                   ct_scheme)["weight"]
    assert torch.equal(ct_w, dequantize_groupwise(q1, s1, z1))
    assert scheme.weights_args()["observer"] == "mse" and scheme.describe().endswith("mse")


def mse_observer_with_break(groups, bits, symmetric, patience):
    """llm-compressor's MSE observer loop written out plainly: the host reads whether a step improved any group, and
    stops after `patience` steps in a row that did not. Returns each group's scale."""
    q_min, q_max = qrange(bits)
    lo, hi = torch.clamp(groups.amin(-1), max=0.0), torch.clamp(groups.amax(-1), min=0.0)
    best, best_scale, stale = torch.full(lo.shape, float("inf")), torch.zeros_like(lo), 0
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s_lo, s_hi = lo * p, hi * p
        if symmetric:
            scale, zp = torch.max(s_lo.abs(), s_hi.abs()) / ((q_max - q_min) / 2), torch.zeros_like(lo)
        else:
            scale = (s_hi - s_lo) / (q_max - q_min)
            zp = torch.round(torch.clamp(q_min - s_lo / scale, q_min, q_max))
        q = torch.round(torch.clamp(groups / scale[..., None] + zp[..., None], q_min, q_max))
        err = ((q - zp[..., None]) * scale[..., None] - groups).abs().pow(MSE_NORM).sum(-1)
        better = err < best
        if torch.any(better):
            best[better], best_scale[better], stale = err[better], scale[better], 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_scale


def test_mse_observer_stops_where_its_patience_runs_out():
    """The search ends where llm-compressor's break does: on one-group weights, where a later shrink often does
    better after five steps that improved nothing, the scale is the break's exactly -- and such cases are among them.
    An all-zero group beside it (its error 0 at every shrink) is no improvement that keeps the search going."""
    g = torch.Generator().manual_seed(0)
    cut_short = 0
    for _ in range(100):
        w = torch.randn(1, 128, generator=g) * 0.02
        for symmetric in (True, False):
            _, scale, _ = quantize_groupwise(w, 4, 128, symmetric, observer="mse")
            with_break = mse_observer_with_break(w.unflatten(-1, (1, 128)), 4, symmetric, MSE_PATIENCE)
            assert torch.equal(scale, with_break)
            beside_zeros = quantize_groupwise(torch.cat([torch.zeros_like(w), w]), 4, 128, symmetric, observer="mse")
            assert torch.equal(beside_zeros[1][1:], scale)
            cut_short += not torch.equal(with_break, mse_observer_with_break(w.unflatten(-1, (1, 128)), 4,
                                                                             symmetric, patience=1000))
    assert cut_short >= 5


def test_an_nf4_scheme_names_the_fields_nf4_fixes_and_their_values():
    """bits=8 read "got bits=8, group_size=64, symmetric=True, observer=minmax", every field and no action (h182)."""
    with pytest.raises(KLError, match=r"^nf4 is 4-bit, symmetric, in blocks of 64, min-max; got bits=8, "
                                      r"symmetric=False -- pass bits=4, symmetric=True$"):
        QuantScheme(8, 64, False, kind="nf4")
    with pytest.raises(KLError, match=r"^nf4 is 4-bit, symmetric, in blocks of 64, min-max; got group_size=128 -- pass "
                                      r"group_size=64$"):   # taken, it wrote blocks of 64 all the same
        QuantScheme(4, 128, True, kind="nf4")


def test_observer_must_be_known():
    """One refusal wherever an observer is taken (unsupported_observer), offering OBSERVERS."""
    with pytest.raises(KLError, match=r"^observer 'histogram' is not supported; use minmax or mse$"):
        QuantScheme(4, 128, True, observer="histogram")
    with pytest.raises(KLError, match=r"^nf4 is 4-bit, symmetric, in blocks of 64, min-max; got observer='mse' -- pass "
                                      r"observer='minmax'$"):
        QuantScheme(4, 64, True, kind="nf4", observer="mse")
    with pytest.raises(KLError, match=r"^w: observer 'histogram' is not supported; use minmax or mse$"):
        quantize_groupwise(torch.zeros(4, 128), 4, 128, True, name="w", observer="histogram")
    with pytest.raises(KLError, match=r"^quantization kind 'fp8' is unknown; use 'int' or 'nf4'$"):
        QuantScheme(kind="fp8")
