"""klconvert.devices: the one definition of where klconvert runs and quantizes, held by quantize, eval, load and the
CLI's --device (cpu, cuda or cuda:N in every command that takes it)."""
from __future__ import annotations

import pytest
import torch

from klconvert.devices import DEVICE_NAMES, checked_device
from klconvert.errors import KLError
from testkit import assert_one_line_error, run_cli

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs (cuda:0 and cuda:1): enough to check a device against, nothing runs on them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_gpu_torch_sees_is_taken(two_gpus):
    assert checked_device(None) == torch.device("cuda")
    assert checked_device("cuda") == torch.device("cuda")
    assert checked_device("cuda:1") == checked_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    assert checked_device("cpu") == checked_device("cpu:0") == torch.device("cpu")


@pytest.mark.parametrize("device, named", [("cuda:2", "'cuda:2'"), ("cuda:7", "'cuda:7'"),
                                           (torch.device("cuda", 7), "'cuda:7'"),
                                           # torch.device keeps N in a byte: it read cuda:255 as cuda (the current
                                           # GPU, taken), cuda:128 as cuda:-128 (taken), a longer N as no device
                                           ("cuda:128", "'cuda:128'"), ("cuda:255", "'cuda:255'"),
                                           ("cuda:99999999999999999999", "'cuda:99999999999999999999'")])
def test_a_gpu_past_the_count_is_refused(two_gpus, device, named):
    """torch took cuda:7 on a 2-GPU host, and the first tensor moved there failed with "invalid device ordinal"."""
    with pytest.raises(KLError, match=rf"^device={named} \(--device\): torch sees 2 CUDA devices \(cuda:0 to "
                                      r"cuda:1\); pick one of those \(CUDA_VISIBLE_DEVICES decides which GPUs it "
                                      r"sees\)$"):
        checked_device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_without_cuda_is_refused(no_gpu, device):
    assert checked_device(None) == torch.device("cpu")
    with pytest.raises(KLError, match=rf"^device='{device}' \(--device\): no CUDA device is visible to torch; use "
                                      r"cpu$"):
        checked_device(device)


@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "CUDA", "cuda:-1", "cuda:01", "cuda:", " cuda", "cpu:3",
                                    "cuda:\uff11", "", 0, 1.5, True, torch.device("meta")])
def test_what_is_no_device_of_klconvert_is_refused(device):
    with pytest.raises(KLError, match=r"^device=.* \(--device\) is not supported; use cpu, cuda or cuda:N \(the "
                                      r"N-th GPU torch sees\)$"):
        checked_device(device)


def test_the_command_line_names_the_devices(capsys):
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0 and f"--device [{'|'.join(DEVICE_NAMES)}]" in out


def test_quantize_refuses_a_gpu_past_the_count_before_any_work(two_gpus, tiny_released, tmp_path):
    from klconvert.quantize import quantize

    with pytest.raises(KLError, match=r"^device='cuda:7' \(--device\): torch sees 2 CUDA devices"):
        quantize(tiny_released, tmp_path / "q", device="cuda:7", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_gpu_past_the_count_before_any_model_loads(two_gpus, tiny_released, monkeypatch):
    """load took cuda:7 unchecked (its own copy of the device rule) and failed deep in torch."""
    import klconvert.runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "Checkpoint", lambda *a: pytest.fail("a checkpoint was read"))
    with pytest.raises(KLError, match=r"^device='cuda:7' \(--device\): torch sees 2 CUDA devices"):
        engine_module.load(tiny_released, device="cuda:7")


def test_eval_refuses_a_gpu_past_the_count_before_any_model_loads(two_gpus, tiny_released, monkeypatch):
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran"))
    with pytest.raises(KLError, match=r"^device='cuda:7' \(--device\): torch sees 2 CUDA devices"):
        evaluate_module.evaluate(tiny_released, tiny_released, TEXT, max_tokens=16, device="cuda:7")


def commands_with_device(folder, tmp_path) -> dict[str, list]:
    """Each command that takes --device, with what else it needs (its output, if any, in tmp_path/out)."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return {"run": ["run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2"],
            "eval": ["eval", "--model", folder, "--reference", folder, "--text-file", text, "--max-tokens", "16"],
            "quantize": ["quantize", folder, tmp_path / "out"],
            "pull-and-quantize": ["pull-and-quantize", "--model", folder, "--out", tmp_path / "out"]}


def test_every_command_with_device_is_listed():
    from klconvert.cli import cli

    takers = sorted(name for name, command in cli.commands.items() if any(p.name == "device" for p in command.params))
    assert takers == ["eval", "pull-and-quantize", "quantize", "run"]


@pytest.mark.parametrize("command", ["run", "eval", "quantize", "pull-and-quantize"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_the_command_line_takes_cuda_n_and_refuses_it_without_a_gpu(no_gpu, tiny_released, tmp_path, capsys,
                                                                     command, device):
    """--device was a choice of cpu and cuda: cuda:1 refused on a many-GPU host, where only Python could pick it."""
    args = commands_with_device(tiny_released, tmp_path)[command]
    assert_one_line_error(*run_cli(capsys, *args, "--device", device)[::2],
                          f"klconvert: error: device='{device}' (--device): no CUDA device is visible to torch; use "
                          "cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "eval", "quantize", "pull-and-quantize"])
def test_the_command_line_refuses_a_gpu_past_the_count(two_gpus, tiny_released, tmp_path, capsys, command):
    args = commands_with_device(tiny_released, tmp_path)[command]
    assert_one_line_error(*run_cli(capsys, *args, "--device", "cuda:2")[::2],
                          "klconvert: error: device='cuda:2' (--device): torch sees 2 CUDA devices (cuda:0 to cuda:1); "
                          "pick one of those")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "eval", "quantize", "pull-and-quantize"])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1"])
def test_the_command_line_refuses_no_device_as_it_refuses_a_bad_value(tiny_released, tmp_path, capsys, command,
                                                                       device):
    """A name that is no device is a bad value of --device, refused as the parser refuses any (it was the Python API's
    line, device='tpu' (--device), without the command or its --help)."""
    args = commands_with_device(tiny_released, tmp_path)[command]
    assert_one_line_error(*run_cli(capsys, *args, "--device", device)[::2],
                          f"klconvert: error: klconvert {command}: Invalid value for '--device': '{device}' is not "
                          f"supported; use cpu, cuda or cuda:N (the N-th GPU torch sees) (see `klconvert {command} "
                          "--help`)")


def test_onnxruntime_refuses_any_gpu(capsys):
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", "tiny", "--engine", "onnxruntime", "--prompt", "hi",
                                          "--device", "cuda:1")[::2])
    assert "--device cuda:1 is a flag of klconvert's runtime" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_eval_on_cuda_without_one_is_one_line(tiny_released, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert_one_line_error(*run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released,
                                   "--text-file", text, "--device", "cuda")[::2],
                          "device='cuda' (--device): no CUDA device is visible to torch; use cpu")
