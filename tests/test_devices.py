"""klconvert.devices: the one definition of where klconvert runs and quantizes, held by quantize, eval and the CLI."""
from __future__ import annotations

import pytest
import torch

from klconvert.devices import DEVICE_TYPES, checked_device
from klconvert.errors import KLError
from testkit import assert_one_line_error, run_cli

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs (cuda:0 and cuda:1): enough to check a device against, nothing runs on them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_gpu_torch_sees_is_taken(two_gpus):
    assert checked_device(None) == torch.device("cuda")
    assert checked_device("cuda") == torch.device("cuda")
    assert checked_device("cuda:1") == checked_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    assert checked_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda:2", "cuda:7", torch.device("cuda", 7)])
def test_a_gpu_past_the_count_is_refused(two_gpus, device):
    """torch took cuda:7 on a 2-GPU host, and the first tensor moved there failed with "invalid device ordinal"."""
    with pytest.raises(KLError, match=rf"^--device {device}: torch sees 2 CUDA devices \(cuda:0 to cuda:1\); pick one "
                                      r"of those \(CUDA_VISIBLE_DEVICES decides which GPUs it sees\)$"):
        checked_device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_without_cuda_is_refused(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checked_device(None) == torch.device("cpu")
    with pytest.raises(KLError, match=rf"^--device {device}: no CUDA device is visible to torch; use --device cpu$"):
        checked_device(device)


@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "CUDA", "cuda:-1", "cpu:3", "", 0, 1.5])
def test_what_is_no_device_of_klconvert_is_refused(device):
    with pytest.raises(KLError, match=r"^--device .* is not supported; use --device cpu or --device cuda \(from "
                                      r"Python, cuda:N also picks the N-th GPU\)$"):
        checked_device(device)


def test_the_command_line_offers_the_device_types():
    from klconvert.cli import DEVICE

    assert tuple(DEVICE.choices) == DEVICE_TYPES


def test_quantize_refuses_a_gpu_past_the_count_before_any_work(two_gpus, tiny_released, tmp_path):
    from klconvert.quantize import quantize

    with pytest.raises(KLError, match=r"^--device cuda:7: torch sees 2 CUDA devices"):
        quantize(tiny_released, tmp_path / "q", device="cuda:7", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_gpu_past_the_count_before_any_model_loads(two_gpus, tiny_released, monkeypatch):
    """load took cuda:7 unchecked (its own copy of the device rule) and failed deep in torch."""
    import klconvert.runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "Checkpoint", lambda *a: pytest.fail("a checkpoint was read"))
    with pytest.raises(KLError, match=r"^--device cuda:7: torch sees 2 CUDA devices"):
        engine_module.load(tiny_released, device="cuda:7")


def test_eval_refuses_a_gpu_past_the_count_before_any_model_loads(two_gpus, tiny_released, monkeypatch):
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran"))
    with pytest.raises(KLError, match=r"^--device cuda:7: torch sees 2 CUDA devices"):
        evaluate_module.evaluate(tiny_released, tiny_released, TEXT, max_tokens=16, device="cuda:7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_eval_on_cuda_without_one_is_one_line(tiny_released, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert_one_line_error(*run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released,
                                   "--text-file", text, "--device", "cuda")[::2],
                          "--device cuda: no CUDA device is visible to torch; use --device cpu")
