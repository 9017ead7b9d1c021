"""`klconvert run` and `klconvert plan` end to end on a tiny checkpoint."""
from __future__ import annotations

import importlib
import re
import shutil

import pytest
import torch

import klconvert
from klconvert.errors import KLError
from klconvert.tokenizer import Tokenizer
from testkit import assert_one_line_error, emitting_a_special, gpu_with_free, run_cli, run_klconvert


@pytest.mark.slow
def test_run_streams_the_greedy_continuation(tiny_released, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time, in a land far away,")
    code, out, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt-file", prompt,
                             "--max-new-tokens", "12", "--device", "cpu")      # the path `expected` runs
    assert code == 0, err
    tok = Tokenizer.from_folder(tiny_released)
    ids = tok.encode(prompt.read_text())
    expected = klconvert.load(tiny_released, device="cpu", max_context=64).generate(ids, 12)[0].tolist()
    stop = [i for i, t in enumerate(expected) if t in tok.stop_ids]
    expected = expected[: stop[0]] if stop else expected
    assert out == tok.decode([t for t in expected if t not in tok.special_ids]) + "\n"
    shown = run_cli(capsys, "run", "--model", tiny_released, "--prompt", prompt.read_text(), "--max-new-tokens",
                    "12", "--show-special", "--device", "cpu")[1]
    assert shown == tok.decode(expected) + "\n"
    assert any(t in tok.special_ids for t in expected)  # so the two differ
    summary = err.strip().splitlines()[-1]
    assert f"prompt {len(ids)} tokens" in summary and "prefill" in summary and "decode" in summary
    assert f"context {len(ids) + 12}," in summary  # prompt + max-new-tokens, planned up front


@pytest.mark.slow
def test_run_reads_stdin_chat_and_sampling_is_seeded(tiny_released):
    args = ("run", "--model", str(tiny_released), "--prompt-file", "-", "--chat", "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    a, b = run_klconvert(*args, stdin="Hello there"), run_klconvert(*args, stdin="Hello there")
    other = run_klconvert(*args[:-1], "4", stdin="Hello there")
    assert a.returncode == other.returncode == 0, a.stderr + other.stderr
    assert a.stdout.strip() and a.stdout == b.stdout  # the same seed, the same text
    assert other.stdout != a.stdout  # another seed, other text: the seed reaches the sampler


def test_max_new_tokens_0_only_prefills(capsys, tmp_path):
    """The README's `--max-new-tokens N` (0: only prefill the prompts), from the command line: stdout holds no text
    -- it held an empty line (h319), and with several prompt files a header over nothing for each."""
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "0",
                             "--device", "cpu")
    assert code == 0 and out == "" and re.match(r"prompt \d+ tokens \| prefill [\d.]+ tokens/s \| 0 new, no decode "
                                                r"step \| plan: ", err), err
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("ROMEO.")
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt-file", tmp_path / "a.txt", "--prompt-file",
                             tmp_path / "b.txt", "--max-new-tokens", "0", "--device", "cpu")
    assert code == 0 and out == "" and "| 0 new, no decode step | plan: " in err, (out, err)


def test_one_new_token_has_no_decode_rate(capsys):
    """The one token comes from the prefill: the summary said "decode 0.0 tokens/s", a rate no step measured."""
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "1",
                             "--device", "cpu")
    assert code == 0 and len(out) > 1 and "| 1 new, no decode step | plan: " in err, err
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "2",
                             "--device", "cpu")
    assert code == 0 and re.search(r"\| 2 new, decode [\d.]+ tokens/s \| plan: ", err) and "decode 0.0 " not in err


def test_the_summary_writes_its_counts_with_thousands_separators(capsys):
    """The summary said "context 1048576" where plan says "context 1,048,576" (h319), and "1000 new" (h322's
    left-alone): its counts are written as every count klconvert prints, with ','; the seed, which --seed takes back,
    stays in plain digits. (1,000 new tokens of a run would take seconds: the summary's counts are held on stats.)"""
    from klconvert.cli import _run_summary
    from klconvert.runtime.engine import GenerationStats

    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "2",
                             "--max-context", "1500", "--temperature", "0.5", "--seed", "12345", "--device", "cpu")
    assert code == 0 and re.search(r"\| seed 12345 \| plan: cpu float32 torch, context 1,500, batch 1, ", err), err
    stats = GenerationStats(prompt_tokens=4096, new_tokens=1000, timed_steps=999, timed_tokens=999,
                            prefill_seconds=2.0, decode_seconds=9.99)
    assert _run_summary(stats, 12345) == ("prompt 4,096 tokens | prefill 2048.0 tokens/s | 1,000 new, decode 100.0 "
                                          "tokens/s | seed 12345")
    assert _run_summary(stats, None).endswith("1,000 new, decode 100.0 tokens/s")


def test_a_prompt_of_one_token_is_summed_up_as_one(capsys):
    """The summary said "prompt 1 tokens" (units.counted)."""
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "0",
                             "--device", "cpu")
    assert code == 0 and err.startswith("prompt 1 token | prefill "), err


def test_a_context_of_one_token_is_said_as_one(capsys, one_token_model):
    """A prompt, or --max-new-tokens, past a model's model_max_length of 1 was refused as past "1 tokens"
    (units.counted; a chat's prompt "over 1 token": test_hostile_files)."""
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", one_token_model, "--prompt", "hello there",
                                          "--max-new-tokens", "0")[::2])
    assert line.endswith("is over the model's model_max_length of 1 token; shorten the prompt or lower "
                         "--max-new-tokens"), line
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", one_token_model, "--prompt", "hello there",
                                          "--max-new-tokens", "1")[::2])
    assert line.endswith("--max-new-tokens 1 leaves no room for a prompt in the model's model_max_length of 1 token; "
                         "lower --max-new-tokens"), line


@pytest.mark.slow
def test_the_summary_names_the_drawn_seed_which_repeats_the_run(tiny_released, capsys):
    args = ("run", "--model", tiny_released, "--prompt", "Hello", "--max-new-tokens", "16", "--temperature", "1")
    _, drawn, err = run_cli(capsys, *args)
    seed = re.search(r"\| seed (\d+)", err.splitlines()[-1]).group(1)
    assert run_cli(capsys, *args, "--seed", seed)[1] == drawn
    assert "seed" not in run_cli(capsys, *args[:-2])[2].splitlines()[-1]  # greedy: no seed to name


def test_chat_prompt_uses_the_template(tiny_released):
    tok = Tokenizer.from_folder(tiny_released)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.special_tokens["<|im_user|>"] in ids
    assert ids[-1] == tok.special_tokens["<|im_middle|>"]


def test_top_p_keeps_only_the_nucleus():
    from klconvert.runtime.sampling import sample

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.8, g)[0]) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, 0.0, 1.0, g)[0]) == 0


@pytest.mark.parametrize("tied, top_p, kept", [(3, 2 / 3, 2), (50, 0.5, 25), (10, 0.7, 7), (4, 0.75, 3),
                                               (100, 0.37, 37)])
def test_top_p_reached_exactly_by_tied_logits_keeps_no_more(tied, top_p, kept):
    """`tied` equal logits, top_p a multiple of their probability: the smallest set reaching it is `kept` tokens.
    softmax's fp32 probabilities summed a hair under top_p (3 at 2/3, 50 at 0.5), which kept one token more."""
    from klconvert.runtime.sampling import sample

    draws, _ = sample(torch.zeros(20_000, tied), 1.0, top_p, torch.Generator().manual_seed(0))
    assert draws.unique().numel() == kept


@pytest.mark.parametrize("temperature, top_p, kept", [(0.5, 1.0, 8), (2.0, 1.0, 8), (1.0, 0.7, 3), (2.0, 0.8, 5)])
def test_sampled_frequencies_follow_the_tempered_softmax(temperature, top_p, kept):
    """One row of logits drawn 20,000 times: each token's count is within 4 sigma of softmax(logits / T), the
    nucleus renormalised over the `kept` tokens top-p keeps (cumulative mass at T = 1 before the 3rd token 0.65, the
    4th 0.80; at T = 2 before the 5th 0.75, the 6th 0.84), and nothing outside it is drawn."""
    from klconvert.runtime.sampling import sample

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])   # sorted: the nucleus is a prefix
    n = 20_000
    draws, _ = sample(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(logits)).double()
    p = torch.softmax(logits.double() / temperature, dim=-1)
    p[kept:] = 0.0
    p /= p.sum()
    sigma = (n * p * (1 - p)).sqrt()
    assert torch.all((counts - n * p).abs() <= 4 * sigma), (counts.tolist(), (n * p).tolist())
    likely = n * p >= 10   # never drawn with odds under e**-10 (at T = 0.5 token 7 is expected 0.57 times: any seed)
    assert counts[kept:].sum() == 0 and torch.all(counts[likely] > 0)


@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 1e-30])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    """A top_p that rounds to 0 in fp32 must still keep the first token (it dropped them all: token 0, NUL bytes)."""
    from klconvert.runtime.sampling import sample

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)) * 5
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 1.0, top_p, g)[0], logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-30])
def test_a_tiny_temperature_draws_the_top_token_not_nan(temperature):
    """logits / T overflows fp32 (and T itself underflows to 0): the draw must tend to greedy, not to NaN."""
    from klconvert.runtime.sampling import sample

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)) * 5
    g = torch.Generator().manual_seed(0)
    for top_p in (1.0, 0.5):
        assert torch.equal(sample(logits, temperature, top_p, g)[0], logits.argmax(dim=-1))


def _logits_not_finite_from_step(monkeypatch, step: int, row: int | None = None) -> None:
    """From the `step`-th decode step on (1-based), the decode step's logits of sequence `row` (None: all) are NaN --
    as when a state or cache overflows mid-decode, which finite prompt logits do not rule out."""
    from klconvert.runtime.decode_step import DecodeStep

    real, calls = DecodeStep.step, []

    def step_then_nan(self):
        logits = real(self).clone()
        calls.append(1)
        if len(calls) >= step:
            logits[slice(None) if row is None else row] = float("nan")
        return logits
    monkeypatch.setattr(DecodeStep, "step", step_then_nan)


def test_logits_not_finite_while_decoding_stop_the_run_at_that_token(capsys, monkeypatch):
    """run printed a NUL byte for each such step (argmax's pick in a NaN row, token 0) and went on; now it stops
    there in one line naming the token, with the text made before it printed."""
    _logits_not_finite_from_step(monkeypatch, step=2)
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "8",
                             "--device", "cpu")
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        "klconvert: error: the model computed NaN or infinite logits at new token 3 of prompt 1: its weights or "
        "config.json (e.g. routed_scaling_factor) make the activations overflow -- check them, or re-download the "
        "model")
    assert "\0" not in out and out != ""   # the two tokens before it


def _out_of_gpu_memory(*args, **kwargs):
    """What the CUDA caching allocator raises where the device has less left than asked (torch's words)."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.10 GiB is free. Including non-PyTorch memory, this process "
                                 "has 78.08 GiB memory in use.")


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    """The bundled model quantized to 4 bits (lm_head at 8, as every policy keeps it)."""
    from klconvert.quantize import quantize

    return quantize("tiny", tmp_path_factory.mktemp("int4") / "q", bits=4, group_size=32, progress=False).path


OOM_SAID = ("(CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.10 "
            "GiB is free.); ")


def test_a_gpu_out_of_memory_mid_run_is_one_line_naming_the_plan(capsys, monkeypatch):
    """A plan that passed its check, then a prefill the device could not hold: torch.OutOfMemoryError (a
    RuntimeError, which the command line passed on) ended the run in a traceback. Now one line says what ran out,
    what the plan counted and what asks for less (simulated here by the model's prefill, on the CPU)."""
    from klconvert.runtime.model import KimiLinear

    monkeypatch.setattr(KimiLinear, "hidden_states", _out_of_gpu_memory)
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "2",
                           "--device", "cpu")
    assert_one_line_error(code, err, "out of GPU memory in generate, where the memory plan counts ",
                          OOM_SAID + "lower --max-context, give fewer prompts, use a model of fewer bits (klconvert "
                          "quantize --bits 4), or stop what else holds the GPU")


def test_a_gpu_out_of_memory_of_a_4_bit_model_asks_for_no_fewer_bits(tiny_int4, capsys, monkeypatch):
    """An int4 model was still told `klconvert quantize --bits 4` (h213's F3): its weights are at 4 bits already, but
    lm_head, which every policy keeps at 8. The Python API's line names its arguments, the command line's its flags."""
    from klconvert.runtime.engine import load
    from klconvert.runtime.model import KimiLinear

    monkeypatch.setattr(KimiLinear, "hidden_states", _out_of_gpu_memory)
    code, _, err = run_cli(capsys, "run", "--model", tiny_int4, "--prompt", "ROMEO.", "--max-new-tokens", "2",
                           "--device", "cpu")
    assert_one_line_error(code, err, "out of GPU memory in generate, where the memory plan counts ",
                          OOM_SAID + "lower --max-context, give fewer prompts, or stop what else holds the GPU")
    engine = load(tiny_int4, device="cpu", max_context=64)
    with pytest.raises(KLError) as refused:
        engine.generate([[1, 2, 3]], max_new_tokens=2)
    assert str(refused.value).endswith(OOM_SAID + "lower max_context (--max-context), give fewer prompts, or stop "
                                                  "what else holds the GPU")


@pytest.mark.parametrize("loads_before, said", [
    (0, "--reference tiny: out of GPU memory loading the model, where the memory plan counts "),
    (1, "--model tiny: out of GPU memory loading the model, where the memory plan counts "),
], ids=["reference", "model"])
def test_a_gpu_out_of_memory_in_eval_names_evals_own_flags_and_the_model(capsys, monkeypatch, tmp_path, loads_before,
                                                                         said):
    """eval was told to lower --max-context and give fewer prompts, flags of `run` (h213's F3): its context is
    --max-tokens. Its line did not say which of its two models ran out, and told a reference to quantize itself to
    fewer bits, which leaves eval nothing to measure against (h217's F3): it names the model, and offers fewer bits
    only to --model."""
    import klconvert.runtime.engine

    bind, loads = klconvert.runtime.engine.bind, []

    def bind_then_run_out(*args, **kwargs):   # the reference loads first
        loads.append(1)
        return bind(*args, **kwargs) if len(loads) <= loads_before else _out_of_gpu_memory()

    monkeypatch.setattr(klconvert.runtime.engine, "bind", bind_then_run_out)
    text = tmp_path / "text.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks? " * 20)
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", "tiny", "--text-file", text,
                           "--max-tokens", "64", "--device", "cpu")
    fewer_bits = "use a model of fewer bits (klconvert quantize --bits 4), " if loads_before else ""
    line = assert_one_line_error(code, err, said, OOM_SAID + f"lower --max-tokens, {fewer_bits}or stop what else "
                                 "holds the GPU")
    assert line.startswith(f"klconvert: error: {said}")


@pytest.mark.parametrize("flag, runs_before", [("--reference", 0), ("--model", 1)], ids=["reference", "model"])
@pytest.mark.parametrize("where, doing", [
    ("torch.log_softmax", " taking the log-probabilities of the logits, where the memory plan counts "),
    ("klconvert.runtime.engine.KimiLinear", ""),   # building the model (on an app's default CUDA device): unplanned
], ids=["log-softmax", "building"])
def test_a_gpu_out_of_memory_outside_evals_engines_names_the_model_and_evals_flags(capsys, monkeypatch, tmp_path,
                                                                                   where, doing, flag, runs_before):
    """Outside an engine's calls -- eval's own log-softmax of the logits on their device, the model built before
    its plan -- torch's refusal passed the engine's wording by: the line named neither the model that ran out nor a
    model of fewer bits. It is said as an out-of-memory in the engine is, by eval's two models alike."""
    module, _, name = where.rpartition(".")
    owner = importlib.import_module(module)
    real, calls = getattr(owner, name), []

    def run_out_after(*args, **kwargs):   # the reference runs first
        calls.append(1)
        return real(*args, **kwargs) if len(calls) <= runs_before else _out_of_gpu_memory()

    monkeypatch.setattr(owner, name, run_out_after)
    text = tmp_path / "text.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks? " * 20)
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", "tiny", "--text-file", text,
                           "--max-tokens", "64", "--device", "cpu")
    # --model tiny is bf16: fewer bits would hold less; where no engine holds the model yet, that is not known
    fewer_bits = "use a model of fewer bits (klconvert quantize --bits 4), " if flag == "--model" and doing else ""
    line = assert_one_line_error(code, err)
    assert line.startswith(f"klconvert: error: {flag} tiny: out of GPU memory{doing}")
    assert line.endswith(OOM_SAID + f"lower --max-tokens, {fewer_bits}or stop what else holds the GPU")


def test_a_batch_no_context_fits_names_runs_own_flag(tmp_path, capsys, monkeypatch):
    """16 prompts no context fits under ulimit -v were told "lower batch (--batch; `klconvert run`: give fewer
    prompts)" (h217's F4): run has no --batch, and the line mixed the API's names with the command line's. It names
    run's own way to a smaller batch, as its out-of-GPU-memory line does (COMMAND_LEVERS)."""
    import klconvert.runtime.engine
    from klconvert.runtime.host_memory import ADDRESS_SPACE_BOUND, HostMemory

    # 67 MiB: the tiny model's weights fit (under 63 MB); its state for 16 sequences does not, at any context
    monkeypatch.setattr(klconvert.runtime.engine, "host_memory", lambda **_: HostMemory(67 << 20, *ADDRESS_SPACE_BOUND))
    prompts = []
    for i in range(16):
        (tmp_path / f"p{i}.txt").write_text(f"ROMEO {i}.")
        prompts += ["--prompt-file", tmp_path / f"p{i}.txt"]
    code, _, err = run_cli(capsys, "run", "--model", "tiny", *prompts, "--max-new-tokens", "2", "--device", "cpu")
    line = assert_one_line_error(code, err, "; no context fits a batch of 16: give fewer prompts (--prompt-file), "
                                            "or raise ulimit -v")
    assert "--batch" not in line


class BoundTheWeights(Exception):
    """What a stand-in for binding the weights raises: the plan before it passed."""


def _binding(*args, **kwargs):
    raise BoundTheWeights


def _a_gpu_with_free(monkeypatch, free: int, total: int = 80 << 30) -> None:
    """A CUDA GPU as run sees one, with `free` bytes of its `total` left (gpu_with_free), on a machine without: the
    plan is checked against it before any weight is read onto it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu_with_free(monkeypatch, free, total)


@pytest.mark.parametrize("bits, total, advice", [
    (16, 80 << 30, "use a model of fewer bits (klconvert quantize --bits 4), or stop what else holds the GPU"),
    (4, 80 << 30, "stop what else holds the GPU"),
    (4, 1 << 20, "this device cannot hold this model"),
], ids=["bf16", "int4", "int4-whole-card"])
def test_weights_alone_past_the_gpu_name_their_size_and_fewer_bits_only_where_they_hold_less(
        tiny_int4, capsys, monkeypatch, bits, total, advice):
    """run's line where the weights alone are past the GPU said "use a quantized model (klconvert quantize --bits
    4)" to a model at 4 bits too (but lm_head, which every policy keeps at 8), which has no fewer to offer; and that
    the device cannot hold a model the card would hold were nothing else on it."""
    _a_gpu_with_free(monkeypatch, 1 << 20, total)
    code, _, err = run_cli(capsys, "run", "--model", "tiny" if bits == 16 else tiny_int4, "--prompt", "ROMEO.",
                           "--max-new-tokens", "2", "--device", "cuda")
    line = assert_one_line_error(code, err)
    assert re.fullmatch(r"klconvert: error: the plan needs [\d.]+ MB but cuda has 1\.05 MB free for this process; "
                        rf"the weights alone need [\d.]+ MB: {re.escape(advice)}", line), line


PROMPTS_NEED = "; no context holding the prompts fits: they need 252 tokens (the longest prompt plus the new tokens), "
NO_BATCH = "; no context fits a batch of 2: "


@pytest.mark.parametrize("prompts, free, total, said, advice", [
    (1, 26 << 20, 80 << 30, PROMPTS_NEED, "shorten the prompt, or lower --max-new-tokens, or stop what else holds the "
                                          "GPU"),
    (2, 26 << 20, 80 << 30, PROMPTS_NEED, "give fewer prompts (--prompt-file) or shorter ones, or lower "
                                          "--max-new-tokens, or stop what else holds the GPU"),
    (2, 26 << 20, 26 << 20, PROMPTS_NEED, "give fewer prompts (--prompt-file) or shorter ones, or lower "
                                          "--max-new-tokens"),   # the whole card is what is free
    (2, 24 << 20, 80 << 30, NO_BATCH, "give fewer prompts (--prompt-file), or stop what else holds the GPU"),
    (2, 24 << 20, 24 << 20, NO_BATCH, "give fewer prompts (--prompt-file)"),
], ids=["one", "two", "two-whole-card", "batch", "batch-whole-card"])
def test_prompts_no_context_fits_on_the_gpu_name_runs_own_flags(tmp_path, capsys, monkeypatch, prompts, free, total,
                                                                said, advice):
    """run's line where the largest context that fits is short of its prompts' said "give fewer prompts (a smaller
    batch) or shorter ones, or lower max_new_tokens (--max-new-tokens)" (h228's F7): run has no batch, and
    max_new_tokens is the Python API's name. It names run's own flags; and it, and the line where no context fits
    the prompts' batch, say to stop what else holds the GPU where the whole card would hold the prompts."""
    _a_gpu_with_free(monkeypatch, free, total)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO. " * 50)   # 250 tokens
    code, _, err = run_cli(capsys, "run", "--model", "tiny", *["--prompt-file", prompt] * prompts, "--max-new-tokens",
                           "2", "--device", "cuda")
    line = assert_one_line_error(code, err)
    assert re.fullmatch(r"klconvert: error: the plan needs [\d.]+ MB but cuda has [\d.]+ MB free for this process"
                        + re.escape(said) + (r"at most \d+ fit; " if said == PROMPTS_NEED else "") + re.escape(advice),
                        line), line


@pytest.mark.parametrize("bits, total, advice", [
    (16, 64 << 30, "use a model of fewer bits (klconvert quantize --bits 4), or free some memory"),
    (4, 64 << 30, "free some memory"),
    (16, 1 << 20, "use a model of fewer bits (klconvert quantize --bits 4)"),
    (4, 1 << 20, "this device cannot hold this model"),
], ids=["bf16", "int4", "bf16-all-the-host", "int4-all-the-host"])
def test_weights_alone_past_the_host_free_memory_only_where_the_host_would_hold_them(
        tiny_int4, capsys, monkeypatch, bits, total, advice):
    """run's line where the weights alone are past what the host has left said "free some memory" where the host's
    memory in all (MemTotal) could never hold them (h228's F8): it says so only where it would, as the GPU's line
    does of the whole card, and else that the device cannot hold the model."""
    import klconvert.runtime.engine
    from klconvert.runtime.host_memory import HostMemory

    monkeypatch.setattr(klconvert.runtime.engine, "host_memory", lambda **_: HostMemory(1 << 20, total=total))
    code, _, err = run_cli(capsys, "run", "--model", "tiny" if bits == 16 else tiny_int4, "--prompt", "ROMEO.",
                           "--max-new-tokens", "2", "--device", "cpu")
    line = assert_one_line_error(code, err)
    assert re.fullmatch(r"klconvert: error: the plan needs [\d.]+ MB but cpu has 1\.05 MB available on the host "
                        rf"\(MemAvailable\); the weights alone need [\d.]+ MB: {re.escape(advice)}", line), line


@pytest.mark.parametrize("total, advice", [(80 << 30, ", or stop what else holds the GPU"), (40 << 20, "")],
                         ids=["card", "whole-card"])
def test_a_plan_past_the_gpu_names_runs_own_flag_for_the_context(capsys, monkeypatch, total, advice):
    """run's line where a smaller context fits said "lower max_context (--max-context) to N", the Python API's name
    beside the flag: it names run's flag alone, and the context it names passes the plan. It never said to stop what
    else holds the GPU where the whole card would hold the context asked, as the lines where none fits do (h233)."""
    import klconvert.runtime.engine

    _a_gpu_with_free(monkeypatch, 40 << 20, total)   # the tiny model's weights fit, with a context of some hundred
    args = ("run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "2", "--device", "cuda",
            "--max-context")
    code, _, err = run_cli(capsys, *args, "100000")
    line = assert_one_line_error(code, err)
    said = re.fullmatch(r"klconvert: error: the plan needs [\d.]+ [MG]B but cuda has 41\.94 MB free for this process; "
                        r"lower --max-context to (\d+) or less" + re.escape(advice), line)
    assert said, line
    monkeypatch.setattr(klconvert.runtime.engine, "bind", _binding)
    with pytest.raises(BoundTheWeights):
        run_cli(capsys, *args, said.group(1))


BENCH_FEWER_BITS = "time fewer bits (--bits 4 with --preset; a --model folder of klconvert quantize --bits 4), "


@pytest.mark.parametrize("command, said", [
    (["quantize", "tiny", "int4", "--device", "cpu"], "quantize on the CPU (--device cpu), or stop what else holds "
                                                      "the GPU"),
    (["bench", "--model", "tiny"], "lower --context, --prefill or --batch, " + BENCH_FEWER_BITS
                                   + "or stop what else holds the GPU"),   # bf16 weights, its layers its own
    (["bench", "--preset", "kimi-linear-48b", "--bits", "8"],   # 27 layers
     "lower --context, --prefill or --batch, time fewer --layers of a --preset, " + BENCH_FEWER_BITS
     + "or stop what else holds the GPU"),
    (["bench", "--preset", "kimi-linear-48b", "--layers", "2"], "lower --context, --prefill or --batch, time fewer "
                                                                "--layers of a --preset, or stop what else holds the "
                                                                "GPU"),   # 4 bits already, but lm_head
    (["bench", "--preset", "kimi-linear-48b", "--layers", "1", "--bits", "8"],   # no fewer layers
     "lower --context, --prefill or --batch, " + BENCH_FEWER_BITS + "or stop what else holds the GPU"),
], ids=["quantize", "bench-bf16", "bench-int8", "bench-int4", "bench-one-layer"])
def test_a_gpu_out_of_memory_outside_an_engine_names_the_commands_own_flags(tmp_path, capsys, monkeypatch, command,
                                                                            said):
    """Outside an engine's plan (a quantize, a bench's caches filled), the same refusal is one line saying what asks
    for less: it named --max-context and prompts, which neither command takes (h213's F3). bench's never said fewer
    bits, which its line from an engine says where the weights timed are stored in more than 4; it said fewer
    --layers to a --model and to a --preset of one layer (h228's F5), which have none to give."""
    import klconvert.bench
    import klconvert.quantize

    monkeypatch.setattr(klconvert.quantize, "_quantize", _out_of_gpu_memory)
    monkeypatch.setattr(klconvert.bench, "bench", _out_of_gpu_memory)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *command)
    assert_one_line_error(code, err, "klconvert: error: out of GPU memory " + OOM_SAID + said)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])   # on CUDA: graph replay, tokens copied async
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logits_not_finite_in_one_sequence_of_a_batch_are_named_by_its_prompt(tiny_released, monkeypatch,
                                                                             temperature, device):
    from klconvert.errors import KLError

    engine = klconvert.load(tiny_released, device=device, max_context=64, batch=2)
    prompts = [[5, 6, 7], [8, 9]]
    assert engine.generate(prompts, 6, temperature=temperature, seed=1).shape == (2, 6)   # finite: runs through
    _logits_not_finite_from_step(monkeypatch, step=1, row=1)
    with pytest.raises(KLError, match="NaN or infinite logits at new token 2 of prompt 2:"):
        engine.generate(prompts, 6, temperature=temperature, seed=1)
    assert engine.stats.new_tokens == 0   # reset, as any failed call leaves them


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_a_row_without_a_finite_largest_logit_is_flagged(temperature, top_p):
    """The decode loop stops on a row whose logits hold NaN or +inf, or only -inf; a -inf among finite values is
    a masked token and stays a row like any other."""
    from klconvert.runtime.sampling import sample

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3] = float("-inf")
    logits[4, :49] = float("-inf")   # masked but one
    logits[5] = float("nan")
    token, finite = sample(logits, temperature, top_p, torch.Generator().manual_seed(0))
    assert finite.tolist() == [True, False, False, False, True, False]
    assert token[4] == 49 and ((0 <= token) & (token < 50)).all()   # ids the next step can take, flagged or not


@pytest.mark.slow
def test_plan_command_prints_the_table(capsys):
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", "--gpu-memory", "48GiB",
                             "--max-context", "262144")
    assert code == 0, err
    for needle in ("weights total", "41.9 MB", "8,064 B", "headroom", "largest context that fits"):
        assert needle in out


@pytest.mark.slow
def test_plan_for_a_folder(tiny_released, capsys):
    code, out, err = run_cli(capsys, "plan", "--model", tiny_released, "--max-context", "4096")
    assert code == 0, err
    assert "MLA latent cache / token" in out


def test_a_folders_plan_sizes_the_stored_tensors_not_its_recipe(tiny_released, tmp_path, capsys):
    """The weights planned for a quantized folder are those it stores, as a GPU holds them (packed where the Triton
    kernels take them: the experts here; dequantized elsewhere), whatever its recipe.yaml says or whether it has
    one; the recipe's runtime: section still applies."""
    from klconvert.runtime.plan_report import plan_for

    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_released, out, "--bits", "4")[0] == 0
    stored = plan_for(model=out).weight_bytes
    assert stored["experts"] == plan_for(model=out, bits=4).weight_bytes["experts"]
    assert stored["experts"] < plan_for(model=tiny_released).weight_bytes["experts"]
    recipe = out / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("num_bits: 4", "num_bits: 8") + "runtime:\n  batch: 3\n")
    assert "num_bits: 8" in recipe.read_text()
    plan = plan_for(model=out)
    assert plan.weight_bytes == stored and plan.batch == 3
    recipe.unlink()
    assert plan_for(model=out).weight_bytes == stored


@pytest.mark.slow
def test_several_prompt_files_run_as_one_batch(tiny_released, tmp_path, capsys):
    """Each prompt is continued at its own length, exactly as it is alone; the outputs come in order, headed."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("Once upon a time, in a land far away, there lived")
    files[1].write_text("The end")
    code, both, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt-file", files[0], "--prompt-file",
                              files[1], "--max-new-tokens", "10", "--show-special")
    assert code == 0, err
    alone = [run_cli(capsys, "run", "--model", tiny_released, "--prompt-file", f, "--max-new-tokens", "10",
                     "--show-special")[1] for f in files]
    assert both == "".join(f"==> {f} <==\n{text}" for f, text in zip(files, alone))
    assert "batch 2" in err.strip().splitlines()[-1]


def test_a_seed_repeats_a_batch_whose_prompts_draw_from_one_generator(tmp_path, capsys):
    """The README's seed: the same prompts run together repeat their text, and a prompt's text depends on the others
    in its batch (one generator draws for all of them)."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("ROMEO.")
    files[1].write_text("JULIET.")
    sampled = ("--max-new-tokens", "16", "--temperature", "1", "--seed", "5", "--device", "cpu")
    runs = [run_cli(capsys, "run", "--model", "tiny", "--prompt-file", files[0], "--prompt-file", files[1], *sampled)
            for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1], runs[0][2]
    first = re.fullmatch(rf"==> {re.escape(str(files[0]))} <==\n(.*)==> {re.escape(str(files[1]))} <==\n.*",
                         runs[0][1], re.S).group(1)
    code, alone, err = run_cli(capsys, "run", "--model", "tiny", "--prompt-file", files[0], *sampled)
    assert code == 0 and first.strip() and alone.strip() and alone != first, err


def test_many_long_prompt_files_are_held_in_little_memory_until_the_plan_refuses_them(tmp_path, capsys,
                                                                                       monkeypatch):
    """Each prompt was held as a list of Python ints, ~40 bytes a token: 150 files of 1M tokens took 6.1 GB before
    the plan refused the batch. Held as 4-byte ids, what the prompts take is about their text's size."""
    import tracemalloc

    from klconvert.runtime import engine

    text = "the quick brown fox jumps over the lazy dog, said nobody in the play. " * 3_000
    files = []
    for i in range(8):
        files += ["--prompt-file", tmp_path / f"p{i}.txt"]
        (tmp_path / f"p{i}.txt").write_text(text)
    tokens = len(Tokenizer.from_folder(klconvert.models.bundled_dir()).encode(text))
    seen = {}

    def refused(folder, **kwargs):   # where the plan is made and refused: what the prompts held by then
        seen["bytes"] = tracemalloc.get_traced_memory()[0]
        raise klconvert.KLError("the plan does not fit")

    monkeypatch.setattr(engine, "load", refused)
    held = []
    for count in (1, 8):   # what seven more prompts add, past what reading any takes
        tracemalloc.start()
        try:
            code, _, err = run_cli(capsys, "run", "--model", "tiny", *files[:2 * count])
        finally:
            tracemalloc.stop()
        assert code == 2 and "the plan does not fit" in err
        held.append(seen["bytes"])
    assert tokens > 40_000 and held[1] - held[0] < 7 * tokens * 8, (held, tokens)


def test_text_stdout_cannot_encode_is_replaced_not_a_traceback(tmp_path):
    """PYTHONIOENCODING=ascii: a batch header's file name (and sampled text) outside it shows as '?'."""
    prompt = tmp_path / "café.txt"
    prompt.write_text("ROMEO.")
    proc = run_klconvert("run", "--model", "tiny", "--prompt-file", prompt, "--prompt-file", prompt,
                         "--max-new-tokens", "2", "--device", "cpu", env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"==> {tmp_path}/caf?.txt <==") == 2


def test_config_eos_ids_stop_a_run_too(tmp_path, capsys):
    """A generated id that config.json names as eos_token_id ends the turn, as the tokenizer's eos does (a special
    token, as config.json's eos ids must be: the model made to emit one where it emitted text)."""
    import json

    from klconvert.models import bundled_dir

    tok = Tokenizer.from_folder("tiny")
    ids = tok.encode("ROMEO.")
    free = klconvert.load("tiny", device="cpu", max_context=32).generate(ids, 12, stop_ids=frozenset())[0].tolist()
    at = next(i for i in range(2, 12) if free[i] not in tok.special_ids and free[i] not in free[:i] + ids)
    stop = tok.special_tokens["[EOT_ID]"]   # a special that is no stop token of the tokenizer's
    folder = emitting_a_special(bundled_dir(), tmp_path / "model", free[at], stop)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], stop]
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "run", "--model", folder, "--prompt", "ROMEO.", "--max-new-tokens", "12",
                             "--device", "cpu")
    assert code == 0, err
    assert out == tok.decode([t for t in free[:at] if t not in tok.special_ids]) + "\n"
    assert f"{at + 1} new" in err
    # the README: the stop token that ends a sequence is never printed
    code, shown, err = run_cli(capsys, "run", "--model", folder, "--prompt", "ROMEO.", "--max-new-tokens", "12",
                               "--device", "cpu", "--show-special")
    assert code == 0 and shown == tok.decode(free[:at]) + "\n", err
    # the API's default stop tokens are run's: generate without stop_ids ran on through the stop token
    engine = klconvert.load(folder, device="cpu", max_context=32)
    assert engine.stop_ids == tok.stop_ids | {stop}
    stopped = engine.generate(ids, 12)[0].tolist()
    assert stopped[:at] == free[:at] and set(stopped[at:]) == {stop} and engine.stats.new_tokens == at + 1


@pytest.fixture(scope="module")
def quantized_tiny(tiny_released, tmp_path_factory):
    from klconvert.quantize import quantize

    return quantize(tiny_released, tmp_path_factory.mktemp("q") / "q", bits=4, group_size=32, device="cpu",
                    progress=False).path


# what llm-compressor's oneshot writes beside the weights: its own recipe, modifiers klconvert does not run
GPTQ_RECIPE = """default_stage:
  default_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
      actorder: weight
"""


@pytest.mark.parametrize("content, problem", [
    (b"quant_stage:\n  [", "recipe.yaml:2: not valid YAML"),
    (b"x: " + b"y" * (1 << 20), "recipe.yaml: over 1024 KiB, far larger than a recipe"),
    (b"runtime:\n  batch: \xff\n", "recipe.yaml: not UTF-8 text (bad byte at offset 18)"),
    (b"runtime:\n  batch: -1\n", "recipe.yaml:2: runtime.batch should be positive, got -1"),
    (b"runtime:\n  mla_cache_dtype: int8\n", "recipe.yaml:2: MLA cache dtype 'int8' is not supported"),
    (b"runtime:\n  max_context: 99999999\n", "recipe.yaml:2: runtime.max_context 99999999 is over the model's"),
], ids=["not-yaml", "oversized", "not-utf8", "negative-batch", "unknown-dtype", "past-the-model"])
def test_a_folders_unreadable_recipe_is_left_out_of_its_plan_with_a_note(quantized_tiny, tmp_path, capsys, content,
                                                                         problem):
    """A folder's recipe.yaml is provenance, which run and eval never read: `plan --model DIR` refused a folder they
    load ("... check the --recipe path", where no --recipe was given). Now the plan is made without its runtime:
    defaults, and one note on stderr says why."""
    folder = shutil.copytree(quantized_tiny, tmp_path / "q")
    (folder / "recipe.yaml").write_bytes(content)
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--max-context", "64")
    assert code == 0, err
    assert out.startswith(f"Memory plan for {folder}: batch 1, context 64")
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"klconvert: note: {folder}/{problem}"), err
    assert "leaves out the runtime: defaults of the folder's recipe.yaml" in lines[0] and "--recipe" not in lines[0]
    assert run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                   "cpu")[0] == 0


@pytest.mark.parametrize("bits", [None, "4", "8", "16"])
def test_a_folders_runtime_section_holds_at_any_bits(quantized_tiny, tmp_path, capsys, bits):
    """helper-146: `plan --model DIR --bits N` left out the folder's whole runtime: section -- its gpu_memory too, so
    a plan that did not fit (exit status 3) passed with no fit check and nothing said."""
    folder = shutil.copytree(quantized_tiny, tmp_path / "q")
    with open(folder / "recipe.yaml", "a") as f:
        f.write("runtime:\n  max_context: 2048\n  batch: 3\n  gpu_memory: 10MiB\n")
    code, out, err = run_cli(capsys, "plan", "--model", folder, *(["--bits", bits] if bits else []))
    assert code == 3, (out, err)
    assert out.startswith(f"Memory plan for {folder}: batch 3, context 2,048") and "10.0 MiB" in out + err, out


def test_a_folders_recipe_of_another_tool_gives_only_its_runtime_section(quantized_tiny, tmp_path, capsys):
    """llm-compressor writes its own recipe.yaml (GPTQModifier, ...), which is no recipe klconvert applies: the plan
    reads nothing of it but a runtime: section, and says nothing of the rest."""
    from klconvert.runtime.plan_report import plan_for

    folder = shutil.copytree(quantized_tiny, tmp_path / "q")
    (folder / "recipe.yaml").write_text(GPTQ_RECIPE)
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--max-context", "64")
    assert code == 0 and out.startswith(f"Memory plan for {folder}: batch 1") and err == "", err
    (folder / "recipe.yaml").write_text(GPTQ_RECIPE + "runtime:\n  batch: 3\n")
    assert plan_for(model=folder).batch == 3
