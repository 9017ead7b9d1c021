"""NF4 through bitsandbytes on CPU: the serialization transformers reads, and its quantization_config."""
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from klconvert.errors import KLError
from klconvert.quant import compress_nf4, decompress_nf4, policy_from_options

P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_roundtrip_through_safetensors(tmp_path, dtype):
    w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    tensors = compress_nf4(P, w)
    assert {k.removeprefix(P + ".") for k in tensors} == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4"}
    assert tensors[P + ".weight"].dtype == torch.uint8 and tensors[P + ".weight"].shape == (256 * 512 // 2, 1)
    assert tensors[P + ".weight.absmax"].dtype == torch.uint8          # double-quantized absmax
    assert tensors[P + ".weight.absmax"].shape == (256 * 512 // 64,)
    save_file(tensors, tmp_path / "nf4.safetensors")                    # no shared storage
    loaded = load_file(tmp_path / "nf4.safetensors")

    dq = decompress_nf4(loaded)
    assert dq.dtype == dtype and dq.shape == w.shape
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(dq, bnbf.dequantize_4bit(packed, state))         # serialization loses nothing
    rel = ((dq.float() - w.float()).norm() / w.float().norm()).item()
    assert 0.05 < rel < 0.11, rel

    # the path transformers' Bnb4bitDeserialize takes for a pre-quantized checkpoint
    stats = {k.removeprefix(P + "."): v for k, v in loaded.items() if k != P + ".weight"}
    param = bnb.nn.Params4bit.from_prequantized(data=loaded[P + ".weight"], quantized_stats=stats,
                                                requires_grad=False, device="cpu")
    assert param.quant_state.shape == w.shape and param.quant_state.dtype == dtype
    assert torch.equal(bnbf.dequantize_4bit(param.data, param.quant_state), dq)


def test_nf4_of_a_last_block_short_of_64_reads_as_bitsandbytes_wrote_it():
    """klconvert writes whole blocks only, but bitsandbytes (and a folder it wrote) ends a weight of 150 values with a
    block of 22: three absmax, each block's and the nested one's counts rounded up."""
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.uint8)
    tensors = {P + ".weight": packed, **{f"{P}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert torch.equal(decompress_nf4(tensors), bnbf.dequantize_4bit(packed, state))


def test_nf4_without_double_quant():
    w = torch.randn(64, 128)
    tensors = compress_nf4(P, w, double_quant=False)
    assert P + ".weight.nested_absmax" not in tensors and tensors[P + ".weight.absmax"].dtype == torch.float32
    assert decompress_nf4(tensors).shape == (64, 128)


def test_nf4_errors():
    with pytest.raises(KLError, match="conv1d.*not a 2-D"):
        compress_nf4("model.layers.0.self_attn.q_conv1d", torch.zeros(64, 1, 4))
    # compress_nf4's own refusal of what the policy refuses before it: bitsandbytes would end it with a short block
    with pytest.raises(KLError, match=rf"^{P}\.weight: 150 elements do not fill whole NF4 blocks of 64; leave it out"):
        compress_nf4(P, torch.randn(3, 50))
    with pytest.raises(KLError, match=rf"^{P}\.weight: 1,500 elements do not fill whole NF4 blocks of 64"):
        compress_nf4(P, torch.randn(3, 500))   # a count in prose, with ','
    for bad in ("nan", "inf"):   # bitsandbytes writes them into the absmax: a folder that dequantizes to NaN
        w = torch.randn(64, 64)
        w[5, 7] = float(bad)
        with pytest.raises(KLError, match=rf"^{P}\.weight: the weight holds NaN or Inf values; the checkpoint is "
                                          "damaged -- re-download it$"):
            compress_nf4(P, w)
    with pytest.raises(KLError, match="lack"):
        decompress_nf4({P + ".weight": torch.zeros(8, 1, dtype=torch.uint8)})


def test_nf4_of_weights_its_quant_state_cannot_hold_is_refused_naming_the_weight():
    """Finite weights whose NF4 state is not: double quantization stores each block's absmax less their mean, which
    two blocks near bf16's largest value sum past fp32's range -- the nested absmax and offset were written as inf, in
    a folder its reader then called damaged. Past bf16's largest value (an fp32 weight) a block dequantizes to
    infinity in the runtime's bf16, as check_scales refuses for the int schemes."""
    w = torch.zeros(64, 128, dtype=torch.bfloat16)
    w[0, 0] = w[0, 64] = 0.99 * torch.finfo(torch.bfloat16).max
    with pytest.raises(KLError, match=rf"^{P}\.weight: its NF4 quant state overflows: .* \(up to 3\.35e\+38\) sum past "
                                      r"fp32's range: the int scheme holds them \(leave out --scheme nf4\)$"):
        compress_nf4(P, w)
    w = torch.zeros(64, 128)
    w[1, 70] = 3.4e38
    with pytest.raises(KLError, match=rf"^{P}\.weight: its NF4 block 3 \(of 64 values\) dequantizes a weight to "
                                      r"3\.4e\+38, past the largest finite value 3\.39e\+38; the source's weights"):
        compress_nf4(P, w, double_quant=False)


def _state(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _damaged(tensors: dict, part: str, value) -> dict:
    return {**tensors, f"{P}.{part}": value}


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_damaged_nf4_quant_state_is_refused_before_bitsandbytes_reads_it(double_quant):
    """bitsandbytes trusts every size in the state: an absmax cut short is read past its end (exit 0, garbage)."""
    tensors = compress_nf4(P, torch.randn(128, 128), double_quant=double_quant)
    state = P + ".weight.quant_state.bitsandbytes__nf4"
    fields = bytes(tensors[state].tolist()).decode()
    cases = [
        (_damaged(tensors, "weight.absmax", tensors[P + ".weight.absmax"][:1].clone()),
         "absmax holds 1 value where its shape needs 256 values"),
        (_damaged(tensors, "weight.quant_map", tensors[P + ".weight.quant_map"][:4].clone()), "quant_map holds 4"),
        ({**tensors, state: _state("not json")}, "is not JSON"),
        ({**tensors, state: _state("[" * 4000)}, "is not JSON"),
        ({**tensors, state: _state("[1, 2]")}, "is not a JSON object"),
        ({**tensors, state: _state(fields.replace("{", '{"blocksize": 4096, ', 1))},
         r"is not JSON \(key 'blocksize' appears twice in one object"),
        ({**tensors, state: _state(fields.replace('"blocksize": 64', '"blocksize": 0'))}, "do not describe"),
        ({**tensors, state: _state(fields.replace("[128, 128]", "[128, 64]"))}, "do not describe its 16,384"),
        ({**tensors, state: _state('{"quant_type": "nf4"}')}, "do not describe"),
        ({**tensors, state: _state(fields.replace('"nf4"', '"fp4"'))}, "do not describe"),   # another code book
        ({**tensors, state: _state(fields.replace('"blocksize": 64', '"blocksize": 64.0'))}, "do not describe"),
        ({**tensors, state: _state(fields + " " * 5000)}, "is 5,... bytes, far more than its few fields"),
    ]
    if double_quant:
        cases.append((_damaged(tensors, "weight.nested_absmax", tensors[P + ".weight.nested_absmax"][:0].clone()),
                      "nested_absmax holds 0 values where its shape needs 1 value"))
        for offset in ('"x"', "1" + "0" * 400, "NaN", "1e39"):   # an int of 400 digits overflowed a float: a traceback
            cases.append(({**tensors, state: _state(re.sub(r'"nested_offset": [^,}]+', f'"nested_offset": {offset}',
                                                           fields))}, "do not describe"))
        cases.append(({**tensors, state: _state(fields.replace("{", '{"extra": 1, ', 1))},
                      "has fields extra beyond bitsandbytes' quant_type, blocksize, dtype, shape, nested_blocksize"))
    else:
        cases.append(({**tensors, state: _state(fields.replace("{", '{"nested_offset": 0.5, ', 1))},
                      "has fields nested_offset beyond bitsandbytes' quant_type, blocksize, dtype, shape;"))
    for damaged, message in cases:
        with pytest.raises(KLError, match=rf"^q_proj here: NF4 quant state .*{message}.* the checkpoint is damaged -- "
                                          "re-run the conversion if klconvert wrote it, or download it again$"):
            decompress_nf4(damaged, "q_proj here")
    assert decompress_nf4(tensors).shape == (128, 128)                    # the undamaged parts still read
    flat = {**tensors, state: _state(fields.replace("[128, 128]", "[1, 16384]"))}
    assert decompress_nf4(flat).shape == (1, 16384)                       # its values fill [1, 16384] too
    with pytest.raises(KLError, match=r"NF4 quant state says shape \[1, 16384\], but config\.json makes the weight "
                                      r"\[128, 128\]"):
        decompress_nf4(flat, "q_proj here", (128, 128))                     # but config.json says otherwise


def test_nf4_that_dequantizes_to_nan_is_refused():
    tensors = compress_nf4(P, torch.randn(128, 128), double_quant=False)
    absmax = tensors[P + ".weight.absmax"].clone()
    absmax[3] = float("inf")
    with pytest.raises(KLError, match="q_proj here: its NF4 tensors dequantize to NaN or Inf"):
        decompress_nf4(_damaged(tensors, "weight.absmax", absmax), "q_proj here")


def test_nf4_quantization_config_and_skip_list():
    policy = policy_from_options(scheme="nf4")
    cfg = policy.quantization_config()
    hf = BitsAndBytesConfig.from_dict(dict(cfg))
    assert hf.load_in_4bit and hf.bnb_4bit_quant_type == "nf4" and hf.bnb_4bit_use_double_quant
    assert hf.bnb_4bit_compute_dtype == torch.bfloat16
    skip = cfg["llm_int8_skip_modules"]
    # transformers' own matcher, on both the released and the transformers-native module names
    kept = ["lm_head", "model.layers.1.block_sparse_moe.gate", "model.layers.1.mlp.gate",
            "model.layers.0.self_attn.g_a_proj", "model.layers.0.self_attn.f_b_proj",
            "model.layers.0.self_attn.forget_gate.f_b_proj", "model.layers.0.self_attn.g_b_proj"]
    converted = ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.kv_b_proj",
                 "model.layers.0.self_attn.b_proj", "model.layers.0.self_attn.forget_gate.f_a_proj",
                 "model.layers.0.mlp.gate_proj", "model.layers.1.block_sparse_moe.shared_experts.down_proj",
                 "model.layers.3.self_attn.o_proj"]
    for name in kept:
        assert not should_convert_module(name, skip), name
    for name in converted:
        assert should_convert_module(name, skip), name
    assert policy.scheme_for("lm_head.weight", (163840, 2304)) is None
    assert policy.scheme_for("model.layers.0.self_attn.q_proj.weight", (4096, 2304)).kind == "nf4"
