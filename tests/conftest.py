"""Shared set-up: Triton's CPU interpreter where there is no GPU, and tiny random checkpoints in the exact
released (and transformers) format, made per session."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
# as klconvert.onnx sets it for the CLI and the API, before a test file imports onnxruntime itself: else its
# telemetry writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime and $TMPDIR/.ses
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402

from calm_checkpoint import calm_copy  # noqa: E402
from klconvert.synth.checkpoint import synth  # noqa: E402


def _fix_interpreter_bf16():
    """The interpreter keeps bf16 as raw uint16: tl.dot multiplies the raw bits and fp32 -> bf16 truncates.
    Upcast dot operands exactly and round to nearest even, as the GPU does."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    cast, dot = InterpreterBuilder.cast_impl, InterpreterBuilder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, *args):
        a, b = (cast(self, t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return dot(self, a, b, d, *args)

    InterpreterBuilder.cast_impl, InterpreterBuilder.create_dot = cast_impl, create_dot


def _patch_the_language_once_a_launch():
    """The interpreter patches triton.language before each launch and restores it after -- and again on every call
    of a @triton.jit helper inside the kernel (tl.sum, tl.zeros and our own helpers alike: `inspect.getmembers` of
    the language modules each time, never restored), about 40% of an interpreted launch of the fused MoE. Here a
    helper's call patches only the language modules the launch has not patched yet, and the launch restores all it
    patched, last first, when it ends: every helper still runs under the same patches, so what the kernels compute is
    unchanged."""
    import inspect

    from triton.runtime import interpreter

    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "GridExecutor", "_LangPatchScope")):
        return  # another Triton's interpreter: run it as it is
    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    langs_of: dict = {}
    running: list = []  # while a kernel runs: [lang modules patched, their scopes]

    def patch_lang(fn):
        if not running:
            return patch(fn)
        patched, scopes = running
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = {id(v) for v in fn.__globals__.values()
                                    if inspect.ismodule(v) and v in (tl, tl.core)}
        if not langs <= patched:
            scopes.append(patch(fn))
            patched |= langs
        return interpreter._LangPatchScope()  # nothing of its own to restore: the launch restores it all

    def run_grid(self, *args, **kwargs):
        running[:] = [set(), []]
        try:
            return launch(self, *args, **kwargs)
        finally:
            scopes = running[1]
            running.clear()
            for scope in reversed(scopes):
                scope.restore()

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, run_grid


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16()
    _patch_the_language_once_a_launch()

if "PYTEST_XDIST_WORKER" in os.environ:
    # one process per core (`-n auto`): each on one intra-op thread, so the workers do not fight over the cores
    torch.set_num_threads(1)
    # the processes the tests start take torch's default of a thread per core: their OpenMP workers sleep while they
    # wait rather than spin on a core another worker's process needs (a prefill of 256 short prompts, 12 s alone,
    # took 325 s of CI)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_released(tmp_path_factory):
    return synth("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=1, progress=False).path


@pytest.fixture(scope="session")
def tiny_transformers(tmp_path_factory):
    return synth("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-tf", seed=1, layout="transformers",
                 progress=False).path


@pytest.fixture(scope="session")
def trained_like(tiny_released, tmp_path_factory):
    """The tiny checkpoint, calmed (see calm_copy)."""
    return calm_copy(tiny_released, tmp_path_factory.mktemp("calm") / "calm")


@pytest.fixture
def tiny_copy(tiny_released, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_released, tmp_path / "tiny")


@pytest.fixture
def one_token_model(tiny_copy):
    """tiny_copy with a model_max_length of 1, the least a config may say: its limits are counts of one."""
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "model_max_length": 1}))
    return tiny_copy


@pytest.fixture(autouse=True)
def _the_workers_signal_handlers():
    """klconvert.entry.main leaves SIGINT and SIGTERM ending the process with the command's status once it returns
    (a command's interpreter then only shuts down); a test that runs it in this process gets the test runner's
    handlers, and its unraisable hook, back."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    handlers, unraisable = {s: signal.getsignal(s) for s in signals}, sys.unraisablehook
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    sys.unraisablehook = unraisable
