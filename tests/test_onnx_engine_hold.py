"""OnnxEngine holds itself while it generates, as Engine does (runtime/engine.py Runner): a callback's call back into
generate is refused, and a call that fails -- on a bad argument too -- leaves stats reset."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from klconvert.errors import KLError  # noqa: E402
from klconvert.onnx.export import export_onnx  # noqa: E402
from klconvert.onnx.session import OnnxEngine  # noqa: E402
from klconvert.runtime.engine import GenerationStats  # noqa: E402

PROMPT = [4096, 10, 200, 33, 1000]


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    """The bundled model (unquantized) exported and opened."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx("tiny", out)
    return OnnxEngine(out)


@pytest.mark.parametrize("callback", ["on_token", "on_prefill"])
def test_a_callback_cannot_call_back_into_generate(onnx_engine, callback):
    """generate from a callback ran, and replaced self.stats under the outer call: the outer one's decode figures
    went into the inner one's stats, its prompt tokens lost. Refused now, the outer call going on as if it had not
    been made."""
    want = onnx_engine.generate([PROMPT], 6, stop_ids=frozenset())
    want_stats = onnx_engine.stats
    refused = []

    def call_back(*_):
        with pytest.raises(KLError, match=r"^generate was called while generate is running on this engine \(from one "
                                          r"of its callbacks, e\.g\. on_token\), whose state or stats it would "
                                          r"overwrite -- call it after generate returns, or on a second engine$"):
            onnx_engine.generate([[9, 9, 9]], 3)
        refused.append(1)

    assert torch.equal(onnx_engine.generate([PROMPT], 6, stop_ids=frozenset(), **{callback: call_back}), want)
    assert refused == [1] * (6 if callback == "on_token" else 1)
    stats = onnx_engine.stats
    assert (stats.prompt_tokens, stats.batch, stats.new_tokens, stats.steps) == \
        (want_stats.prompt_tokens, want_stats.batch, want_stats.new_tokens, want_stats.steps) == (5, 1, 6, 5)
    onnx_engine.generate([PROMPT], 2)   # let go once it returned


@pytest.mark.parametrize("callback", ["on_token", "on_prefill"])
def test_a_callback_that_is_no_function_is_refused(onnx_engine, callback):
    with pytest.raises(KLError, match=rf"^{callback} should be a function \(or None\), got a str$"):
        onnx_engine.generate([[1, 2, 3]], 2, **{callback: "print"})


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(stop_ids={10**6}), dict(prompts=[[1.5]]),
                                    dict(max_new_tokens=10**12), dict(seed=np.float64(1.0))])
def test_a_call_refused_on_its_arguments_leaves_stats_reset(onnx_engine, kwargs):
    """The arguments were checked before the stats reset took hold: a refused call left the last call's figures, as
    Engine.generate's does not."""
    onnx_engine.generate([PROMPT], 2)
    assert onnx_engine.stats.prompt_tokens == 5
    with pytest.raises(KLError):
        onnx_engine.generate(**{"prompts": [PROMPT], "max_new_tokens": 2, **kwargs})
    assert onnx_engine.stats == GenerationStats()
