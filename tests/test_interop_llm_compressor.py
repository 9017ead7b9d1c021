"""A folder in llm-compressor's naming runs in klconvert and predicts exactly what ours does. llm-compressor (0.14
pins transformers <= 5.17) cannot share this venv, so its naming is made by renaming our own output."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import klconvert
from klconvert.checkpoint.folder_files import INDEX_FILE
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.errors import KLError
from klconvert.quantize import quantize

# (pattern, replacement) applied in order to each tensor name, per layout llm-compressor saves in: its linearized
# experts (modeling/moe/linear_experts.py) are gate/up/down_proj per expert; saved in the released layout,
# transformers' `mlp.` -> `block_sparse_moe.` rename also catches the dense MLP of layer 0.
EXPERTS = [(r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."), (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
           (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj.")]
LLM_COMPRESSOR_NAMES = {
    "released": [*EXPERTS, (r"^(model\.layers\.0)\.mlp\.", r"\1.block_sparse_moe.")],
    "transformers": [*EXPERTS, (r"\.block_sparse_moe\.", ".mlp."),
                     (r"\.self_attn\.(f_a_proj|f_b_proj|A_log|dt_bias)", r".self_attn.forget_gate.\1")],
}
IDS = torch.arange(1, 41).view(1, 40)


def rename_like_llm_compressor(folder, out, layout: str):
    """A copy of `folder` with its tensors renamed as llm-compressor saves them, in one shard; in the transformers
    layout the KDA convs are stacked too, as transformers saves them."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", INDEX_FILE))
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    renamed = {}
    for name, t in tensors.items():
        for pattern, replacement in LLM_COMPRESSOR_NAMES[layout]:
            name = re.sub(pattern, replacement, name)
        renamed[name] = t
    if layout == "transformers":
        for q in [n for n in renamed if n.endswith(".q_conv1d.weight")]:
            prefix = q.removesuffix("q_conv1d.weight")
            renamed[prefix + "conv1d.weight"] = torch.cat([renamed.pop(prefix + f"{x}_conv1d.weight") for x in "qkv"])
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return renamed


@pytest.fixture(scope="module", params=[dict(bits=4), dict(bits=4, symmetric=False), dict(bits=8)],
                ids=["int4-sym", "int4-asym", "int8"])
def ours(request, trained_like, tmp_path_factory):
    return quantize(trained_like, tmp_path_factory.mktemp("ours") / "q", device="cpu", progress=False,
                    **request.param).path


@pytest.mark.parametrize("layout", LLM_COMPRESSOR_NAMES)
def test_llm_compressor_naming_runs_and_equals_ours(ours, layout, tmp_path):
    names = rename_like_llm_compressor(ours, tmp_path / "llmc", layout)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_packed" in names or layout == "released"
    assert "model.layers.1.block_sparse_moe.experts.0.gate_proj.weight_packed" in names or layout != "released"
    assert ("model.layers.0.block_sparse_moe.gate_proj.weight_packed" in names) == (layout == "released")
    theirs = open_checkpoint(tmp_path / "llmc")
    assert set(theirs.sources) == set(open_checkpoint(ours).sources)
    want = klconvert.load(ours, device="cpu", max_context=64).forward(IDS)
    got = klconvert.load(tmp_path / "llmc", device="cpu", max_context=64).forward(IDS)
    assert torch.equal(got, want)


def test_a_name_given_twice_is_one_clear_error(ours, tmp_path):
    names = rename_like_llm_compressor(ours, tmp_path / "llmc", "released")
    extra = {n.replace("experts.0.gate_proj", "experts.0.w1"): t.clone() for n, t in names.items()
             if ".layers.1.block_sparse_moe.experts.0.gate_proj." in n}
    save_file({**names, **extra}, tmp_path / "llmc" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KLError, match=r"experts\.0\.(w1|gate_proj)\.weight' and '.*experts\.0\.(w1|gate_proj)\.weight' "
                                      r"both provide model\.layers\.1\.block_sparse_moe\.experts\.0\.w1\.weight"):
        open_checkpoint(tmp_path / "llmc")


def test_a_stacked_packed_weight_is_refused(ours, tmp_path):
    names = rename_like_llm_compressor(ours, tmp_path / "llmc", "transformers")
    names = {n.replace("mlp.experts.0.gate_proj.", "mlp.experts.gate_up_proj."): t for n, t in names.items()}
    save_file(names, tmp_path / "llmc" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "llmc" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with pytest.raises(KLError, match=r"mlp\.experts\.gate_up_proj\.weight' is stacked from 32 weights"):
        open_checkpoint(tmp_path / "llmc")
