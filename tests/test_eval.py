"""`klconvert eval` on tiny checkpoints: a model against itself, against a perturbed copy, against a quantized copy."""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import klconvert
import klconvert.runtime.engine as engine_module
from klconvert.config import KimiLinearConfig
from klconvert.evaluate import evaluate, render_eval
from klconvert.models import BUNDLED_DIR
from klconvert.runtime import host_malloc
from klconvert.runtime.host_memory import DATA_BOUND, NAMED_FIT_SHARE, HostMemory, HostMemoryExhausted
from klconvert.runtime.memory_plan import MemoryPlan
from klconvert.tokenizer import MAX_ENCODE_CHARS, Tokenizer
from klconvert.units import size_text
from testkit import assert_one_line_error, gpu_with_free, run_cli

README = Path(__file__).parents[1] / "README.md"
TEXT = "The quick brown fox jumps over the lazy dog; a tiny model reads the same line again and again. " * 8


def perturbed_copy(src, out, relative_noise: float, seed: int = 0):
    """A copy of `src` with every 2-D bf16 weight times (1 + noise): the same model, a little off."""
    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if t.ndim == 2 and t.dtype == torch.bfloat16:
                tensors[name] = (t.float() * (1 + relative_noise * torch.randn(t.shape, generator=g))).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


class PassedTheCheck(Exception):
    """What a stand-in for the step after a check raises: the check passed."""


def passed(*args, **kwargs):
    raise PassedTheCheck


@pytest.fixture(scope="module")
def tiny_perturbed(tiny_released, tmp_path_factory):
    return perturbed_copy(tiny_released, tmp_path_factory.mktemp("ckpt") / "tiny-perturbed", relative_noise=0.05)


@pytest.fixture(scope="module")
def tiny_quantized(tiny_released, tmp_path_factory):
    """The tiny checkpoint through `klconvert quantize` at int8 and int4 (group size 32: tiny rows are 64 wide)."""
    from klconvert.quantize import quantize

    folder = tmp_path_factory.mktemp("quantized")
    return {bits: quantize(tiny_released, folder / f"int{bits}", bits=bits, group_size=32, device="cpu",
                           progress=False).path for bits in (8, 4)}


@pytest.mark.slow
def test_a_model_against_itself_is_exact(tiny_released):
    r = evaluate(tiny_released, tiny_released, TEXT, max_tokens=64)
    assert r.tokens == 64
    assert r.kl_mean == 0 and r.kl_p99 == 0 and r.top1_agreement == 1.0
    assert r.model_perplexity == r.reference_perplexity
    assert len(r.routing) == 7  # layers 1..7 are MoE in the tiny preset
    assert all(x.overlap == 1.0 and x.unchanged == 1.0 for x in r.routing)


@pytest.mark.slow
def test_a_perturbed_model_against_an_independent_computation(tiny_released, tiny_perturbed):
    r = evaluate(tiny_perturbed, tiny_released, TEXT, max_tokens=64, device="cpu")   # where the check below runs
    ids = Tokenizer.from_folder(tiny_released).encode(TEXT)[:64]
    ref = klconvert.load(tiny_released, device="cpu", max_context=64).forward([ids])[0].log_softmax(-1)
    got = klconvert.load(tiny_perturbed, device="cpu", max_context=64).forward([ids])[0].log_softmax(-1)
    kl = F.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
    assert r.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4) and 0 < r.kl_mean < 0.5
    assert r.kl_p99 >= r.kl_mean
    assert r.top1_agreement == pytest.approx((ref.argmax(-1) == got.argmax(-1)).float().mean().item())
    nll = -ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert r.reference_perplexity == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-5)
    own_nll = -got[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()   # the model's own log-probs
    assert r.model_perplexity == pytest.approx(torch.tensor(own_nll).exp().item(), rel=1e-5)
    assert abs(own_nll - nll) > 1e-3   # the two perplexities differ: a model's read from the reference would show
    assert 0 < r.routing_overlap < 1 and r.routing_unchanged <= r.routing_overlap
    assert r.worst_layer.overlap == min(x.overlap for x in r.routing)


def test_compare_takes_each_perplexity_from_its_own_run():
    """compare() on two made-up runs of different log-probs: each perplexity is exp of the mean NLL of its own run's
    log-probs of the next token (a model perplexity computed from the reference's log-probs once passed them all)."""
    from klconvert.config import KimiLinearConfig
    from klconvert.evaluate import ModelRun, compare
    from klconvert.presets import preset_config

    config = KimiLinearConfig.from_dict(preset_config("tiny"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (33,), generator=g).tolist()

    def run(scale: float) -> ModelRun:
        log_probs = (scale * torch.randn(len(ids), 50, generator=g)).log_softmax(-1)
        return ModelRun(log_probs, {}, (), config)

    ref, got = run(1.0), run(3.0)
    r = compare(ref, got, ids)
    targets = torch.tensor(ids[1:])[:, None]
    for figure, own in ((r.model_perplexity, got), (r.reference_perplexity, ref)):
        nll = -own.log_probs[:-1].gather(1, targets).mean().item()
        assert figure == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-6)
    assert r.model_perplexity != pytest.approx(r.reference_perplexity, rel=1e-2)


def test_the_two_models_are_never_loaded_together(tiny_released, tiny_perturbed, monkeypatch):
    load, alive = engine_module.load, []

    def tracking_load(*args, **kwargs):
        assert all(ref() is None for ref in alive), "the reference engine is still alive"
        engine = load(*args, **kwargs)
        alive.append(weakref.ref(engine))
        return engine

    monkeypatch.setattr(engine_module, "load", tracking_load)
    evaluate(tiny_perturbed, tiny_released, TEXT, max_tokens=16)
    assert len(alive) == 2


def test_eval_command_prints_the_table(tiny_released, tiny_perturbed, tmp_path, monkeypatch, capsys):
    from klconvert.cli import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    monkeypatch.setattr(sys, "argv", ["klconvert", "eval", "--model", str(tiny_perturbed), "--reference",
                                      str(tiny_released), "--text-file", str(text), "--max-tokens", "32"])
    main()
    out = capsys.readouterr().out
    for needle in ("tokens", "perplexity, reference", "perplexity, model", "KL(reference || model) / token, mean",
                   "p99", "top-1 agreement", "router: mean top-k overlap", "router: expert set unchanged",
                   "router: worst layer", "  layer 7"):
        assert needle in out, needle
    monkeypatch.setattr(sys, "argv", ["klconvert", "eval", "--model", str(tmp_path / "nowhere"), "--reference",
                                      str(tiny_released), "--text-file", str(text)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("klconvert: error: --model") and len(err.splitlines()) == 1


def test_eval_reads_the_text_from_standard_input_for_a_dash(tiny_released, tiny_perturbed, tmp_path, monkeypatch,
                                                             capsys):
    """README: `--text-file` reads any stream, `-` for stdin: the table for `--text-file -` with the text piped in is
    the one for the file holding it (no file named `-` in the working folder to read instead)."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    args = ("eval", "--model", tiny_perturbed, "--reference", tiny_released, "--max-tokens", "32", "--device", "cpu")
    code, from_file, err = run_cli(capsys, *args, "--text-file", text)
    assert code == 0, err
    with open(text, encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)   # a real stream, with a file descriptor, as a pipe has
        code, from_stdin, err = run_cli(capsys, *args, "--text-file", "-")
    assert code == 0, err
    assert from_stdin == from_file and re.search(r"^tokens +32$", from_stdin, re.M), from_stdin


def test_a_file_named_dash_given_as_dot_slash_dash_is_read_not_standard_input(tiny_released, tiny_perturbed, tmp_path,
                                                                             monkeypatch, capsys):
    """`--text-file ./-` read standard input, where `run --prompt-file ./-` read the file: click's Path made it `-`.
    Both flags are one type now, which keeps the name as typed."""
    from klconvert.cli import TEXT_FILE, cli

    for command, name in (("eval", "text_file"), ("run", "prompt_files")):
        assert next(param for param in cli.commands[command].params if param.name == name).type is TEXT_FILE
    monkeypatch.chdir(tmp_path)
    Path("-").write_text(TEXT)
    Path("other.txt").write_text("Standard input holds other words, which the table must not score. " * 8)
    args = ("eval", "--model", tiny_perturbed, "--reference", tiny_released, "--max-tokens", "32", "--device", "cpu")
    code, from_file, err = run_cli(capsys, *args, "--text-file", tmp_path / "-")
    assert code == 0, err
    with open("other.txt", encoding="utf-8") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        code, from_dash, err = run_cli(capsys, *args, "--text-file", "./-")
    assert code == 0, err
    assert from_dash == from_file


def test_the_readme_recipe_scores_a_file_as_the_command_does(tiny_released, tiny_perturbed, tmp_path, capsys,
                                                              monkeypatch):
    """helper-145: `eval --text-file` reads the file's bytes, CRs too, where the README's Python recipe read it in text
    mode, which turns CRLF into LF: on one CRLF file the two scored different tokens (perplexity 328.4 against 57.6).
    h221: the command drops a leading byte-order mark, as `run` does, which the recipe's "utf-8" kept (11 tokens
    scored against 14). The recipe, run as README.md writes it, reads such a file as the command does: the same
    table."""
    recipe = re.search(r'^with open\("doc\.txt".*\n +text = f\.read\(\)', README.read_text(), re.M)[0]
    text = tmp_path / "doc.txt"
    text.write_bytes(b"\xef\xbb\xbf" + ".\r\n".join(TEXT.split(". ")).encode() + b"\xef\xbb\xbf")  # only one mark
    code, out, err = run_cli(capsys, "eval", "--model", tiny_perturbed, "--reference", tiny_released, "--text-file",
                             text, "--max-tokens", "64", "--device", "cpu")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    recipe_ran: dict = {}
    exec(recipe, recipe_ran)
    result = evaluate(tiny_perturbed, tiny_released, recipe_ran["text"], max_tokens=64, device="cpu")
    assert out == render_eval(result, tiny_perturbed, tiny_released) + "\n"


def test_a_long_text_costs_the_memory_of_its_first_tokens_not_of_its_length(tiny_released, monkeypatch):
    """h221: evaluate encoded the whole text before cutting it to max_tokens -- a 29 MB str took 531 MB and 5.7 s for
    64 tokens, a corpus read whole ~10 GB. It encodes window by window now, as --text-file is read: what reading ten
    windows' text holds at its peak is about what encoding one window holds, and the ids are the whole text's first."""
    import tracemalloc

    tokenizer = Tokenizer.from_folder(tiny_released)
    text = TEXT * (10 * MAX_ENCODE_CHARS // len(TEXT))
    tracemalloc.start()
    try:
        tokenizer.encode(text[:MAX_ENCODE_CHARS])
        one_window = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seen = {}

    def measured(path, ids, *args, **kwargs):   # where the reference would run: what reading the text held
        seen["peak"], seen["ids"] = tracemalloc.get_traced_memory()[1], ids
        raise PassedTheCheck

    monkeypatch.setattr("klconvert.evaluate.run_model", measured)
    tracemalloc.start()
    try:
        with pytest.raises(PassedTheCheck):
            evaluate(tiny_released, tiny_released, text, max_tokens=64, device="cpu")
    finally:
        tracemalloc.stop()
    assert seen["ids"] == tokenizer.encode(text[:MAX_ENCODE_CHARS])[:64]
    assert seen["peak"] < 2 * one_window, f"{seen['peak']:,} bytes traced, one window {one_window:,}"


def test_an_apps_default_dtype_changes_no_measure(tiny_released, tiny_perturbed):
    """helper-149: under torch.set_default_dtype(torch.float64) the log-probabilities were held in float64, so every
    measure came out other than under float32 (the engine's output the same)."""
    want = evaluate(tiny_perturbed, tiny_released, TEXT, max_tokens=32, device="cpu")
    torch.set_default_dtype(torch.float64)
    try:
        got = evaluate(tiny_perturbed, tiny_released, TEXT, max_tokens=32, device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    assert got == want


def test_an_apps_default_device_changes_no_measure(tiny_released, tiny_quantized):
    """Under torch.set_default_device("meta") the ids evaluate handed the engine were made there ('input_ids should be
    whole numbers ..., got a meta tensor'), and loading a quantized model, the 0-d reach its scales are checked with
    ('Tensor.item() cannot be called on meta tensors'). Both are made on the host now: the same measures."""
    want = evaluate(tiny_quantized[4], tiny_released, TEXT, max_tokens=32, device="cpu")
    torch.set_default_device("meta")
    try:
        got = evaluate(tiny_quantized[4], tiny_released, TEXT, max_tokens=32, device="cpu")
    finally:
        torch.set_default_device(None)
    assert got == want


def test_eval_checks_each_model_once(tiny_released, tmp_path, monkeypatch, capsys):
    """The command checked --model itself, then evaluate checked it again (each resolving the name)."""
    import klconvert.cli as cli_module
    import klconvert.evaluate as evaluate_module
    import klconvert.models as models_module

    resolved = []

    def counting(value):
        resolved.append(str(value))
        return models_module.BUNDLED_DIR if value == "tiny" else Path(value)

    for module in (cli_module, evaluate_module, models_module):
        monkeypatch.setattr(module, "resolve_model", counting, raising=False)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", tiny_released, "--text-file", text,
                           "--max-tokens", "16", "--device", "cpu")   # refused before either model runs
    assert_one_line_error(code, err, "--model tiny is not the same architecture as --reference")
    assert resolved.count("tiny") == 1, resolved


def test_a_missing_model_is_worded_the_same_from_python(tmp_path):
    """evaluate said "no such folder; pass a checkpoint folder" where the command line points a hub id at the
    commands that pull it: one check, one wording."""
    with pytest.raises(klconvert.KLError, match=r"^--model acme/none: no such folder, and a hub repo id is not fetched "
                                                r"here -- `klconvert pull-and-quantize --model acme/none` pulls"):
        evaluate("acme/none", "tiny", TEXT, max_tokens=16)


@pytest.mark.parametrize("max_tokens", [1, 8.0, True, "8", None])
def test_max_tokens_is_a_whole_number_of_at_least_2(max_tokens):
    """8.0 was a TypeError from a slice, True ran as 1 token."""
    with pytest.raises(klconvert.KLError, match=rf"^max_tokens={re.escape(repr(max_tokens))} \(--max-tokens\) should "
                                                r"be a whole number >= 2"):
        evaluate("tiny", "tiny", TEXT, max_tokens=max_tokens)


@pytest.mark.parametrize("text, got", [(None, "a NoneType"), (TEXT.encode(), "a bytes"), ([1, 2, 3], "a list"),
                                       (5, "an int")])
def test_the_text_is_a_str(text, got):
    """None, bytes and a list of ids were TypeErrors from len() and the tokenizer's regex (an int: "got a int")."""
    with pytest.raises(klconvert.KLError, match=rf"^text should be the evaluation text as a str \(what --text-file "
                                                rf"holds\), got {got}$"):
        evaluate("tiny", "tiny", text, max_tokens=16)


@pytest.mark.parametrize("content", ["", "\n", "a"])
def test_a_text_file_of_fewer_than_2_tokens_is_refused_naming_it(tmp_path, capsys, content):
    """The line said "the evaluation text (--text-file)", not which file."""
    path = tmp_path / "short.txt"
    path.write_text(content)
    tokens = len(Tokenizer.from_folder("tiny").encode(content))
    assert tokens < 2
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", "tiny", "--text-file", path,
                           "--device", "cpu")
    said = {0: "0 tokens", 1: "1 token"}[tokens]   # "1 token(s)" before
    assert_one_line_error(code, err, f"--text-file {path}: holds {said} of text; give at least 2")
    with pytest.raises(klconvert.KLError, match=rf"^the evaluation text \(--text-file\) is {said} long; "
                                                r"give at least 2 tokens of text to evaluate on$"):
        evaluate("tiny", "tiny", content, device="cpu")


@pytest.mark.slow
def test_models_of_different_shapes_are_refused(tiny_released, tmp_path, monkeypatch):
    """From their config.json files, before either model runs."""
    import klconvert.evaluate as evaluate_module
    from klconvert.synth.checkpoint import synth

    short = synth("tiny", tmp_path / "short", layers=4, progress=False).path
    with monkeypatch.context() as m:
        m.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran before the check"))
        with pytest.raises(klconvert.KLError, match=r"--model .*short is not the same architecture as --reference "
                                                    r".*\(num_hidden_layers 4 vs 8; kda_layers \(1-indexed\) "
                                                    r"\[1, 2, 3\] vs \[1, 2, 3, 5, 6, 7\]; "):
            evaluate(short, tiny_released, TEXT, max_tokens=16)
    with pytest.raises(klconvert.KLError, match=r"the evaluation text \(--text-file\) is 1 token long; give at "
                                                r"least 2 tokens"):
        evaluate(tiny_released, tiny_released, "a", max_tokens=16)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(num_experts_per_token=3), "(num_experts_per_token 3 vs 2)"),   # router figures meaningless
    (lambda c: c.update(routed_scaling_factor=1.0, rms_norm_eps=1e-3),
     "(routed_scaling_factor 1.0 vs 2.446; rms_norm_eps 0.001 vs 1e-05)"),
    (lambda c: c.update(eos_token_id=[7], model_max_length=64), None),                   # the same function
])
def test_every_architecture_field_must_agree(tmp_path, monkeypatch, edit, needle):
    """Checked from the two config.json files before anything loads; the message names the fields that differ."""
    import json

    import klconvert.evaluate as evaluate_module
    from klconvert.models import BUNDLED_DIR

    config = json.loads((BUNDLED_DIR / "config.json").read_text())
    edited = dict(config)
    edit(edited)
    folders = [tmp_path / "model", tmp_path / "reference"]
    for folder, c in zip(folders, (edited, config)):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(c))
    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran before the check"))
    monkeypatch.setattr(evaluate_module.Tokenizer, "from_folder", passed)      # the next step after the check
    with pytest.raises(PassedTheCheck if needle is None else klconvert.KLError) as stopped:
        evaluate(*folders, TEXT, max_tokens=16)
    if needle is not None:
        assert f"is not the same architecture as --reference {folders[1]} {needle}; compare" in str(stopped.value)


@pytest.mark.parametrize("short", ["model", "reference"])
def test_a_text_over_either_models_length_limit_is_refused_before_either_runs(tmp_path, monkeypatch, short):
    """A --model whose model_max_length the text passes was refused only after the reference had run, naming a
    --max-context eval does not have (helper-129)."""
    import json
    import shutil

    import klconvert.evaluate as evaluate_module
    from klconvert.models import BUNDLED_DIR

    folder = shutil.copytree(BUNDLED_DIR, tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran before the check"))
    folders = (folder, BUNDLED_DIR) if short == "model" else (BUNDLED_DIR, folder)
    with pytest.raises(klconvert.KLError, match=rf"^the evaluation text's 1,500 tokens are over --{short} "
                                                rf"{re.escape(str(folder))}'s model_max_length 1,024; give max_tokens "
                                                r"\(--max-tokens\) 1024 or fewer$"):
        evaluate(*folders, TEXT * 10, max_tokens=1500)


def test_a_reference_without_config_is_named_by_its_flag(tmp_path):
    from klconvert.models import BUNDLED_DIR

    (tmp_path / "empty").mkdir()
    with pytest.raises(klconvert.KLError, match=r"empty/config\.json: no config\.json here; point --reference at"):
        evaluate(BUNDLED_DIR, tmp_path / "empty", TEXT, max_tokens=16)


@pytest.mark.slow
def test_log_probs_reach_the_host_one_prefill_segment_at_a_time(tiny_released, monkeypatch):
    """run_model fills its [T, V] log-probs segment by segment; they match one whole-text forward to the bit."""
    from klconvert.evaluate import run_model

    ids = Tokenizer.from_folder(tiny_released).encode(TEXT)[:40]
    whole = klconvert.load(tiny_released, device="cpu", max_context=64).forward([ids])[0].log_softmax(-1)
    monkeypatch.setattr(engine_module, "PREFILL_SEGMENT", 16)     # 40 tokens: segments of 16, 16 and 8
    seen = []
    forward_segments = engine_module.Engine.forward_segments
    monkeypatch.setattr(engine_module.Engine, "forward_segments",
                        lambda self, x: (seen.append(s.shape[1]) or s for s in forward_segments(self, x)))
    monkeypatch.setattr(engine_module.Engine, "forward", lambda *a: pytest.fail("all logits at once"))
    run = run_model(tiny_released, ids, "cpu", None)
    assert seen == [16, 16, 8]
    assert torch.allclose(run.log_probs, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device, available, held", [
    ("cpu", 60 << 20, r"both models' log-probabilities and router choices over a 1,280-word vocabulary \([\d.]+ MB\), "
                      r"one model on the CPU with its memory plan \([\d.]+ MB\), the reference's state, cache and "
                      r"workspace, which stay mapped once it is freed \([\d.]+ MB\), the logits in hand \([\d.]+ MB\)"),
    ("cuda", 12 << 20, r"both models' log-probabilities and router choices over a 1,280-word vocabulary \([\d.]+ MB\), "
                       r"the logits in hand \([\d.]+ MB\)"),     # the model and its logits on the GPU
])
def test_a_text_eval_could_not_hold_is_refused_naming_the_largest_that_fits(tiny_released, monkeypatch, device,
                                                                            available, held):
    """Before either model loads. Only the two log-probs buffers were counted: on the CPU the model and each prefill
    segment's [S, vocab] logits were left out, and a --max-tokens the check passed ran out of memory in a traceback.
    The --max-tokens named passes the check, within NAMED_FIT_SHARE of the room (the next run measures it anew);
    one more does not fit that share."""
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: HostMemory(available, *DATA_BOUND))
    monkeypatch.setattr(evaluate_module, "run_model", passed)
    if device == "cuda":   # a GPU torch sees, which eval checks before anything else (nothing runs on it here)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    text = TEXT * 4                                                  # 1,028 tokens
    with pytest.raises(klconvert.KLError, match=r"^eval would hold [\d.]+ MB on the host for 1,000 tokens -- "
                                                + held + r" -- more than fits \(the model's plan, and the rest "
                                                r"within 80%\) in the [\d.]+ MB available under the "
                                                r"process's data-segment limit \(ulimit -d\); lower --max-tokens to "
                                                r"[\d,]+ or less, or raise ulimit -d$") as refused:
        evaluate(tiny_released, tiny_released, text, max_tokens=1000, device=device)
    fits = int(str(refused.value).split("lower --max-tokens to ")[1].split()[0].replace(",", ""))
    assert 2 <= fits < 1000
    monkeypatch.setattr(evaluate_module, "host_memory",
                        lambda: HostMemory(int(available * NAMED_FIT_SHARE), *DATA_BOUND))
    with pytest.raises(PassedTheCheck):
        evaluate(tiny_released, tiny_released, text, max_tokens=fits, device=device)
    with pytest.raises(klconvert.KLError, match=r"lower --max-tokens to [\d,]+ or less"):
        evaluate(tiny_released, tiny_released, text, max_tokens=fits + 1, device=device)


def test_the_max_tokens_a_refusal_names_is_written_as_the_flag_takes_it(tiny_released, monkeypatch):
    """"lower --max-tokens to 4,096" could not be typed back: --max-tokens, like every whole-number flag, reads the
    digits 0-9 alone (bench's --context and --batch take comma-separated lists, so no flag reads 4,096 as one number);
    the number to give is written in plain digits, as the host's and the device's refusals write theirs."""
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: HostMemory(60 << 20, *DATA_BOUND))
    monkeypatch.setattr(evaluate_module, "run_model", passed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the model and its logits on the GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(klconvert.KLError, match=r"for 10,000 tokens .*; lower --max-tokens to (\d+) or less, or raise "
                                                r"ulimit -d$") as refused:
        evaluate(tiny_released, tiny_released, TEXT * 40, max_tokens=10000, device="cuda")
    assert 1000 <= int(str(refused.value).split("lower --max-tokens to ")[1].split()[0]) < 10000


def test_a_text_past_all_the_host_has_is_not_told_to_raise_its_limit(tiny_released, monkeypatch):
    """eval said "or raise ulimit -d" where all of the host's memory (MemTotal) would not hold the tokens asked, which
    no limit raised gets past (h233's rule, which the engine's lines keep): it names the --max-tokens alone."""
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: HostMemory(60 << 20, *DATA_BOUND, total=60 << 20))
    monkeypatch.setattr(evaluate_module, "run_model", passed)
    with pytest.raises(klconvert.KLError, match=r"\(ulimit -d\); lower --max-tokens to [\d,]+ or less$"):
        evaluate(tiny_released, tiny_released, TEXT * 4, max_tokens=1000, device="cpu")


@pytest.mark.parametrize("total, advice", [(None, ": raise ulimit -d"),
                                           (1 << 20, ", nor would in all of this host's 1.05 MB")],
                         ids=["host", "whole-host"])
def test_a_host_that_cannot_hold_the_model_names_no_max_tokens(tiny_released, monkeypatch, total, advice):
    """Where not even 2 tokens fit, the limit's remedy is said only where all of the host's memory would hold them."""
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: HostMemory(1 << 20, *DATA_BOUND, total=total))
    monkeypatch.setattr(evaluate_module, "run_model", passed)
    with pytest.raises(klconvert.KLError, match=r"one model on the CPU .* not even 2 tokens fit" + re.escape(advice)
                       + "$"):
        evaluate(tiny_released, tiny_released, TEXT, max_tokens=16, device="cpu")


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_the_plan_eval_counts_is_the_one_a_cpu_engine_makes(tiny_released, tiny_quantized, bits, dtype):
    """eval sizes the model before it loads, from config.json; the engine, loaded, plans the same bytes: on the CPU
    every weight is dequantized to the compute dtype, so an int4 folder's stored size is not what it holds; in fp32
    the CPU forms' decode copies are counted too (left out, eval's plan was 40% of the weights short), to within
    their constants, which the engine measures once bound."""
    from klconvert.config import KimiLinearConfig
    from klconvert.evaluate import _plan_on_the_host

    folder = tiny_released if bits is None else tiny_quantized[bits]
    config = KimiLinearConfig.from_file(folder / "config.json")
    planned = _plan_on_the_host(config, 300, "cpu", dtype).total
    bound = klconvert.load(folder, device="cpu", dtype=dtype, max_context=300, all_logits=True).plan.total   # eval's
    assert 0 <= bound - planned < bound / 10**5
    assert _plan_on_the_host(config, 300, "cuda", dtype) is None


def test_eval_plans_every_positions_logits(tiny_released, monkeypatch):
    """eval reads every position's logits (forward_segments): its engines plan them (all_logits), so that a context
    whose logits do not fit is refused before the weights load, naming --max-tokens, as _plan_on_the_host counts them;
    a plan for generate leaves them out."""
    import klconvert.evaluate as evaluate_module
    from klconvert.runtime import engine as engine_module

    plans, load = [], engine_module.load
    monkeypatch.setattr(engine_module, "load", lambda *a, **k: plans.append((e := load(*a, **k)).plan) or e)
    run = evaluate_module.run_model(tiny_released, list(range(1, 40)), "cpu", None)
    assert run.log_probs.shape[0] == 39 and [plan.all_logits for plan in plans] == [True]


def test_the_refusal_on_the_command_line_is_one_line(tiny_released, tmp_path, monkeypatch, capsys):
    import klconvert.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: HostMemory(60 << 20, *DATA_BOUND))
    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran before the check"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    code, _, err = run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released, "--text-file",
                           text, "--max-tokens", "1000", "--device", "cpu")
    assert_one_line_error(code, err, "eval would hold", "lower --max-tokens to")


@pytest.mark.parametrize("where, what", [
    pytest.param("klconvert.runtime.engine.load",
                 r"a run of .*tiny over 16 tokens \(the model, its log-probabilities and logits\)", id="load"),
    pytest.param("klconvert.runtime.engine.Engine.forward_segments", r"a run of .*tiny over 16 tokens",
                 marks=pytest.mark.slow, id="forward"),                         # after a load
    pytest.param("klconvert.evaluate.compare", r"the KL sum's rows \(\[256, 1,280\] fp32\)",
                 marks=pytest.mark.slow, id="compare"),                         # after both runs
])
def test_the_allocator_refusing_during_eval_is_out_of_memory_in_one_line(tiny_released, tmp_path, monkeypatch,
                                                                          capsys, where, what):
    """torch's CPU allocator raises a RuntimeError, not a MemoryError: past what the check counts (or on a host
    that changed after it), eval ended in the allocator's traceback, exit status 1."""
    module, _, name = where.rpartition(".")
    owner = engine_module.Engine if module.endswith("Engine") else sys.modules[module]
    real = getattr(owner, name)

    def refused(*args, **kwargs):
        torch.empty(1 << 60, dtype=torch.uint8)       # 1 EiB: refused by the real allocator, on any host
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, refused)
    with pytest.raises(HostMemoryExhausted, match=r"^out of host memory \(or the process's memory limit\) allocating "
                                                  + what + r".*: .*DefaultCPUAllocator: can't allocate memory") as e:
        evaluate(tiny_released, tiny_released, TEXT, max_tokens=16, device="cpu")
    assert "\n" not in str(e.value)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released, "--text-file",
                           text, "--max-tokens", "16", "--device", "cpu")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit)")


def test_onednn_refusing_a_primitive_during_eval_is_out_of_memory_in_one_line(tiny_released, tmp_path, monkeypatch,
                                                                             capsys):
    """At the edge of ulimit -d the model's bf16 matmul on the CPU once raised oneDNN's RuntimeError "could not create
    a primitive", a traceback: it is one line, out of host memory, naming the run."""
    def refused(*_, **__):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr("klconvert.runtime.model.KimiLinear.hidden_states", refused)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released, "--text-file",
                           text, "--max-tokens", "16", "--device", "cpu")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit) allocating a prefill's "
                          "activations (16 tokens): could not create a primitive")


def test_an_out_of_memory_run_names_the_model_as_given(monkeypatch, tmp_path, capsys):
    """`--reference tiny` was named as the bundled model's install path ("a run of /.../klconvert/bundled")."""
    real = engine_module.load

    def refused(*args, **kwargs):
        torch.empty(1 << 60, dtype=torch.uint8)       # 1 EiB: refused by the real allocator, on any host
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "load", refused)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", "tiny", "--text-file", text,
                           "--max-tokens", "16", "--device", "cpu")
    line = assert_one_line_error(code, err, "allocating a run of --reference tiny over 16 tokens")
    assert str(BUNDLED_DIR) not in line


@pytest.mark.slow
def test_render_names_the_worst_layer(tiny_released, tiny_perturbed):
    r = evaluate(tiny_perturbed, tiny_released, TEXT, max_tokens=32)
    text = render_eval(r, "q", "src")
    assert f"layer {r.worst_layer.layer}: overlap" in text


@pytest.mark.slow
def test_a_quantized_model_against_its_source(tiny_released, tiny_quantized):
    int8, int4 = (evaluate(tiny_quantized[bits], tiny_released, TEXT, max_tokens=64) for bits in (8, 4))
    assert 0 < int8.kl_mean < int4.kl_mean < 1
    assert int8.routing_overlap > int4.routing_overlap > 0.5
    assert int8.routing_unchanged > int4.routing_unchanged
    assert int8.reference_perplexity == int4.reference_perplexity


@pytest.mark.slow
def test_a_model_quantized_from_a_tied_source_against_it(tiny_released, tmp_path):
    """A tied source (tie_word_embeddings true, no lm_head tensor) quantizes to a folder that stores lm_head, untied:
    the same function, so eval compares them rather than calling them two architectures."""
    import json

    from klconvert.quantize import quantize

    tied = shutil.copytree(tiny_released, tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    index = json.loads((tied / "model.safetensors.index.json").read_text())
    shard = tied / index["weight_map"].pop("lm_head.weight")
    save_file({n: t for n, t in load_file(shard).items() if n != "lm_head.weight"}, shard, metadata={"format": "pt"})
    (tied / "model.safetensors.index.json").write_text(json.dumps(index))
    quantized = quantize(tied, tmp_path / "q", bits=8, group_size=32, device="cpu", progress=False).path
    assert json.loads((quantized / "config.json").read_text())["tie_word_embeddings"] is False
    r = evaluate(quantized, tied, TEXT, max_tokens=32)
    assert r.tokens == 32 and 0 < r.kl_mean < 1


def _swap_special_ids(folder: Path, first: str = "<|im_end|>", second: str = "<|im_user|>") -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    decoder = config["added_tokens_decoder"]
    a, b = (next(key for key, entry in decoder.items() if entry["content"] == text) for text in (first, second))
    decoder[a]["content"], decoder[b]["content"] = second, first
    path.write_text(json.dumps(config))


def _swap_ranks(folder: Path) -> None:
    """Two BPE tokens trade ranks (lines 100 and 101 trade their tokens)."""
    path = folder / "tiktoken.model"
    lines = path.read_bytes().splitlines()
    (a, ra), (b, rb) = lines[100].split(), lines[101].split()
    lines[100], lines[101] = b + b" " + ra, a + b" " + rb
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("damage, needle", [
    (_swap_special_ids, "special token '<|im_end|>' is id {user} in --model's tokenizer, {end} in --reference's"),
    (_swap_ranks, "its tiktoken.model ranks other tokens than --reference's"),
], ids=["special-id-moved", "bpe-ranks"])
def test_a_model_whose_tokenizer_is_not_the_references_is_refused(tiny_released, tmp_path, monkeypatch, capsys,
                                                                   damage, needle):
    """eval reads the text with the reference's tokenizer and scores the model on those ids: a model folder whose own
    tokenizer gives them other tokens (a special token's id moved) was scored on the wrong ids, silently."""
    import klconvert.evaluate as evaluate_module

    model = shutil.copytree(tiny_released, tmp_path / "model")
    damage(model)
    monkeypatch.setattr(evaluate_module, "run_model", lambda *a: pytest.fail("a model ran before the check"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", model, "--reference", tiny_released, "--text-file", text,
                           "--max-tokens", "16", "--device", "cpu")
    ids = Tokenizer.from_folder(tiny_released).special_tokens
    needle = needle.format(end=ids["<|im_end|>"], user=ids["<|im_user|>"])
    assert_one_line_error(code, err, f"--model {model}'s tokenizer is not --reference {tiny_released}'s: {needle}",
                          "compare a model with its own source")


def test_a_model_folder_without_a_tokenizer_is_scored_with_the_references(tiny_released, tmp_path, monkeypatch):
    """Weights alone (no tokenizer files) say nothing against the reference's tokenizer: eval goes on."""
    import klconvert.evaluate as evaluate_module

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors.index.json", *(p.name for p in tiny_released.glob("*.safetensors"))):
        shutil.copy(tiny_released / name, model / name)
    monkeypatch.setattr(evaluate_module, "run_model", passed)
    with pytest.raises(PassedTheCheck):
        evaluate(model, tiny_released, TEXT, max_tokens=16, device="cpu")
    shutil.copy(tiny_released / "tiktoken.model", model / "tiktoken.model")
    shutil.copy(tiny_released / "tokenizer_config.json", model / "tokenizer_config.json")
    with pytest.raises(PassedTheCheck):   # the same tokenizer
        evaluate(model, tiny_released, TEXT, max_tokens=16, device="cpu")


def test_a_reference_without_config_is_named_by_its_flag_on_the_command_line(tmp_path, capsys):
    """The command read the reference's config.json before evaluate and blamed --model for it."""
    (tmp_path / "empty").mkdir()
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", "tiny", "--reference", tmp_path / "empty", "--text-file", text,
                           "--device", "cpu")
    assert_one_line_error(code, err, "empty/config.json: no config.json here; point --reference at")


@pytest.mark.parametrize("damage", ["no shards", "a truncated shard"])
def test_a_model_whose_weights_cannot_be_read_is_refused_before_the_reference_runs(tiny_released, tmp_path,
                                                                                  monkeypatch, capsys, damage):
    """Only --model's config.json and tokenizer were checked first: a bf16 48B reference ran (minutes) before its
    missing or truncated shard was found."""
    import klconvert.evaluate as evaluate_module

    model = shutil.copytree(tiny_released, tmp_path / "model")
    for shard in model.glob("*.safetensors"):
        if damage == "no shards":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:1_000_000])
    ran = []
    monkeypatch.setattr(evaluate_module, "run_model", lambda path, *args: ran.append(path) or pytest.fail("ran"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "eval", "--model", model, "--reference", tiny_released, "--text-file", text,
                           "--max-tokens", "16", "--device", "cpu")
    assert_one_line_error(code, err, str(model))
    assert ran == []


NOT_FREE = 40 << 20   # free on a GPU: the tiny model's weights fit, with a context of some hundred tokens


def test_a_plan_past_the_gpu_names_the_model_and_a_max_tokens_that_fits(tmp_path, monkeypatch, capsys):
    """A model whose plan the GPU could not hold was told to "lower max_context (--max-context) to 704 or less", a
    flag eval does not take, and not which of its two models it was. The line names the model and eval's
    --max-tokens; the value it names passes the plan (a CUDA GPU stands in, with NOT_FREE left: the plan is checked
    before any weight is read onto it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu_with_free(monkeypatch, NOT_FREE)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 8)                                        # over 2,000 tokens
    args = ("eval", "--model", "tiny", "--reference", "tiny", "--text-file", text, "--device", "cuda", "--max-tokens")
    code, _, err = run_cli(capsys, *args, "2000")
    line = assert_one_line_error(code, err)
    said = re.fullmatch(rf"klconvert: error: --reference tiny: the plan needs [\d.]+ MB but cuda has "
                        rf"{re.escape(size_text(NOT_FREE))} free for this process; lower --max-tokens to (\d+) or "
                        r"less, or stop what else holds the GPU", line)
    assert said and int(said.group(1)) < 2000, line
    monkeypatch.setattr(engine_module, "bind", passed)
    with pytest.raises(PassedTheCheck):
        run_cli(capsys, *args, said.group(1))


def test_a_plan_past_the_host_once_the_reference_ran_names_the_model(tiny_released, tmp_path, monkeypatch, capsys):
    """The host left less once the reference had run than eval's own check found (here: no limit, then
    a data-segment limit the model's plan is past): the line names --model, and eval's --max-tokens."""
    import klconvert.evaluate as evaluate_module

    limit = klconvert.load(tiny_released, device="cpu", max_context=64).plan.total_for(500)
    plans: list[int] = []

    def host_memory(**_):   # the reference's plan has the host to itself; the model's, `limit`
        plans.append(1)
        return None if len(plans) == 1 else HostMemory(limit, *DATA_BOUND)

    monkeypatch.setattr(evaluate_module, "host_memory", lambda: None)
    monkeypatch.setattr(engine_module, "host_memory", host_memory)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    code, _, err = run_cli(capsys, "eval", "--model", tiny_released, "--reference", tiny_released, "--text-file", text,
                           "--max-tokens", "1000", "--device", "cpu")
    line = assert_one_line_error(code, err)
    assert re.fullmatch(rf"klconvert: error: --model {re.escape(str(tiny_released))}: the plan needs [\d.]+ MB but cpu "
                        r"has [\d.]+ MB available under the process's data-segment limit \(ulimit -d\); lower "
                        r"--max-tokens to \d+ or less, or raise ulimit -d", line), line


def test_free_blocks_past_the_weights_are_no_room_for_the_models_run(tiny_released, monkeypatch, capsys):
    """Once the reference ran, every byte of the allocator's free blocks was room for the model: under ulimit -d
    371-379 MB (1,024 tokens) 5 runs of 9 passed the model's plan and were then refused a 17 MB block, their 56 MB
    of free blocks split by the weights. The free blocks are room for the weights alone, and eval checks the model's
    whole run -- its plan, its log-probabilities and logits -- before it loads: refused naming --model and a
    --max-tokens, which passes."""
    import klconvert.evaluate as evaluate_module

    config = KimiLinearConfig.from_file(tiny_released / "config.json")
    tokens, free_blocks = 500, 1 << 30

    plan = evaluate_module._plan_on_the_host(config, tokens, "cpu", None)
    kept, model, logits = evaluate_module._host_bytes(tokens, config, plan, runs=1)   # the model's run, as counted
    need, weights = model + math.ceil((kept + logits) / evaluate_module.HOST_SHARE), plan.weights
    checks: list[int] = []

    def host_memory():   # the first check passes; the second finds the model's run a byte short but for free blocks
        checks.append(1)
        return HostMemory(1 << 40) if len(checks) == 1 else HostMemory(need - 1 + free_blocks - weights,
                                                                       *DATA_BOUND, free_blocks=free_blocks)
    monkeypatch.setattr(evaluate_module, "host_memory", host_memory)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: None)
    real_run = evaluate_module.run_model
    monkeypatch.setattr(evaluate_module, "run_model", lambda *args, reference=False, **kwargs:
                        real_run(*args, reference=True, **kwargs) if reference else passed())
    with pytest.raises(klconvert.KLError) as refused:
        evaluate(tiny_released, tiny_released, TEXT * 4, max_tokens=tokens, device="cpu")
    assert re.fullmatch(rf"--model {re.escape(str(tiny_released))}: once the reference ran, its run would hold "
                        rf"[\d.]+ MB on the host for {tokens} tokens -- its log-probabilities and router choices over "
                        r"a 1,280-word vocabulary \([\d.]+ MB\), one model on the CPU with its memory plan "
                        r"\([\d.]+ MB\), the logits in hand \([\d.]+ MB\) -- more than fits \(the model's plan, and "
                        r"the rest within 80%\) in the [\d.]+ MB available under the process's data-segment limit "
                        r"\(ulimit -d\); lower --max-tokens to \d+ or less, or raise ulimit -d", str(refused.value)), \
        str(refused.value)
    fits = int(str(refused.value).split("lower --max-tokens to ")[1].split()[0])
    assert 2 <= fits < tokens
    checks.clear()
    with pytest.raises(PassedTheCheck):   # the same free blocks, left as the weights' room at the named tokens
        evaluate(tiny_released, tiny_released, TEXT * 4, max_tokens=fits, device="cpu")


# In a fresh process (a worker's heap holds other tests' free blocks): an eval of the bundled model's int4 copy
# against it (of the --max-tokens given) under a data-segment limit (the headroom given) over what the imports mapped,
# or the reference's run alone with
# the anonymous memory it leaves resident. glibc keeps the reference's freed weights as free blocks of its heap, mapped
# (VmData) and, until handed back, resident.
DATA_LIMITED_EVAL = """
import re, resource, sys
from klconvert.evaluate import evaluate
data = int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
limit = data + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
print(evaluate(sys.argv[1], "tiny", sys.stdin.read(), max_tokens=int(sys.argv[3]), device="cpu").tokens)
"""
REFERENCE_RESIDENT = """
import re, sys
from klconvert.evaluate import model_folder, run_model
from klconvert.tokenizer import Tokenizer

def resident():
    return int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10

ids = Tokenizer.from_folder(model_folder("tiny", "--reference")).encode(sys.stdin.read())[:64]
before = resident()
run_model(model_folder("tiny", "--reference"), ids, "cpu", None, "--reference tiny", reference=True)
print(resident() - before)
"""
# The eval needs 92 MB by its own check (one model); the reference's run maps 80-90 MB, 70-80 MB of it free blocks
# once it is freed, and the model's run up to 10 MB more: 125 MB holds it, where counting the free blocks as used
# left the model 35-50 MB of the 76 MB its plan needs.
DATA_HEADROOM = 125 << 20
# The run keeps its log-probabilities (0.3 MB); the weights it freed, 66 MB with their fp32 decode copies, stayed
# resident (77 MB more RssAnon after it than before); given back, 12 MB more.
LEFT_RESIDENT = 32 << 20


def _fresh_python(script: str, *args: str, text: str = TEXT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], input=text, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.skipif(not (host_malloc.glibc() and hasattr(ctypes.CDLL(None), "mallinfo2")),
                    reason="glibc's malloc, 2.33 on (mallinfo2)")
def test_the_model_runs_where_one_model_fits_once_the_reference_is_freed(tmp_path):
    """Under `ulimit -d` eval refused --model once the reference had run (the plan needs 76.36 MB but cpu has
    18.05 MB available), though the model ran there: the host's figure counted the reference's freed weights, which
    glibc kept as free blocks of its heap and served the model from, as used. It counts them as room now."""
    from klconvert.quantize import quantize

    model = quantize("tiny", tmp_path / "q4", bits=4, device="cpu", progress=False).path
    done = _fresh_python(DATA_LIMITED_EVAL, str(model), str(DATA_HEADROOM), "64")
    assert done.returncode == 0 and done.stdout.split() == ["64"], done.stderr[-2000:]


# A limit under which the bundled model's eval of 4,096 tokens is refused before the reference runs, naming about
# 1,100: the reference then leaves 15-30 MB out of the model's room (its freed blocks past its weights), run to run,
# which at a few hundred tokens or fewer can be more than its plan counts besides the weights (not traced: likely
# what binding the checkpoint reads, no plan's)
NAMED_HEADROOM = 200 << 20


@pytest.mark.slow
@pytest.mark.skipif(not (host_malloc.glibc() and hasattr(ctypes.CDLL(None), "mallinfo2")),
                    reason="glibc's malloc, 2.33 on (mallinfo2)")
def test_the_max_tokens_named_before_the_reference_passes_once_it_ran(tmp_path):
    """Under ulimit -d 336 MB eval refused 1,024 tokens up front, "lower --max-tokens to 963", and 963 then, after
    the whole reference run, "lower --max-tokens to 645": the first check counted all the memory the reference's run
    freed as the model's, where the state, cache and workspace it left as free blocks stayed mapped, room for the
    model's weights alone. The first check counts them now: the figure it names runs."""
    from klconvert.quantize import quantize

    model = quantize("tiny", tmp_path / "q4", bits=4, device="cpu", progress=False).path
    text = TEXT * 40   # over 4,096 tokens
    refused = _fresh_python(DATA_LIMITED_EVAL, str(model), str(NAMED_HEADROOM), "4096", text=text)
    named = re.search(r"^klconvert\.errors\.KLError: eval would hold .* lower --max-tokens to ([\d,]+) or less",
                      refused.stderr, re.M)
    assert refused.returncode != 0 and named, refused.stderr[-2000:]
    fits = named[1].replace(",", "")
    done = _fresh_python(DATA_LIMITED_EVAL, str(model), str(NAMED_HEADROOM), fits, text=text)
    assert done.returncode == 0 and done.stdout.split() == [fits], done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not host_malloc.glibc(), reason="glibc's malloc")
def test_the_references_freed_weights_are_handed_back_to_the_host():
    """The reference's freed weights stayed resident, which the host's MemAvailable and a cgroup's usage count as
    used when the model's plan is checked: a host that holds one model but not two was refused as under ulimit -d."""
    done = _fresh_python(REFERENCE_RESIDENT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) < LEFT_RESIDENT


def _kept_plans(monkeypatch) -> list[MemoryPlan]:
    """Every memory plan an engine makes from here on, in order (the reference's first)."""
    plans: list[MemoryPlan] = []
    monkeypatch.setattr(engine_module, "MemoryPlan", lambda *args, **kwargs: plans.append(MemoryPlan(*args, **kwargs))
                        or plans[-1])
    return plans


def test_a_reference_the_gpu_cannot_hold_is_told_so_not_to_quantize(tmp_path, monkeypatch, capsys):
    """A reference whose weights alone were past the GPU was told "use a quantized model (klconvert quantize --bits
    4)", which leaves eval nothing to measure against, and not which model it was; one whose weights fitted with no
    room left for a context was told "no context fits a batch of 1: lower --max-tokens", a batch eval cannot lower
    and a context no smaller --max-tokens makes fit. Each names the model, the weights' size, and to stop what else
    holds the GPU, or, where even the whole card is too small, that it cannot hold the model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    plans = _kept_plans(monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ("eval", "--model", "tiny", "--reference", "tiny", "--text-file", text, "--device", "cuda", "--max-tokens",
            "64")
    for free, room in ((1 << 20, "the weights alone need {}"), (None, "even the smallest context does not fit beside "
                                                                      "the weights ({})")):
        free = free or plans[0].weights   # the weights, and not a byte more
        for total, advice in ((80 << 30, "stop what else holds the GPU"), (free, "this device cannot hold this model")):
            gpu_with_free(monkeypatch, free, total)
            code, _, err = run_cli(capsys, *args)
            line = assert_one_line_error(code, err)
            assert re.fullmatch(rf"klconvert: error: --reference tiny: the plan needs [\d.]+ MB but cuda has "
                                rf"{re.escape(size_text(free))} free for this process; "
                                + re.escape(room.format(size_text(plans[0].weights)))
                                + f": {advice}", line), line


FEWER_BITS_SAID = "use a model of fewer bits (klconvert quantize --bits 4), or "


@pytest.mark.parametrize("bits, fewer", [(16, FEWER_BITS_SAID), (8, FEWER_BITS_SAID), (4, "")],
                         ids=["bf16", "int8", "int4"])
def test_a_model_whose_weights_leave_the_host_no_room_names_it_and_fewer_bits_where_they_hold_less(
        tiny_released, tiny_quantized, tmp_path, monkeypatch, capsys, bits, fewer):
    """eval's --model, past what the host had left once the reference ran, was told "use a quantized model" at 4
    bits too, and where its weights fitted with no room for a context, "no context fits a batch of 1: lower
    --max-tokens", naming neither the model nor a lever that helps. Each line names the model and its weights, and
    fewer bits only where they would hold less (fewer_bits_hold_less)."""
    import klconvert.evaluate as evaluate_module

    model = tiny_released if bits == 16 else tiny_quantized[bits]
    plans = _kept_plans(monkeypatch)
    monkeypatch.setattr(evaluate_module, "host_memory", lambda: None)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    limit, room = 1 << 20, "the weights alone need {}"
    for _ in range(2):   # then the model's weights, and not a byte more
        plans.clear()    # the reference's plan has the host to itself; the model's, `limit`
        monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(limit, *DATA_BOUND) if plans else None)
        code, _, err = run_cli(capsys, "eval", "--model", model, "--reference", tiny_released, "--text-file", text,
                               "--max-tokens", "64", "--device", "cpu")
        line = assert_one_line_error(code, err)
        said = f"{room.format(size_text(plans[-1].weights))}: {fewer}raise ulimit -d"
        assert re.fullmatch(rf"klconvert: error: --model {re.escape(str(model))}: the plan needs [\d.]+ MB but cpu has "
                            rf"{re.escape(size_text(limit))} available under the process's data-segment limit "
                            r"\(ulimit -d\); " + re.escape(said), line), line
        limit, room = plans[-1].weights, "even the smallest context does not fit beside the weights ({})"


@pytest.mark.parametrize("overflowing", ["--model", "--reference"])
def test_logits_that_are_not_finite_name_the_model_that_computed_them(tiny_copy, tiny_released, tmp_path, capsys,
                                                                      overflowing):
    """A final norm of 3e38 overflows the logits: the line was the same whichever model held it, and one whose
    reference overflowed would blame (and download again) the quantized model."""
    norm = "model.norm.weight"
    shard = tiny_copy / json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"][norm]
    tensors = load_file(shard)
    tensors[norm].fill_(3e38)
    save_file(tensors, shard, metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    models = {"--model": tiny_released, "--reference": tiny_released, overflowing: tiny_copy}
    code, _, err = run_cli(capsys, "eval", *(part for pair in models.items() for part in pair), "--text-file", text,
                           "--max-tokens", "16", "--device", "cpu")
    assert_one_line_error(code, err, f"klconvert: error: {overflowing} {tiny_copy}: the model computed NaN or "
                                     "infinite logits for the prompt: its weights")
