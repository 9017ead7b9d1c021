"""bench/decode_cpu.py and bench/onnx_cpu.py at their edges: a count of 0 or less, and a folder they cannot read, are
one line and exit 2 (--repeats 0 printed 0.0 tokens/s with exit 0, --new-tokens 0 a ZeroDivisionError or a false
FAILED, --threads 0 a RuntimeError, a missing --model a KLError's traceback), and onnx_cpu.py times an export only
beside the folder it was exported from (an export of another model was timed as if one model's)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klconvert.models import bundled_dir
from klconvert.onnx.export import export_onnx
from klconvert.quantize import quantize

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _one_line(proc: subprocess.CompletedProcess, script: str, needle: str) -> None:
    assert proc.returncode == 2 and not proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and needle in last, proc.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the bundled model's int4 folder, its ONNX export)."""
    root = tmp_path_factory.mktemp("onnx")
    quantized = quantize(bundled_dir(), root / "q4", bits=4, group_size=32, progress=False).path
    export_onnx(quantized, root / "onnx")
    return quantized, root / "onnx"


@pytest.mark.slow
@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--new-tokens", "-3"), ("--threads", "0")])
def test_decode_cpu_refuses_counts_below_one(tmp_path, flag, value):
    _one_line(_bench("decode_cpu.py", flag, value, cwd=tmp_path), "decode_cpu.py", f"argument {flag}: '{value}'")


@pytest.mark.slow
def test_decode_cpu_names_a_missing_model_in_one_line(tmp_path):
    _one_line(_bench("decode_cpu.py", "--model", "missing", "--new-tokens", "2", cwd=tmp_path), "decode_cpu.py",
              "missing")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--repeats", "--new-tokens", "--threads"])
def test_onnx_cpu_refuses_counts_below_one(exported, tmp_path, flag):
    model, onnx = exported
    proc = _bench("onnx_cpu.py", "--model", str(model), "--onnx", str(onnx), flag, "0", cwd=tmp_path)
    _one_line(proc, "onnx_cpu.py", f"argument {flag}: '0'")


@pytest.mark.slow
def test_onnx_cpu_times_an_export_beside_its_own_folder_only(exported, tmp_path):
    model, onnx = exported
    proc = _bench("onnx_cpu.py", "--model", str(model), "--onnx", str(onnx), "--new-tokens", "2", "--repeats", "1",
                  cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("check: 2 decoded tokens"), proc.stderr[-2000:]
    # the bf16 model the export's int4 was made from: the same vocabulary and prompt, other logits
    proc = _bench("onnx_cpu.py", "--model", "tiny", "--onnx", str(onnx), "--new-tokens", "2", cwd=tmp_path)
    _one_line(proc, "onnx_cpu.py", f"--onnx {onnx}: its logits over the prompt differ from --model tiny's by ")
    assert "it was not exported from that folder" in proc.stderr
    _one_line(_bench("onnx_cpu.py", "--model", str(model), "--onnx", str(model), cwd=tmp_path), "onnx_cpu.py",
              "no genai_config.json here")
