"""A quantized folder runs: `klconvert.load(OUT)` logits stay near the source's; `klconvert run --model OUT` works."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import klconvert
from klconvert.quantize import quantize
from quantize_helpers import run_cli, shown_lines

RESIDUAL_OUTPUTS = ("o_proj.weight", "w2.weight", "down_proj.weight")  # what each layer adds to the residual


@pytest.fixture(scope="module")
def trained_like(tiny_released, tmp_path_factory):
    """The tiny checkpoint made to behave like a trained model under small weight noise.

    As synthesized, its routers have near ties (one bf16 ulp in a layer-0 q_proj flips an expert choice of a
    later token and moves the logits by 35%) and every layer adds as much as the residual it reads. Here the
    correction bias pins each layer's four experts with a wide margin, and the residual-branch outputs are
    scaled by 1/4, so logit errors measure quantization rather than chaos.
    """
    folder = shutil.copytree(tiny_released, tmp_path_factory.mktemp("calm") / "calm")
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("e_score_correction_bias"):
                layer = int(name.split(".")[2])
                tensors[name] = torch.zeros_like(t).index_fill_(0, (torch.arange(4) + 4 * layer) % t.numel(), 10.0)
            elif name.endswith(RESIDUAL_OUTPUTS):
                tensors[name] = (t.float() / 4).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("bits,bound", [(8, 2e-2), (4, 0.25)])
def test_logits_stay_near_the_source(trained_like, tmp_path, bits, bound):
    out = quantize(trained_like, tmp_path / "q", bits=bits, group_size=32, progress=False).path
    ids = torch.arange(1, 33).view(1, 32)
    want = klconvert.load(trained_like, device="cpu", max_context=64).forward(ids)
    got = klconvert.load(out, device="cpu", max_context=64).forward(ids)
    err = relative_error(want, got)
    assert bound / 10 < err < bound, err  # near, and really quantized


def test_run_the_quantized_folder(tiny_released, tmp_path, capsys):
    out = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, progress=False).path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox")
    code, stdout, err = run_cli(capsys, "run", "--model", out, "--prompt-file", prompt, "--max-new-tokens", "6",
                                "--device", "cpu")
    assert code == 0, err
    assert stdout.endswith("\n") and len(stdout) > 1
    assert "decode" in shown_lines(err)[-1] and "plan: cpu" in shown_lines(err)[-1]
