"""Long-prompt prefill: MLA attention over key blocks equals the whole-context form, a prompt of several segments equals
one causal pass, the plan's workspace does not grow with the context, the progress bar, bench --prefill."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import klconvert
from klconvert.cli import cli
from klconvert.config import KimiLinearConfig
from klconvert.kernels.naive_mla import quantize_mla_cache_rows
from klconvert.presets import preset_config
from klconvert.runtime import model as M
from klconvert.runtime.memory_plan import MemoryPlan
from klconvert.runtime.state import FP8, cache_rows
from testkit import assert_one_line_error

TINY = KimiLinearConfig.from_dict(preset_config("tiny"))
REAL = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def whole_context(m: M.MLAMixer, q, rows, start: int) -> torch.Tensor:
    """The reference: every row up to the segment's end expanded at once, one SDPA under a causal mask."""
    T, L = q.shape[1], rows.shape[1]
    k, v = M.PrefillAttention.expand(m, rows)
    mask = torch.ones(T, L, dtype=torch.bool).tril(diagonal=start)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=m.scale).transpose(1, 2)


def mla_on(device: str) -> M.MLAMixer:
    """The tiny preset's MLA layer with a random kv_b (what prefill attention reads; the rest stays on meta)."""
    m = M.MLAMixer(TINY, 0)
    w = torch.randn(m.H * (m.dn + m.dv), m.r, generator=torch.Generator().manual_seed(0)) / m.r ** 0.5
    m.kv_b_proj.weight = torch.nn.Parameter(w.to(device), requires_grad=False)
    return m


@pytest.fixture(scope="module")
def mla():
    return mla_on("cpu")


@pytest.mark.parametrize("start,T,key_block", [(0, 7, 3), (5, 7, 3), (13, 4, 5), (64, 9, 64), (65, 1, 64),
                                               (130, 33, 7), (1, 1, 1)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("merge", ["torch", "triton"])
def test_blockwise_prefill_equals_the_whole_context_form(mla, start, T, key_block, fp8, merge):
    """Odd block and segment boundaries, a segment at 0 and past it, one-token segments; an e4m3 cache is attended
    as its dequantized rows. Rows past the segment's end hold junk that must not be read. The blocks merged in
    PyTorch (the declared module) and by the Triton kernel bind swaps in."""
    g = torch.Generator().manual_seed(start * 100 + T)
    q = torch.randn(2, T, mla.H, mla.dn + mla.dr, generator=g)
    rows = torch.randn(2, start + T + 5, mla.r + mla.dr, generator=g)
    cache, scale = quantize_mla_cache_rows(rows) if fp8 else (rows, None)
    written = cache_rows(cache, scale, torch.float32)[:, :start + T]
    rows_after = torch.full_like(cache[:, start + T:], float("nan") if not fp8 else 0)
    cache[:, start + T:] = rows_after.to(cache.dtype)
    if merge == "triton":   # on the GPU where there is one (elsewhere Triton's interpreter, set in conftest)
        from klconvert.runtime.kernel_modules import TritonPrefillAttention
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        got = TritonPrefillAttention(key_block)(mla_on(dev), q.to(dev), cache.to(dev),
                                                None if scale is None else scale.to(dev), start).cpu()
    else:
        got = M.PrefillAttention(key_block)(mla, q, cache, scale, start)
    assert got.shape == (2, T, mla.H, mla.dv)
    assert rel(got, whole_context(mla, q, written, start)) < 1e-5


def test_attention_with_lse_matches_the_definition():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 5, 12, generator=g), torch.randn(1, 2, 5, 12, generator=g), torch.randn(1, 2, 5, 8,
                                                                                                       generator=g)
    for causal in (False, True):
        scores = (q @ k.transpose(-1, -2)) * 0.3
        if causal:
            scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        o, lse = M.attention_with_lse(q, k, v, causal, 0.3)
        assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
        assert torch.allclose(o, scores.softmax(-1) @ v, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype", [None, FP8])
def test_a_prompt_of_several_segments_equals_one_causal_pass(trained_like, cache_dtype):
    """The tiny model, prefill segments of 16 and MLA key blocks of 24, a 75-token prompt: the same logits as one
    pass over the whole prompt with nothing cached (fp32; the e4m3 cache against its own one-segment prefill)."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=80,
                            mla_cache_dtype=cache_dtype)
    ids = torch.randint(0, engine.config.vocab_size, (1, 75), generator=torch.Generator().manual_seed(0))
    one_pass = engine.forward(ids) if cache_dtype else engine.model(ids)
    for mixer in engine.model.modules():
        if isinstance(mixer, M.MLAMixer):
            mixer.prefill_attention = M.PrefillAttention(24)
    engine.prefill_segment = 16
    segmented = engine.forward(ids)
    assert rel(segmented, one_pass) < (1e-5 if cache_dtype is None else 1e-4)
    assert rel(engine.prefill(ids), one_pass[:, -1]) < (1e-5 if cache_dtype is None else 1e-4)


@pytest.mark.parametrize("cache", [torch.bfloat16, FP8])
def test_the_plan_workspace_does_not_grow_with_the_context(cache):
    plans = [MemoryPlan(REAL, batch=1, context=n, weight_bytes={}, mla_cache_dtype=cache)
             for n in (M.MLA_KEY_BLOCK, 32768, 131072, 1 << 20)]
    assert len({p.workspace for p in plans}) == 1
    assert plans[-1].workspace <= 4 * 2**30    # the target at 1M
    assert MemoryPlan(REAL, batch=2, context=1 << 20, weight_bytes={}, mla_cache_dtype=cache).workspace \
        > plans[-1].workspace                  # it does grow with the batch


@pytest.mark.parametrize("batch", [2, 16, 64])
def test_the_plan_workspace_grows_with_the_batch_by_a_decode_step_and_the_prompts_last_logits(batch):
    """README said the workspace grows with the batch "only by a decode step's", and its prefill part grows too, by
    the batch's last logits, fp32, which generate keeps twice (h298's F4: 80 MiB of 237 at batch 64 of the 48B)."""
    one, many = (MemoryPlan(REAL, batch=b, context=8192, weight_bytes={}) for b in (1, batch))
    last_logits = 2 * (batch - 1) * REAL.vocab_size * 4
    assert many.prefill_workspace_for(8192) - one.prefill_workspace_for(8192) == last_logits
    assert many.workspace - one.workspace == (many.decode_workspace_for(8192) - one.decode_workspace_for(8192)
                                              + last_logits)
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert ("the workspace does not grow with the context, and with the batch only by a decode step's and the "
            "prompts' last logits (fp32, twice: generate keeps each prompt's, then joins them)") in readme


def _run(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_the_progress_bar_shows_with_progress_only(trained_like):
    """Not a terminal (CliRunner's stderr): no bar unless --progress asks for it; then it counts the prompt's
    tokens in tokens/s and the generated text is the same."""
    args = ["run", "--model", str(trained_like), "--prompt", "Once upon a time, in a land far away",
            "--max-new-tokens", "4", "--device", "cpu"]
    code, plain_out, plain_err = _run(args)
    assert code == 0, plain_err
    code, shown_out, shown_err = _run(args + ["--progress"])
    assert code == 0, shown_err
    assert "prefill:" not in plain_err and "tok/s" not in plain_err
    assert "prefill: 100%" in shown_err and "tok/s" in shown_err
    assert shown_out == plain_out


class _Terminal(io.StringIO):
    """A standard error that is a terminal, keeping what was written to it."""

    def isatty(self) -> bool:
        return True


def _prefill_shows(monkeypatch, progress, stderr, segments) -> list[str]:
    """What `klconvert run`'s prefill bar (cli._prefill_bar, the real tqdm on a clock the test sets) has written to
    `stderr` after each segment of a 100-token prefill, `segments` being (seconds since the prefill began, tokens)."""
    from klconvert import cli as cli_module

    clock = [1000.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    monkeypatch.setattr(sys, "stderr", stderr)
    update = cli_module._prefill_bar(100, progress)
    shown = []
    for at, tokens in segments:
        clock[0] = 1000.0 + at
        if update is not None:
            update(tokens)
        shown.append(stderr.getvalue())
    return shown


def test_on_a_terminal_the_prefill_bar_shows_once_a_prefill_has_run_2_s(monkeypatch):
    """README: run's prefill bar is shown by default only when stderr is a terminal, once a prefill has run 2 s: a
    prefill done in 1.9 s shows none; a longer one shows it from 2 s on, counting prompt tokens in tokens/s."""
    assert _prefill_shows(monkeypatch, None, _Terminal(), [(0.5, 50), (1.9, 50)]) == ["", ""]
    before, after, done = _prefill_shows(monkeypatch, None, _Terminal(), [(1.9, 25), (2.1, 25), (3.0, 50)])
    assert before == "" and after.startswith("\rprefill:  50%") and "tok/s" in after
    assert "prefill: 100%" in done and done.endswith("\n")


@pytest.mark.parametrize("progress, stderr", [(None, io.StringIO), (False, _Terminal), (True, io.StringIO)],
                         ids=["default, in a log", "--no-progress, on a terminal", "--progress, in a log"])
def test_the_prefill_bar_off_a_terminal_needs_progress(monkeypatch, progress, stderr):
    """In a log (stderr no terminal) no bar's carriage returns, however long the prefill, unless --progress asks
    for the bar (then at once); --no-progress shows none on a terminal either."""
    shown = _prefill_shows(monkeypatch, progress, stderr(), [(0.1, 10), (5.0, 40), (9.0, 50)])
    if progress:
        assert "\rprefill:  10%" in shown[0] and "prefill: 100%" in shown[-1]
    else:
        assert shown == ["", "", ""]


@pytest.mark.parametrize("value,needle", [("0", "at least 1"), ("12,x", "whole numbers"), ("", "whole numbers"),
                                          ("2000000", "model_max_length")])
def test_bench_prefill_refuses_bad_lengths(monkeypatch, capsys, value, needle):
    monkeypatch.setattr("sys.argv", ["klconvert"])
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--preset", "kimi-linear-48b", "--prefill", value], prog_name="klconvert")
    assert_one_line_error(e.value.code, capsys.readouterr().err, "--prefill", needle)
