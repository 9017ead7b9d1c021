"""Reading quantized folders: compressed-tensors pack-quantized and bitsandbytes nf4 weights come back dequantized."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import klconvert
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.quant import compress_nf4, compress_weight, policy_from_options


def write_quantized(src_folder, out, **options):
    """A quantized copy of `src_folder` made with klconvert.quant directly (one shard), and the packed tensors."""
    src = open_checkpoint(src_folder)
    policy = policy_from_options(group_size=32, **options).check_against(
        [(n, s.shape) for n, s in src.expected.items()])
    tensors, packed = {}, {}
    for name, spec in src.expected.items():
        scheme = policy.scheme_for(name, spec.shape)
        if scheme is None:
            tensors[name] = src.get(name)
            continue
        module = name.removesuffix(".weight")
        parts = compress_nf4(module, src.get(name)) if scheme.kind == "nf4" else \
            compress_weight(module, src.get(name), scheme)
        tensors.update(parts)
        packed[name] = (parts, scheme)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_folder / "config.json").read_text())
    config["quantization_config"] = policy.quantization_config()
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(src_folder / f, out / f)
    return packed


@pytest.mark.parametrize("options", [dict(bits=4, symmetric=False), dict(bits=8), dict(scheme="nf4")],
                         ids=["int4-asym", "int8-sym", "nf4"])
def test_packed_weights_read_back_dequantized(tiny_released, tmp_path, options):
    from klconvert.quant import decompress_nf4, decompress_weight

    packed = write_quantized(tiny_released, tmp_path / "q", **options)
    ckpt, src = open_checkpoint(tmp_path / "q"), open_checkpoint(tiny_released)
    assert ckpt.quant_method == ("bitsandbytes" if options.get("scheme") == "nf4" else "compressed-tensors")
    assert set(packed) == {n for n, s in ckpt.sources.items() if isinstance(s, QuantizedSource)}
    for name, (parts, scheme) in packed.items():
        want = decompress_nf4(parts) if scheme.kind == "nf4" else decompress_weight(parts, scheme)
        got = ckpt.get(name)
        assert got.shape == src.expected[name].shape and torch.equal(got, want), name
        err = ((got.float() - src.get(name).float()).norm() / src.get(name).float().norm()).item()
        assert err < {4: 0.15, 8: 0.01}[scheme.bits if scheme.kind == "int" else 4], (name, err)
    engine = klconvert.load(tmp_path / "q", device="cpu", max_context=64)
    logits = engine.forward(torch.arange(40).view(1, 40))
    assert torch.isfinite(logits).all()


def test_missing_scale_is_one_clear_error(tiny_released, tmp_path):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    victim = "model.layers.1.self_attn.q_proj.weight_scale"
    del tensors[victim]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(klconvert.KLError, match=r"q_proj\.weight lacks weight_scale"):
        open_checkpoint(tmp_path / "q")


def _damage(folder, edit) -> None:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


Q_PROJ = "model.layers.1.self_attn.q_proj"


def test_weight_shape_values_must_say_the_configs_shape(tiny_released, tmp_path):
    """weight_shape's values reach the unpacking (and the ONNX export): held to config.json's shape on reading."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight_shape", torch.tensor([128, 64])))
    ckpt = open_checkpoint(tmp_path / "q")
    with pytest.raises(klconvert.KLError, match=rf"{Q_PROJ}\.weight_shape says \[128, 64\], but config\.json makes "
                                                rf"{Q_PROJ}\.weight \[\d+, \d+\]; the checkpoint is damaged"):
        ckpt.get(f"{Q_PROJ}.weight")


@pytest.mark.parametrize("zero", [torch.zeros(3, 7, dtype=torch.int32), None], ids=["misshapen", "bf16"])
def test_a_zero_point_that_does_not_fit_its_scale_is_refused(tiny_released, tmp_path, zero):
    write_quantized(tiny_released, tmp_path / "q", bits=4, symmetric=False)
    name = f"{Q_PROJ}.weight_zero_point"
    _damage(tmp_path / "q", lambda t: t.__setitem__(name, zero if zero is not None else t[name].bfloat16()))
    with pytest.raises(klconvert.KLError, match=rf"{Q_PROJ}.*weight_zero_point .* does not fit its scale"):
        open_checkpoint(tmp_path / "q")


def test_unknown_quant_method_is_refused(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(klconvert.KLError, match="'gptq' is not supported"):
        open_checkpoint(tiny_copy)
