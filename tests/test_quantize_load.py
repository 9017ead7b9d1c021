"""A quantized folder runs: `klconvert.load(OUT)` logits stay near the source's; `klconvert run --model OUT` works."""
from __future__ import annotations

import pytest
import torch

import klconvert
from klconvert.quantize import quantize
from testkit import rel_error, run_cli, shown_lines

@pytest.mark.parametrize("bits,bound", [(8, 2e-2), (4, 0.25)])
def test_logits_stay_near_the_source(trained_like, tmp_path, bits, bound):
    out = quantize(trained_like, tmp_path / "q", bits=bits, group_size=32, progress=False).path
    ids = torch.arange(1, 33).view(1, 32)
    want = klconvert.load(trained_like, device="cpu", max_context=64).forward(ids)
    got = klconvert.load(out, device="cpu", max_context=64).forward(ids)
    err = rel_error(got, want)
    assert bound / 10 < err < bound, err  # near, and really quantized


@pytest.mark.slow
def test_run_the_quantized_folder(tiny_released, tmp_path, capsys):
    out = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, progress=False).path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox")
    code, stdout, err = run_cli(capsys, "run", "--model", out, "--prompt-file", prompt, "--max-new-tokens", "6",
                                "--device", "cpu")
    assert code == 0, err
    assert stdout.endswith("\n") and len(stdout) > 1
    assert "decode" in shown_lines(err)[-1] and "plan: cpu" in shown_lines(err)[-1]
