"""The Python API (`klconvert.load` and its Engine) refuses bad arguments in one KLError line, as the CLI's flags
do: garbage tokens, NaN logits and allocator or index errors before."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import klconvert
from klconvert.errors import KLError
import klconvert.runtime.engine as engine_module
from klconvert.config import KimiLinearConfig
from klconvert.runtime.device_memory import PromptsDoNotFit
from klconvert.runtime.engine import Engine
from klconvert.runtime.host_memory import (ADDRESS_SPACE_BOUND, DATA_BOUND, NAMED_FIT_SHARE, HostMemory,
                                           HostMemoryExhausted)
from klconvert.units import size_text, size_texts
from testkit import assert_one_line_error, gpu_with_free, run_cli


@pytest.fixture(scope="module")
def engine(tiny_released):
    return klconvert.load(tiny_released, device="cpu", max_context=64)


@pytest.mark.parametrize("ids, bad", [([[1, -5, 3]], -5), ([[1, 2, 10**6]], 10**6)])
def test_the_offending_token_id_is_named(engine, ids, bad):
    with pytest.raises(KLError, match=rf"^token id {bad} is outside the vocabulary"):
        engine.generate(ids, 2)
    with pytest.raises(KLError, match=rf"^token id {bad} is outside the vocabulary"):
        engine.forward(torch.tensor(ids))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature nan should be a finite number >= 0"),
    (dict(temperature=-1.0), "temperature -1.0 should be"),
    (dict(top_p=float("nan")), r"top_p nan should be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p 1.5 should be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p 0.0 should be in \(0, 1\]"),
    (dict(seed=2**70), r"seed 1180591620717411303424 should be a whole number 0 \.\. 2\*\*64 - 1"),
    (dict(seed=-1), r"seed -1 should be a whole number 0 \.\. 2\*\*64 - 1 \(or None for a fresh one\)"),
    (dict(seed=2**64), "seed 18446744073709551616 should be"),
    (dict(seed=3.0), "seed 3.0 should be"),
    (dict(seed=True), "seed True should be"),
    (dict(temperature=10**400), "should be a finite number >= 0"),
    (dict(temperature=True), "temperature True should be"),
    (dict(top_p=True), r"top_p True should be in \(0, 1\]"),
])
def test_sampling_arguments_are_checked(engine, kwargs, message):
    """A NaN temperature sampled token 0 at every step; a seed of 2**70 was a ValueError from torch, -1 drew as
    2**64 - 1 though the message said 0 .. 2**64 - 1."""
    with pytest.raises(KLError, match=message):
        engine.generate([[1, 2, 3]], 2, **kwargs)


@pytest.mark.parametrize("call, callback", [("generate", "on_token"), ("generate", "on_prefill"),
                                            ("prefill", "progress"), ("decode_loop", "on_token")])
def test_a_callback_that_is_no_function_is_refused_before_anything_runs(engine, call, callback):
    """on_token=1 was a TypeError after the first token, mid-generation."""
    engine.decoder(1)
    runs = {"generate": lambda **kw: engine.generate([[1, 2, 3]], 2, **kw),
            "prefill": lambda **kw: engine.prefill([[1, 2, 3]], **kw),
            "decode_loop": lambda **kw: engine.decode_loop(engine._steps[1], torch.zeros(1, engine.config.vocab_size),
                                                          2, **kw)}
    with pytest.raises(KLError, match=rf"^{callback} should be a function \(or None\), got an int$"):
        runs[call](**{callback: 1})
    def no_arguments():
        pass

    # a function of other arguments was a TypeError once the first token or segment was done
    with pytest.raises(KLError, match=rf"^{callback} is called as {callback}\(.*\), which "
                                      rf".*no_arguments\(\) does not take; give a function of those arguments$"):
        runs[call](**{callback: no_arguments})
    runs[call](**{callback: lambda *arguments: None})   # this one takes them


@pytest.mark.parametrize("batch, message", [(-1, r"decoder's batch -1 should be a whole number >= 1"),
                                            (0, r"decoder's batch 0 should be"), (1.0, r"decoder's batch 1\.0 should"),
                                            (2, r"2 sequences are over the planned batch 1")])
def test_decoder_takes_a_batch_the_plan_holds(engine, batch, message):
    """decoder(-1) and decoder(0) gave steps (of one and of no sequence)."""
    with pytest.raises(KLError, match=message):
        engine.decoder(batch)


def test_decode_loop_takes_its_engines_step_and_the_logits_of_its_sequences(engine, tiny_released):
    """A list, a [vocab] row, a batch of 2 for a step of 1, another engine's step or None were AttributeError,
    TypeError and RuntimeError from inside the loop; a [1, 7] row sampled ids from 7 columns; a loop past the planned
    context was an IndexError."""
    step, vocab = engine.decoder(1), engine.config.vocab_size
    step.positions.fill_(0)
    for logits, got in [([[0.0] * vocab], "a list"), (torch.zeros(vocab), f"shape \\[{vocab}\\]"),
                        (torch.zeros(2, vocab), f"shape \\[2, {vocab}\\]"), (torch.zeros(1, 7), "shape \\[1, 7\\]"),
                        (torch.zeros(1, vocab, dtype=torch.long), f"shape \\[1, {vocab}\\]")]:
        with pytest.raises(KLError, match=rf"^decode_loop's logits should be a float tensor \[B, vocab\] = \[1, "
                                          rf"{vocab}\], the logits after each of the step's sequences, got {got}$"):
            engine.decode_loop(step, logits, 3)
    other = klconvert.load(tiny_released, device="cpu", max_context=64).decoder(1)
    for wrong, named in [(None, "NoneType$"), (other, "DecodeStep of another engine, or of its plan before a resize$")]:
        with pytest.raises(KLError, match=rf"^decode_loop's step should be one this engine's decoder\(batch\) gave, "
                                          rf"got a {named}"):
            engine.decode_loop(wrong, torch.zeros(1, vocab), 3)
    for poison in (float("nan"), float("inf"), None):   # NaN was read as the largest: token 0
        logits = torch.full((1, vocab), -float("inf")) if poison is None else torch.zeros(1, vocab)
        logits[0, 5] = poison if poison is not None else logits[0, 5]
        with pytest.raises(KLError, match=r"^decode_loop's logits hold NaN or \+inf, or a row of only -inf; pass the "
                                          r"logits the model computed"):
            engine.decode_loop(step, logits, 3)
    masked = torch.zeros(1, vocab)
    masked[0, :5] = -float("inf")   # tokens masked out: the loop runs
    assert engine.decode_loop(step, masked, 2, stop_ids=frozenset()).shape == (1, 2)
    step.positions.fill_(60)
    with pytest.raises(KLError, match=r"^decode_loop from position 60 with max_new_tokens \(--max-new-tokens\) 5 "
                                      r"runs past the planned context of 64; make fewer tokens, or raise max_context"):
        engine.decode_loop(step, torch.zeros(1, vocab), 5, stop_ids=frozenset())
    assert engine.decode_loop(step, torch.zeros(1, vocab), 4, stop_ids=frozenset()).shape == (1, 4)
    longer = klconvert.load(tiny_released, device="cpu", max_context=2048)   # its counts are written with ','
    step = longer.decoder(1)
    step.positions.fill_(2040)
    with pytest.raises(KLError, match=r"^decode_loop from position 2,040 with max_new_tokens \(--max-new-tokens\) 9 "
                                      r"runs past the planned context of 2,048; make fewer tokens"):
        longer.decode_loop(step, torch.zeros(1, vocab), 9, stop_ids=frozenset())


@pytest.mark.parametrize("path, got", [(None, "a NoneType"), (3, "an int"), (b"tiny", "a bytes")])
def test_a_model_that_is_no_path_is_refused(path, got):
    """None, an int and bytes were TypeErrors from pathlib."""
    with pytest.raises(KLError, match=rf"^the model {re.escape(repr(path))} should be a path \(a str or "
                                      rf"Path\) or 'tiny', got {got}$"):
        klconvert.load(path, device="cpu")


def test_numpy_and_torch_numbers_are_numbers_to_every_argument(engine):
    """np.float32(0.7) was refused as no finite temperature, np.int64(3) as no seed, while np.int64(4) new tokens
    ran: each is taken as the Python number it holds, and draws as it does."""
    import numpy as np

    want = engine.generate([[1, 2, 3]], 4, temperature=0.5, top_p=0.75, seed=3, stop_ids=frozenset())
    for kwargs in (dict(max_new_tokens=np.int64(4), temperature=np.float32(0.5), top_p=np.float32(0.75),
                        seed=np.int64(3)),
                   dict(max_new_tokens=torch.tensor(4), temperature=torch.tensor(0.5), top_p=torch.tensor(0.75),
                        seed=torch.tensor(3)),
                   dict(max_new_tokens=4, temperature=np.float64(0.5), top_p=0.75, seed=np.uint64(3))):
        assert torch.equal(engine.generate([[1, 2, 3]], stop_ids=frozenset(), **kwargs), want), kwargs
    for kwargs, message in ((dict(temperature=np.bool_(True)), "should be a finite number >= 0"),
                            (dict(seed=torch.tensor(3.0)), r"seed tensor\(3\.\) should be"),
                            (dict(top_p=torch.tensor([0.5])), r"top_p tensor\(\[0\.5000\]\) should be")):
        with pytest.raises(KLError, match=message):
            engine.generate([[1, 2, 3]], 2, **kwargs)


def test_seeds_2_to_the_32_apart_draw_apart_on_the_cpu(engine):
    """torch's CPU generator keeps a seed's low 32 bits: seeds 1, 2**32 + 1 and 2**64 - 2**32 + 1 drew the same
    tokens. Each now draws its own, and a seed below 2**32 still seeds the generator as torch takes it (what was drawn
    with it before is drawn again)."""
    from klconvert.runtime.sampling import sampling_generator

    draws = [engine.generate([[1, 2, 3]], 8, temperature=1.0, seed=seed, stop_ids=frozenset())
             for seed in (1, 2**32 + 1, 2**64 - 2**32 + 1)]
    assert not any(torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:]), draws
    for seed in (0, 1, 2**32 - 1):
        assert torch.equal(sampling_generator(seed).get_state(), torch.Generator().manual_seed(seed).get_state())


def test_unseeded_calls_draw_apart_and_the_top_seed_is_a_seed(engine):
    """(h169's mutation testing) Two calls at a temperature with no seed draw from fresh seeds: a generator left
    unseeded drew the same tokens every call, and no test saw it (the CLI always passes a drawn seed). The top seed,
    2**64 - 1, draws as itself, the same twice, not as its neighbour."""
    draw = lambda seed: engine.generate([[1, 2, 3]], 16, temperature=1.0, seed=seed, stop_ids=frozenset())
    assert not torch.equal(draw(None), draw(None))
    assert torch.equal(draw(2**64 - 1), draw(2**64 - 1)) and not torch.equal(draw(2**64 - 1), draw(2**64 - 2))


def test_top_p_reached_exactly_keeps_the_prefix_that_reaches_it():
    """Two tokens of 0.5 each at top_p 0.5: the first alone reaches it, so one token is ever drawn -- transformers'
    TopPLogitsWarper keeps the same (it drops what lies at or under 1 - top_p). Keeping both at the boundary passed
    every test (h169's mutation testing)."""
    from klconvert.runtime.sampling import sample, sampling_generator

    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    drawn = {sample(logits, 1.0, 0.5, sampling_generator(seed))[0].item() for seed in range(32)}
    assert len(drawn) == 1 and drawn <= {0, 1}, drawn
    assert {sample(logits, 1.0, 0.51, sampling_generator(seed))[0].item() for seed in range(32)} == {0, 1}


@pytest.mark.parametrize("max_new_tokens", [-1, 1.5, "3", None, True])
def test_max_new_tokens_is_a_whole_number_of_at_least_0(engine, max_new_tokens):
    """-1 returned no tokens, 1.5 / "3" / None were TypeErrors from torch, True ran as 1."""
    with pytest.raises(KLError, match=rf"^max_new_tokens {max_new_tokens!r} should be a whole number >= 0"):
        engine.generate([[1, 2, 3]], max_new_tokens)


@pytest.mark.parametrize("prompts", [[[1.7, 2.2]], [1.7, 2.2], [[True, False]], torch.tensor([[1.0, 2.0]]),
                                     [[1, 2], [3.5]]])
def test_token_ids_that_are_not_whole_numbers_are_refused(engine, prompts):
    """torch.as_tensor(..., dtype=long) ran [[1.7, 2.2]] as [1, 2] and [[True, False]] as [1, 0]."""
    with pytest.raises(KLError, match="token ids should be whole numbers"):
        engine.generate(prompts, 2)
    with pytest.raises(KLError, match="should be whole numbers"):
        engine.decode_step(torch.tensor([1.5]), 0)
    with pytest.raises(KLError, match="positions should be whole numbers"):
        engine.decode_step(torch.tensor([1]), 0.5)


@pytest.mark.parametrize("prompts, where", [([True, 5], r"\[0\]"), ([[1, 2], [3, True]], r"\[1\]\[1\]"),
                                           ([5, torch.tensor(True)], r"\[1\]"), ((1, (2, False)), r"\[1\]\[1\]")])
def test_a_bool_among_token_ids_is_refused(engine, prompts, where):
    """bool is an int to Python and torch.as_tensor: [True, 5] ran as the token ids [1, 5]."""
    with pytest.raises(KLError, match=rf"^token ids should be whole numbers, got a bool at {where}; give ints"):
        engine.generate(prompts, 2)


@pytest.mark.parametrize("valueless, kind", [(lambda t: t.to("meta"), "meta"), (lambda t: t.to_sparse(), "sparse_coo"),
                                             (lambda t: [t[0].to("meta")], "meta")])
def test_token_ids_in_a_tensor_without_values_are_refused(engine, valueless, kind):
    """A meta tensor's ids raised torch's RuntimeError from .item(), a sparse one NotImplementedError."""
    with pytest.raises(KLError, match=rf"^token ids should be whole numbers in a list or a dense tensor that holds "
                                      rf"them, got a {kind} tensor"):
        engine.generate(valueless(torch.ones(1, 3, dtype=torch.long)), 2)
    with pytest.raises(KLError, match=r"^positions should be whole numbers in a list or "):
        engine.decode_step([5], valueless(torch.ones(1, dtype=torch.long)))


def test_an_empty_batch_is_refused_in_one_line(engine):
    """forward, forward_segments and prefill of [0, T] ids ended in a ZeroDivisionError (the logits' rows per
    position, h248's F3); before, a TypeError or AttributeError."""
    for call in (engine.forward, engine.forward_segments, engine.prefill):
        with pytest.raises(KLError, match=r"^input_ids holds no sequence \(shape \[0, 5\]\); give at least one$"):
            call(torch.empty(0, 5, dtype=torch.long))


def test_bools_and_floats_are_refused_wherever_ids_or_positions_are_taken(engine):
    """forward, prefill and decode_step read ids and positions through the same check as generate."""
    for call in (engine.forward, engine.prefill):
        with pytest.raises(KLError, match=r"^input_ids should be whole numbers, got a bool at \[0\]\[1\]"):
            call([[5, True]])
        for bad in (torch.tensor([[True, False]]), torch.tensor([[5.0, 6.0]])):
            with pytest.raises(KLError, match=rf"^input_ids should be whole numbers, got {bad.dtype}"):
                call(bad)
    with pytest.raises(KLError, match=r"^token ids should be whole numbers, got a bool at \[0\]"):
        engine.decode_step([True], 0)
    with pytest.raises(KLError, match=r"^token ids should be whole numbers, got torch.bool"):
        engine.decode_step(torch.tensor([True]), 0)
    with pytest.raises(KLError, match=r"^positions should be whole numbers, got a bool at \[0\]"):
        engine.decode_step([5], [True])
    with pytest.raises(KLError, match=r"^positions should be whole numbers, got torch.bool"):
        engine.decode_step([5], True)


def test_the_default_stop_tokens_of_a_folder_without_a_tokenizer_are_config_jsons(tiny_copy):
    """The model's stop tokens: config.json's eos_token_id and the tokenizer's eos and <|im_end|>; a folder of
    weights alone has config.json's."""
    with_tokenizer = klconvert.load(tiny_copy, device="cpu", max_context=16)
    tokenizer = klconvert.Tokenizer.from_folder(tiny_copy)
    assert with_tokenizer.stop_ids == {*with_tokenizer.config.eos_token_ids, tokenizer.eos_id,
                                       tokenizer.special_tokens["<|im_end|>"]}
    for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_copy / name).unlink()
    alone = klconvert.load(tiny_copy, device="cpu", max_context=16)
    assert alone.stop_ids == set(alone.config.eos_token_ids) and alone.stop_ids


def test_one_prompt_is_taken_in_each_form(engine):
    """A flat list, a [T] tensor, a list of 0-d tensors and a list of one list are one prompt alike."""
    want = engine.generate([[1, 2, 3]], 3)
    for prompts in ([1, 2, 3], torch.tensor([1, 2, 3]), list(torch.tensor([1, 2, 3])), [torch.tensor([1, 2, 3])]):
        assert torch.equal(engine.generate(prompts, 3), want), prompts


def test_generate_leaves_the_global_generator_alone(engine):
    """An unseeded generate seeded its own generator by torch.seed(), which reseeds the global one: a caller's
    torch.manual_seed no longer held past it."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        engine.generate([[1, 2, 3]], 2, temperature=1.0)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


@pytest.fixture
def three_threads():
    """torch's intra-op thread count set to 3 (one the engine never sets) for the test, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _a_new_threads_count() -> int:
    """torch's thread count as a thread started now reads it (the count set last, in any thread)."""
    counts = []
    reader = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    reader.start()
    reader.join()
    return counts[0]


def test_two_engines_generating_at_once_leave_the_thread_count_as_it_was(tiny_released, three_threads):
    """An engine a thread, as the README says: generate set the count to 1 and back to what its thread read, and the
    second engine's thread read the first's 1 -- A in, B in, A out, B out left every thread started after on 1."""
    engines = [klconvert.load(tiny_released, device="cpu", max_context=64) for _ in range(2)]
    want = engines[0].generate([1, 2, 3], 6, stop_ids=frozenset())
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside, after, outputs = {}, {}, {}

    def generate(name: str, engine, entered: threading.Event, wait_for: threading.Event) -> None:
        tokens = []

        def on_token(_, token):   # held at the second token: the first is handed on before the decode loop's threads
            tokens.append(token)
            if len(tokens) == 2:
                inside[name] = torch.get_num_threads()
                entered.set()
                assert wait_for.wait(60)

        outputs[name] = engine.generate([1, 2, 3], 6, stop_ids=frozenset(), on_token=on_token)
        after[name] = torch.get_num_threads()

    a = threading.Thread(target=generate, args=("A", engines[0], a_in, b_in))
    b = threading.Thread(target=generate, args=("B", engines[1], b_in, a_out))
    a.start()
    assert a_in.wait(60)
    b.start()
    a.join(60)
    a_out.set()
    b.join(60)
    assert inside == {"A": 1, "B": 1} and after == {"A": 3, "B": 3}
    assert _a_new_threads_count() == 3 and torch.get_num_threads() == 3
    assert all(torch.equal(out, want) for out in outputs.values()) and len(outputs) == 2


def test_an_interrupt_as_generate_sets_one_thread_leaves_the_thread_count_as_it_was(engine, three_threads,
                                                                                     monkeypatch):
    """The 1 was set before the try that put the count back: an interrupt between them left it (1 in 631 random
    interrupts of a generate loop)."""
    set_num_threads = torch.set_num_threads

    def interrupted_once_set(threads: int) -> None:
        set_num_threads(threads)
        if threads == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "set_num_threads", interrupted_once_set)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([1, 2, 3], 4)
    monkeypatch.undo()
    assert torch.get_num_threads() == 3 and _a_new_threads_count() == 3
    engine.generate([1, 2, 3], 4)   # and the engine is free
    assert torch.get_num_threads() == 3


def test_a_generate_after_one_an_interrupt_cut_short_as_it_set_the_count_back_sets_it_back(engine, three_threads,
                                                                                        monkeypatch):
    """An interrupt as the count was set back leaves the 1 (nothing can set it back then); the next call, reading
    that 1, set it back to 1, not to the count the interrupted call found."""
    set_num_threads = torch.set_num_threads

    def interrupted_setting_back(threads: int) -> None:
        if threads != 1:
            raise KeyboardInterrupt
        set_num_threads(threads)

    monkeypatch.setattr(torch, "set_num_threads", interrupted_setting_back)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([1, 2, 3], 4)
    monkeypatch.undo()
    assert torch.get_num_threads() == 1
    engine.generate([1, 2, 3], 4)
    assert torch.get_num_threads() == 3 and _a_new_threads_count() == 3


def _outputs_of_the_api(path) -> tuple[list[torch.Tensor], list[bool]]:
    """What the API computes on the tiny model, loaded anew -- greedy and sampled generation of two prompts (one past
    a KDA chunk), generate and decode_loop of no new tokens, forward, prefill, a decode step and forward_segments'
    segments of 16 tokens -- and whether CPU autocast was on, as the caller reads it, between those segments."""
    engine = klconvert.load(path, device="cpu", max_context=256, batch=2)
    prompts, long = [list(range(1, 100)), [5, 6, 7]], [list(range(1, 100))]
    step = engine.decoder(1)
    outputs = [engine.generate(prompts, 8, stop_ids=frozenset()),
               engine.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=3, stop_ids=frozenset()),
               engine.generate(prompts, 0), engine.decode_loop(step, engine.prefill([5, 6, 7]), 0),
               engine.forward(long), engine.prefill(long), engine.decode_step([7], 99)]
    engine.prefill_segment, autocast_between = 16, []
    for segment in engine.forward_segments(long):
        outputs.append(segment)
        autocast_between.append(torch.is_autocast_enabled("cpu"))
    return outputs, autocast_between


@pytest.fixture(scope="module")
def outputs_of_the_api(tiny_released):
    return _outputs_of_the_api(tiny_released)[0]


def test_an_apps_default_dtype_changes_no_output(tiny_released, outputs_of_the_api):
    """Under torch.set_default_dtype(torch.float64) the first call through the model was 'RuntimeError: expected
    scalar type Float but found Double': the KDA chunk's causal mask was made in the default dtype."""
    torch.set_default_dtype(torch.float64)
    try:
        outputs, _ = _outputs_of_the_api(tiny_released)
    finally:
        torch.set_default_dtype(torch.float32)
    assert len(outputs) == len(outputs_of_the_api) == 14
    assert all(torch.equal(got, want) and got.dtype == want.dtype for got, want in zip(outputs, outputs_of_the_api))


def test_an_apps_default_device_changes_no_output(tiny_released, outputs_of_the_api):
    """Under torch.set_default_device("meta") every tensor klconvert made without a device was made there: generate
    refused its own stop ids ('got a meta tensor'), and the CPU forms' constants, made at load, held no values. The
    host's are made on the CPU, the engine's on its device: the same outputs as under the default, on the CPU."""
    torch.set_default_device("meta")
    try:
        outputs, _ = _outputs_of_the_api(tiny_released)
    finally:
        torch.set_default_device(None)
    assert len(outputs) == len(outputs_of_the_api) == 14
    assert all(got.device.type == "cpu" and torch.equal(got, want) for got, want in zip(outputs, outputs_of_the_api))


def test_an_apps_autocast_changes_no_output(tiny_released, outputs_of_the_api):
    """Inside an app's torch.autocast("cpu", dtype=torch.bfloat16) the model's products ran in bf16: other logits,
    other tokens. The engine switches it off while it runs the model, and only then: the app's own code between
    forward_segments' segments, and after each call, runs under its autocast still."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, autocast_between = _outputs_of_the_api(tiny_released)
        assert torch.is_autocast_enabled("cpu")
    assert autocast_between == [True] * 7 and len(outputs) == len(outputs_of_the_api)
    assert all(torch.equal(got, want) and got.dtype == want.dtype for got, want in zip(outputs, outputs_of_the_api))


@pytest.mark.parametrize("token, position, message", [
    ([5], -3, r"position -3 is outside the planned context 0\.\.63"),
    ([5], 10**6, r"position 1000000 is outside the planned context 0\.\.63; give positions in it, or plan a longer "
                 r"context \(engine.resize, or load's max_context\)$"),
    ([10**6], 0, r"token id 1000000 is outside the vocabulary"),
])
def test_decode_step_checks_its_token_and_position(engine, token, position, message):
    """Position -3 gave NaN logits, 10**6 and an id past the vocabulary IndexErrors."""
    with pytest.raises(KLError, match=message):
        engine.decode_step(torch.tensor(token), position)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mla_cache_dtype=torch.int8), r"^mla_cache_dtype=torch.int8 \(--mla-cache-dtype\): choose bfloat16 or "
                                       r"float8_e4m3fn or float32, by name or torch dtype$"),   # float32: the CPU's
    (dict(mla_cache_dtype=torch.bool), r"^mla_cache_dtype=torch.bool \(--mla-cache-dtype\)"),
    (dict(mla_cache_dtype="int8"), r"^mla_cache_dtype='int8' \(--mla-cache-dtype\): choose"),
    (dict(dtype=torch.int32), r"^dtype=torch.int32 \(--dtype\): choose bfloat16 or float32$"),
    (dict(dtype="bf16"), r"^dtype='bf16' \(--dtype\): choose bfloat16 or float32$"),   # --dtype's names, as said
    (dict(max_context=4096.5), r"^max_context=4096.5 \(--max-context\) should be a whole number of at least 1$"),
    (dict(max_context="4096"), r"^max_context='4096' \(--max-context\)"),
    (dict(max_context=np.float64(4096)), rf"^max_context={re.escape(repr(np.float64(4096)))} \(--max-context\)"),
    (dict(batch=0), r"^batch=0 \(--batch\) should be a whole number of at least 1$"),
    (dict(batch=torch.tensor([2])), r"^batch=tensor\(\[2\]\) \(--batch\)"),
    (dict(device="tpu"), r"^device='tpu' \(--device\) is not supported; use cpu, cuda or cuda:N"),
    (dict(device="meta"), r"^device='meta' \(--device\) is not supported"),
    (dict(kernels="fast"), r"^kernels='fast' \(--kernels\): choose one of auto, triton, torch$"),
    (dict(biased_router_weights="no"), r"^biased_router_weights='no' is not a bool; pass True or False$"),  # was on
    (dict(cuda_graph=0), r"^cuda_graph=0 is not a bool; pass True or False$"),
    (dict(max_context=2**21), r"^max_context=2097152 \(--max-context\) is over the model's model_max_length "
                              r"1,048,576; lower it$"),
])
def test_load_checks_its_arguments(tiny_released, kwargs, message):
    """An int8 cache decoded garbage; the others were TypeError, KeyError or torch's RuntimeError."""
    with pytest.raises(KLError, match=message):
        klconvert.load(tiny_released, **{"device": "cpu", **kwargs})


def test_generate_past_the_plan_names_its_argument_and_loads(engine):
    """The line named only the CLI's flags (--max-new-tokens, --max-context) to a caller who passed neither; forward's
    named a --max-new-tokens 0 it does not take."""
    with pytest.raises(KLError, match=r"^the prompt \(3 tokens\) plus max_new_tokens=100 \(--max-new-tokens\) needs a "
                                      r"context of 103 tokens but the memory plan holds 64; raise max_context "
                                      r"\(--max-context\) to 103 or more, or shorten the prompt$"):
        engine.generate([[1, 2, 3]], 100)
    with pytest.raises(KLError, match=r"^the prompt \(65 tokens\) needs a context of 65 tokens but the memory plan "
                                      r"holds 64; raise max_context \(--max-context\) to 65 or more"):
        engine.forward([[1] * 65])


def test_a_request_past_the_models_length_is_not_told_to_raise_the_context(tiny_copy):
    """With the plan at the model's length, raising max_context (as the line advised) is refused in turn."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_max_length"] = 64
    (tiny_copy / "config.json").write_text(json.dumps(config))
    engine = klconvert.load(tiny_copy, device="cpu", max_context=64)
    with pytest.raises(KLError, match=r"^the prompt \(3 tokens\) plus max_new_tokens=100 \(--max-new-tokens\) is over "
                                      r"the model's model_max_length of 64 tokens; shorten the prompt or make fewer "
                                      r"new tokens$"):
        engine.generate([[1, 2, 3]], 100)
    with pytest.raises(KLError, match=r"^the prompt \(65 tokens\) is over the model's model_max_length of 64 tokens; "
                                      r"shorten the prompt$"):
        engine.forward([[1] * 65])


def test_the_models_length_is_written_with_its_digits_grouped(engine):
    """It read "model_max_length of 1048576 tokens" where every other line writes 1,048,576."""
    with pytest.raises(KLError, match=r"^the prompt \(3 tokens\) plus max_new_tokens=2000000 \(--max-new-tokens\) is "
                                      r"over the model's model_max_length of 1,048,576 tokens;"):
        engine.generate([[1, 2, 3]], 2 * 10**6)


def test_a_batch_past_the_hosts_memory_is_refused_before_allocating(tiny_released, monkeypatch):
    """batch=10**9 asked the allocator for 98 TB: its RuntimeError. A batch past the plans' bound is refused as
    such."""
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(1 << 30))
    with pytest.raises(KLError, match=r"the plan needs [\d,.]+ [MG]B but cpu has 1\.07 GB available on the host "
                                      r"\(MemAvailable\); .*, or free some memory$"):
        klconvert.load(tiny_released, device="cpu", batch=65536)
    with pytest.raises(KLError, match=r"^batch=1000000000 \(--batch\) is past the 65,536 sequences a plan sizes$"):
        klconvert.load(tiny_released, device="cpu", batch=10**9)


@pytest.mark.parametrize("total, advice", [(None, ", or raise ulimit -v"), (1 << 30, "")], ids=["host", "whole-host"])
def test_a_plan_past_a_process_limit_names_the_limit(tiny_released, monkeypatch, total, advice):
    """ulimit -v 1500000 and --max-context 1000000 was the allocator's traceback, MemAvailable being all it read. The
    limit's remedy is said only where all of the host's memory (MemTotal) would hold the context asked: on a host of
    1 GiB it said to raise ulimit -v for a plan of more (h233's rule, which the lines where no context fits kept)."""
    monkeypatch.setattr(engine_module, "host_memory",
                        lambda **_: HostMemory(1 << 29, *ADDRESS_SPACE_BOUND, total=total))
    with pytest.raises(KLError, match=r"^the plan needs [\d.]+ GB but cpu has 0\.54 GB available under the process's "
                                      r"address-space limit \(ulimit -v\); lower max_context \(--max-context\) to \d+ "
                                      r"or less" + re.escape(advice) + "$"):
        klconvert.load(tiny_released, device="cpu", max_context=10**6)


def test_the_allocators_free_blocks_are_room_for_the_weights_alone(tiny_released, engine, monkeypatch):
    """Every byte of the allocator's free blocks was room for a plan (eval's model, once its reference was freed):
    under ulimit -d the plan passed and a 17 MB block was refused with 56 MB of free blocks split by the weights."""
    plan, free_blocks = engine.plan, 1 << 30
    room = plan.total + free_blocks - plan.weights   # the plan's figure, with the free blocks past its weights
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(room - 1, *ADDRESS_SPACE_BOUND,
                                                                         free_blocks=free_blocks))
    # a byte short (the loaded plan's own figure, its decode copies as bound): in bytes, as alike in MB
    with pytest.raises(KLError, match=r"^the plan needs ([\d,]+) bytes but cpu has ([\d,]+) bytes "
                                      r"available under the process's address-space limit \(ulimit -v\)"):
        klconvert.load(tiny_released, device="cpu", max_context=plan.context)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(room, *ADDRESS_SPACE_BOUND,
                                                                         free_blocks=free_blocks))
    assert klconvert.load(tiny_released, device="cpu", max_context=plan.context).plan.total == plan.total


def test_a_small_plan_past_the_host_names_two_figures_that_differ(tiny_released, engine, monkeypatch):
    """The figures were GiB at one decimal: "the plan needs 0.1 GiB but cpu has 0.1 GiB available under ..."."""
    need = engine.plan.total_for(4096)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(need - 3_000_000, *ADDRESS_SPACE_BOUND))
    with pytest.raises(KLError, match=r"^the plan needs ") as error:
        klconvert.load(tiny_released, device="cpu", max_context=4096)
    needed, available = re.match(r"the plan needs (.+) but cpu has (.+) available under", str(error.value)).groups()
    assert needed != available and size_text(need) == needed, str(error.value)


def test_a_gpu_plan_is_held_to_what_the_card_has_free_for_this_process(tiny_released, monkeypatch):
    """On a GPU the plan was held to the card's total_memory, what the CUDA context and other processes held counted
    as free: a plan that passed ran out of memory mid-prefill. It is held to what the card has free for this process
    (the driver's free memory, this process's cache), the context it names fitting NAMED_FIT_SHARE of that, as on the
    CPU. Checked before any weight is read, so on the CPU here."""
    plan = klconvert.load(tiny_released, device="cpu", dtype="bfloat16", max_context=64).plan
    free = plan.total_for(4096) - 1
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 << 30))
    gpu_with_free(monkeypatch, free)
    config = KimiLinearConfig.from_file(tiny_released / "config.json")
    needs, has = size_texts(free + 1, free)
    with pytest.raises(KLError, match=rf"^the plan needs {re.escape(needs)} but cuda:0 has "
                                      rf"{re.escape(has)} free for this process; lower max_context "
                                      r"\(--max-context\) to (\d+) or less, or stop what else holds the GPU$") \
            as error:   # the whole card, 80 GiB, holds 4096
        Engine(config, None, torch.device("cuda:0"), torch.bfloat16, 4096, 1, kernels="torch",
               context_name="max_context")
    fit = int(re.search(r"to (\d+) or less", str(error.value)).group(1))
    assert fit == dataclasses.replace(plan, memory_limit=int(free * NAMED_FIT_SHARE)).largest_context() < 4096


def test_forwards_logits_are_held_to_the_room_beside_the_prefills_workspace(engine, monkeypatch):
    """forward's [B, T, vocab] output was only allocated before the prefill: taken, it left the prefill to run out
    part-way (8,000 tokens of the bundled model under ulimit -d), naming a shorter prompt or context, where
    forward_segments on the same ids ran. The logits and the workspace the prefill needs are checked against what the
    host has first, the line naming forward_segments."""
    ids, needed = _forward_refused_one_byte_short_then_taken(engine, 1, monkeypatch)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(needed - 1, *ADDRESS_SPACE_BOUND))
    assert sum(rows.shape[1] for rows in engine.forward_segments(ids)) == 64   # the way the line names


def _forward_refused_one_byte_short_then_taken(engine, batch: int, monkeypatch) -> tuple[torch.Tensor, int]:
    """forward of `batch` sequences of 64 tokens refused in its one line where the host has one byte less than the
    logits and the all-position workspace, and run where it has that much; the ids and those bytes."""
    ids = torch.randint(0, engine.config.vocab_size, (batch, 64))
    logits = batch * 64 * engine.config.vocab_size * 4
    needed = logits + dataclasses.replace(engine.plan, all_logits=True).prefill_workspace_for(64)
    needs, has = size_texts(needed, needed - 1)   # a byte apart: in bytes, not two figures that read alike
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(needed - 1, *ADDRESS_SPACE_BOUND))
    with pytest.raises(KLError, match=rf"^forward's logits \(\[{batch}, 64, {engine.config.vocab_size:,}\] fp32, "
                                      rf"{re.escape(size_text(logits))}\) with a prefill's workspace need "
                                      rf"{re.escape(needs)} but cpu has {re.escape(has)} "
                                      r"available under the process's address-space limit \(ulimit -v\); read them a "
                                      r"few positions at a time with forward_segments, or give fewer tokens, or raise "
                                      r"ulimit -v$"):
        engine.forward(ids)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(needed, *ADDRESS_SPACE_BOUND))
    assert engine.forward(ids).shape == (batch, 64, engine.config.vocab_size)
    return ids, needed


def test_a_batched_forward_counts_each_prompts_last_hidden_rows(tiny_released, monkeypatch):
    """A batch's forward holds every prompt's last hidden rows of a segment until the segment's logits are made (75 MB
    a prompt at the release's 16K segment), where its room check counted one prompt's: a batch past the room was taken
    and could run out part-way. They are counted for the prompts given, and such a batch is refused in the room
    check's line."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64, batch=4)
    _forward_refused_one_byte_short_then_taken(engine, 4, monkeypatch)


def test_every_positions_logits_are_planned_only_where_asked(tiny_released, monkeypatch):
    """The plan charged forward_segments' logits (0.16 GiB for the release) to every run, generate's too, which never
    makes them: load plans them where asked (all_logits, eval's), refusing there a batch whose last hidden rows do not
    fit before any weight is read; an engine planned without them checks forward_segments against the room it has
    when called, in one line."""
    planned = {every: klconvert.load(tiny_released, device="cpu", max_context=64, batch=4, all_logits=every).plan
               for every in (False, True)}
    assert planned[True].total > planned[False].total
    assert planned[False].prefill_workspace_for(64) == dataclasses.replace(planned[True], all_logits=False) \
        .prefill_workspace_for(64)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(planned[False].total))
    with pytest.raises(KLError, match=r"^the plan needs [\d.]+ MB but cpu has [\d.]+ MB available on the host "
                                      r"\(MemAvailable\); lower max_context \(--max-context\) to \d+"):
        klconvert.load(tiny_released, device="cpu", max_context=64, batch=4, all_logits=True)
    engine = klconvert.load(tiny_released, device="cpu", max_context=64, batch=4)   # generate's plan fits
    ids = torch.randint(0, engine.config.vocab_size, (4, 64))
    workspace = dataclasses.replace(engine.plan, all_logits=True).prefill_workspace_for(64)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(workspace - 1))
    with pytest.raises(KLError, match=rf"^forward_segments' prefill workspace, the last hidden rows of a segment of 4 "
                                      rf"sequences of 64 tokens and their logits a few positions at a time need "
                                      rf"{re.escape(size_texts(workspace, workspace - 1)[0])} but cpu has .*; give "
                                      r"fewer sequences at a "
                                      r"time, or free some memory$"):
        engine.forward_segments(ids)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(1))
    with pytest.raises(KLError, match=r"^forward_segments' prefill workspace, the last hidden rows of a segment of 1 "
                                      r"sequence of 1 token and their logits a few positions at a time need .* but "
                                      r"cpu has 1 byte available on the host .*; give fewer tokens, .*or free some "
                                      r"memory$"):
        engine.forward_segments(ids[:1, :1])   # it said "1 sequence(s) of 1 tokens"
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(workspace))
    assert sum(rows.shape[1] for rows in engine.forward_segments(ids)) == 64
    with pytest.raises(KLError, match=r"^all_logits='yes' is not a bool; pass True or False$"):
        klconvert.load(tiny_released, device="cpu", all_logits="yes")


def test_a_forward_past_the_room_names_what_would_free_it(tiny_released, monkeypatch):
    """forward_segments' room check on a generate plan (and forward's) named a lower max_context, which frees nothing
    where the sequences are as long as it, and not the host's remedy (raise ulimit -d), which load's refusal names.
    A smaller context is named where the cache it frees makes up the shortfall, and the bound's remedy where the
    host's memory in all would hold what the engine holds with the call's workspace."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=4096, batch=4)
    ids = torch.randint(0, engine.config.vocab_size, (4, 64))
    workspace = dataclasses.replace(engine.plan, all_logits=True).prefill_workspace_for(64)
    freed = engine.plan.mla_cache_bytes - dataclasses.replace(engine.plan, context=64).mla_cache_bytes
    held = engine.plan.weights + engine.plan.state_bytes + engine.plan.mla_cache_bytes
    for available, total, ways in ((workspace - 1, held + workspace, r"lower max_context \(--max-context\) to 64, "
                                                                     r"or raise ulimit -d"),
                                   (workspace - freed - 1, held + workspace - 1, None),
                                   (workspace - freed - 1, None, "raise ulimit -d")):
        monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(available, *DATA_BOUND, total=total))
        ending = "" if ways is None else f", or {ways}"
        start = (rf"^forward_segments' prefill workspace, .* need {re.escape(size_texts(workspace, available)[0])} "
                 "but cpu has ")
        with pytest.raises(KLError, match=rf"{start}.*; give fewer sequences at a time{ending}$"):
            engine.forward_segments(ids)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(workspace, *DATA_BOUND))
    assert sum(rows.shape[1] for rows in engine.forward_segments(ids)) == 64


def test_a_resize_counts_the_weights_it_holds_as_its_own(tiny_released, monkeypatch):
    """After load the weights are out of what the host has left: a resize held them against it a second time. The
    state it holds counts as its own too (the new plan's is allocated once the old one is freed)."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    plan = engine.plan
    left = plan.total_for(4096) - plan.weights - plan.state_bytes - plan.mla_cache_bytes + 1   # 64's state held
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(left))
    engine.resize(4096, 1)
    assert engine.state.context == 4096
    limit = left + plan.weights + engine.plan.state_bytes + engine.plan.mla_cache_bytes   # 4096's state held now
    fit = dataclasses.replace(engine.plan, memory_limit=int(limit * NAMED_FIT_SHARE)).largest_context()
    assert 4096 <= fit < 8192
    with pytest.raises(KLError, match=rf"lower context \(--max-context\) to {fit} or less"):   # resize's name
        engine.resize(8192, 1)


def test_the_context_named_to_fit_the_host_fits_with_room_to_spare(tiny_released, monkeypatch):
    """The context a refusal names fitted what the host had left to the byte: a rerun at it, measuring the host anew
    (the process holding a little more), was refused in turn, naming a context 64 tokens smaller. It fits
    NAMED_FIT_SHARE of it now."""
    limit = klconvert.load(tiny_released, device="cpu", max_context=64).plan.total_for(100_000)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(limit, *ADDRESS_SPACE_BOUND))
    with pytest.raises(KLError, match=r"lower max_context \(--max-context\) to (\d+) or less") as error:
        klconvert.load(tiny_released, device="cpu", max_context=200_000)
    fit = int(re.search(r"to (\d+) or less", str(error.value)).group(1))
    smaller = int(limit * (1 + NAMED_FIT_SHARE) / 2)   # the next run finds half the spare share taken
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(smaller, *ADDRESS_SPACE_BOUND))
    assert klconvert.load(tiny_released, device="cpu", max_context=fit).plan.context == fit
    assert fit < 100_000


def test_a_plan_past_the_host_names_no_context_shorter_than_the_prompts_need(tiny_released, monkeypatch, capsys):
    """Short of memory, run named a context under its prompts' own (ulimit -v 1000000, a 29,600-token prompt: "lower
    max_context (--max-context) to 16064 or less"), which it then refused as too short for them. Told the context the
    prompts need, the plan names a smaller one only where it holds them, and says so where none does."""
    limit = klconvert.load(tiny_released, device="cpu", max_context=64).plan.total_for(100_000)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(limit, *ADDRESS_SPACE_BOUND))
    with pytest.raises(KLError, match=r"lower max_context \(--max-context\) to (\d+) or less, or raise ulimit -v$") \
            as error:   # one that holds them: the advice as it was
        klconvert.load(tiny_released, device="cpu", max_context=200_000, needed_context=50_000)
    fit = int(re.search(r"to (\d+) or less", str(error.value)).group(1))
    assert 50_000 < fit < 100_000
    with pytest.raises(KLError, match=rf"lower max_context \(--max-context\) to {fit + 1}, or raise ulimit -v$"):
        klconvert.load(tiny_released, device="cpu", max_context=200_000, needed_context=fit + 1)   # past fit's 64s
    none_fits = (r"; no context holding the prompts fits: they need {:,} tokens \(the longest prompt plus the new "
                 r"tokens\), at most [\d,]+ fit; {}, or lower max_new_tokens \(--max-new-tokens\), or raise ulimit "
                 r"-v$")
    with pytest.raises(KLError, match=none_fits.format(150_000, "shorten the prompt")):
        klconvert.load(tiny_released, device="cpu", max_context=150_000, needed_context=150_000)
    with pytest.raises(KLError, match=none_fits.format(60_000, r"give fewer prompts \(a smaller batch\) or shorter "
                                                               "ones")):
        klconvert.load(tiny_released, device="cpu", max_context=200_000, batch=2, needed_context=60_000)
    with pytest.raises(KLError, match=r"^needed_context=0 should be a whole number of at least 1$"):
        klconvert.load(tiny_released, device="cpu", needed_context=0)
    limit = klconvert.load(tiny_released, device="cpu", max_context=64).plan.total_for(1_000)
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(limit, *ADDRESS_SPACE_BOUND))
    for context in ((), ("--max-context", "100000")):   # run's own plan, and one it is given
        code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "word " * 4000, "--max-new-tokens",
                               "4", "--device", "cpu", *context)
        line = assert_one_line_error(code, err, "; no context holding the prompts fits: they need ")
        assert line.endswith("; shorten the prompt, or lower --max-new-tokens, or raise ulimit -v"), line


def test_prompts_of_one_token_that_no_context_holds_are_said_as_one():
    """PromptsDoNotFit said "they need 1 tokens" where the prompt is one token and none are planned past it (formatted
    by hand; units.counted now)."""
    refusal = PromptsDoNotFit("the plan needs 9 GB but the host has 8 GB", 1, 0, 1, "give fewer prompts",
                              "max_new_tokens", None)
    assert str(refusal) == ("the plan needs 9 GB but the host has 8 GB; no context holding the prompts fits: they need "
                            "1 token (the longest prompt plus the new tokens), at most 0 fit; shorten the prompt, or "
                            "lower max_new_tokens")


def test_after_a_resize_the_context_is_named_as_resize_names_it(tiny_released):
    """Past the plan after resize(context=...), the advice still said max_context, load's name, and a refused resize
    leaves load's."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    with pytest.raises(KLError):
        engine.resize(64, 10**9)
    assert engine.decode_less == "lower max_context (--max-context), or give fewer prompts"
    engine.resize(32, 1)
    with pytest.raises(KLError, match=r"plan holds 32; raise context \(--max-context\) to 33 or more"):
        engine.forward([[1] * 33])
    assert engine.decode_less == "lower context (--max-context), or give fewer prompts"


def test_a_refused_resize_leaves_the_engine_as_it_was(tiny_released, monkeypatch):
    """resize freed the state before checking the new plan: a refusal left the engine with none (generate's
    AttributeError), and a batch no context fits was said to be the weights not fitting. The host's memory is held
    at 4 GiB: on a GPU machine's 122 GB a batch of 65,536 fits a context of 1."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    before = engine.generate([1, 2, 3], 4, stop_ids=frozenset())
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(4 << 30))
    with pytest.raises(KLError, match=r"no context fits a batch of 65536: lower batch \(--batch\), or "):
        engine.resize(64, 65536)
    assert engine.plan.batch == 1 and engine.state.context == 64
    assert torch.equal(engine.generate([1, 2, 3], 4, stop_ids=frozenset()), before)


def test_load_checks_the_plan_once_before_the_weights_take_their_share(tiny_released, monkeypatch):
    """Reading the weights (and the threads that do it) takes more than the weights' bytes: a second check after them
    refused the --max-context the first had named as fitting."""
    answers = iter([HostMemory(1 << 40)])
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: next(answers, HostMemory(0)))
    assert klconvert.load(tiny_released, device="cpu", max_context=64).state.context == 64


ALLOCATOR_REFUSED = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                     "tried to allocate 1280000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("where", ["klconvert.runtime.memory_plan.MemoryPlan._allocate",
                                   "klconvert.runtime.engine.bind"])
def test_the_allocator_refusing_at_load_is_out_of_memory_in_one_line(tiny_released, monkeypatch, capsys, where):
    """torch's CPU allocator raises a RuntimeError, not a MemoryError: under a limit the plan's check did not see
    (or past it) `run` ended in its traceback, exit status 1."""
    def refused(*_, **__):
        raise RuntimeError(ALLOCATOR_REFUSED)
    monkeypatch.setattr(where, refused)
    with pytest.raises(HostMemoryExhausted, match=r"^out of host memory \(or the process's memory limit\) allocating "
                                                  r"the (memory plan's state and MLA cache|weights) \([\d.]+ MB\): "
                                                  r".*DefaultCPUAllocator: can't allocate memory"):
        klconvert.load(tiny_released, device="cpu", max_context=64)
    code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit) allocating the ",
                          "DefaultCPUAllocator")   # the CLI's line says what was allocated, as the error does


def _refused_by_the_allocator(*_, **__):
    torch.empty(1 << 60, dtype=torch.uint8)   # 1 EiB: refused by the real allocator, on any host


@pytest.mark.parametrize("where, what, less", [
    ("hidden_states", r"a prefill's activations \(3 tokens\)", r"give a shorter prompt"),
    ("decode", r"a decode step's activations \(batch 1\)", r"lower max_context \(--max-context\), or give fewer "
                                                          r"prompts$"),   # not --batch, which run does not have
])
def test_the_allocator_refusing_mid_generation_is_out_of_memory_in_one_line(tiny_released, engine, monkeypatch, capsys,
                                                                           where, what, less):
    """Only loading was under host_allocation: out of host memory in a prefill (ulimit -v 850000 and a 4,061-token
    prompt) or a decode step was the allocator's traceback from Engine.generate, exit status 1."""
    monkeypatch.setattr(f"klconvert.runtime.model.KimiLinear.{where}", _refused_by_the_allocator)
    pattern = (r"^out of host memory \(or the process's memory limit\) allocating " + what + r": "
               r"\[enforce fail.*DefaultCPUAllocator: can't allocate memory.*; .*" + less)
    calls = [lambda: engine.generate([[9, 9, 9]], 3)]
    if where == "hidden_states":   # the prefill's model call
        calls += [lambda: engine.prefill([[9, 9, 9]]), lambda: engine.forward([[9, 9, 9]])]
    else:
        calls += [lambda: engine.decode_step([9], 3)]
    for call in calls:
        with pytest.raises(HostMemoryExhausted, match=pattern) as error:
            call()
        assert isinstance(error.value, KLError) and "\n" not in str(error.value)   # the API's one line too
    code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "a b", "--max-new-tokens", "3",
                           "--device", "cpu")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit) allocating a ")


def test_a_prefill_out_of_memory_names_a_lower_context_only_where_one_holds_the_call(tiny_released, engine,
                                                                                   monkeypatch, capsys):
    """It ended "or lower max_context" where run's context was its default, the prompt and the new tokens (h266's
    F2), which no lower one holds. It names the context the call needs where the plan's is larger (a smaller cache
    leaves more room), and none where it is not."""
    monkeypatch.setattr("klconvert.runtime.model.KimiLinear.hidden_states", _refused_by_the_allocator)
    for call, needed in ((lambda: engine.generate([[9, 9, 9]], 3), 6), (lambda: engine.prefill([[9, 9]]), 2),
                         (lambda: engine.forward([[9, 9]]), 2)):
        with pytest.raises(HostMemoryExhausted) as error:
            call()
        assert str(error.value).endswith(f", or give a shorter prompt, or lower max_context (--max-context) to "
                                         f"{needed}")
    code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "a b", "--max-new-tokens", "3",
                           "--device", "cpu")
    line = assert_one_line_error(code, err, "out of host memory (or the process's memory limit) allocating a ")
    assert line.endswith(", or give a shorter prompt"), line


def test_onednn_refusing_a_primitive_mid_generation_is_out_of_memory_in_one_line(tiny_released, monkeypatch, capsys):
    """oneDNN (a bf16 matmul on the CPU) that could not allocate a primitive raised "could not create a primitive", a
    traceback from run, exit status 1."""
    def refused(*_, **__):
        raise RuntimeError("could not create a primitive")
    monkeypatch.setattr("klconvert.runtime.model.KimiLinear.hidden_states", refused)
    code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "\n", "--max-new-tokens", "3",
                           "--device", "cpu")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit) allocating a prefill's "
                          "activations (1 token): could not create a primitive; ")   # it said "(1 tokens)"


def test_other_runtime_errors_at_load_are_not_called_out_of_memory(tiny_released, monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("DefaultCPUAllocator is fine; something else is not")
    monkeypatch.setattr("klconvert.runtime.memory_plan.MemoryPlan._allocate", broken)
    with pytest.raises(RuntimeError, match="something else") as error:
        klconvert.load(tiny_released, device="cpu", max_context=64)
    assert not isinstance(error.value, MemoryError)


def _calls_into(engine) -> dict:
    """Each call that writes the engine's state, step buffers or stats, by name, as a callback might make it."""
    return {"generate": lambda: engine.generate([9, 9, 9], 3), "prefill": lambda: engine.prefill([[9, 9]]),
            "forward": lambda: engine.forward([[9, 9]]), "decode_step": lambda: engine.decode_step([9], 5),
            "resize": lambda: engine.resize(32, 1), "decoder": lambda: engine.decoder(1).step(),
            "decode_loop": lambda: engine.decode_loop(engine._steps[1], torch.zeros(1, engine.config.vocab_size), 3)}


def _refused_while(holder: str, call: str) -> str:
    return (rf"^{call} was called while {holder} is running on this engine \(from one of its callbacks, e\.g\. "
            rf"on_token\), whose state or stats it would overwrite -- call it after {holder} returns, or on a second "
            r"engine$")


@pytest.mark.parametrize("call", ["generate", "prefill", "forward", "decode_step", "resize", "decoder", "decode_loop"])
def test_a_callback_cannot_call_back_into_the_engine_generating(engine, call):
    """generate from its own on_token ran on the outer call's state rows and step: the outer output came out
    corrupted, silently. Any call that writes the state is refused while generate runs, and the outer call goes on
    as if it had not been made -- decoder (whose step is the one generate runs, or whose capture writes the state)
    and decode_loop (bench's) too, which were not refused."""
    refused = []

    def call_back(*_):
        with pytest.raises(KLError, match=_refused_while("generate", call)):
            _calls_into(engine)[call]()
        refused.append(call)

    want = engine.generate([1, 2, 3], 6, stop_ids=frozenset())
    assert torch.equal(engine.generate([1, 2, 3], 6, stop_ids=frozenset(), on_token=call_back), want)
    assert torch.equal(engine.generate([1, 2, 3], 6, stop_ids=frozenset(), on_prefill=call_back), want)
    assert len(refused) == 6 + 1 and engine.plan.context == 64


def _refused_from_another_thread(running: str, call: str) -> str:
    return (rf"^{call} was called from another thread while {running} on this engine, whose state it would "
            r"overwrite -- an engine runs one call at a time: wait for that one to end, or give each thread an engine "
            r"of its own$")


@pytest.mark.parametrize("holder", ["generate", "prefill", "forward"])
@pytest.mark.parametrize("call", ["generate", "prefill", "forward", "decode_step", "resize", "decoder", "decode_loop"])
def test_a_call_from_another_thread_is_refused_while_one_runs(engine, holder, call):
    """generate in one thread and prefill in another ran on the same state: 3 of 15 generations came out wrong,
    silently, and the refusal that did come blamed a callback. Now every call that writes the state holds the
    engine while it runs, and a second thread's call is refused as such; the first call's output is as alone."""
    inside, leave, refusals = threading.Event(), threading.Event(), []

    def wait(*_):
        inside.set()
        assert leave.wait(60)

    runs = {"generate": lambda: engine.generate([1, 2, 3], 4, stop_ids=frozenset(), on_token=wait),
            "prefill": lambda: engine.prefill([[1, 2, 3]], progress=wait),
            "forward": lambda: [wait() or segment for segment in engine.forward_segments([[1, 2, 3]])]}
    alone = {"generate": lambda: engine.generate([1, 2, 3], 4, stop_ids=frozenset()),
             "prefill": lambda: engine.prefill([[1, 2, 3]]), "forward": lambda: [engine.forward([[1, 2, 3]])]}
    want, got = alone[holder](), []
    engine.decoder(1)   # the step decode_loop is called with
    first = threading.Thread(target=lambda: got.append(runs[holder]()))
    first.start()
    try:
        assert inside.wait(60)
        running = "a forward_segments iterator is being read" if holder == "forward" else f"{holder} is running"
        with pytest.raises(KLError, match=_refused_from_another_thread(running, call)):
            _calls_into(engine)[call]()
        refusals.append(call)
    finally:
        leave.set()
        first.join(60)
    assert refusals == [call] and engine.plan.context == 64
    assert all(torch.equal(a, b) for a, b in zip(got[0], want)) if holder == "forward" else torch.equal(got[0], want)
    engine.generate([1, 2, 3], 2)   # released


@pytest.mark.parametrize("call", ["generate", "decoder", "decode_loop", "decode_step"])
def test_decode_loop_holds_the_engine_as_generate_does(engine, call):
    """decode_loop, called directly (as bench does), hands tokens to its on_token as generate does: a call back into
    the engine from there is refused alike, the loop going on as if it had not been made, its stats its own."""
    engine.generate([1, 2, 3], 1)   # captures decoder(1)
    step = engine.decoder(1)
    logits = engine.prefill([[1, 2, 3]])
    step.positions.fill_(3)
    want = engine.decode_loop(step, logits, 6, stop_ids=frozenset())
    refused = []

    def call_back(*_):
        with pytest.raises(KLError, match=_refused_while("decode_loop", call)):
            _calls_into(engine)[call]()
        refused.append(call)

    engine.prefill([[1, 2, 3]])
    step.positions.fill_(3)
    assert torch.equal(engine.decode_loop(step, logits, 6, stop_ids=frozenset(), on_token=call_back), want)
    assert len(refused) == 6 and engine.stats.new_tokens == 6 and engine.stats.steps == 5


@pytest.mark.parametrize("call", ["generate", "prefill", "forward", "decode_step", "resize", "decoder", "decode_loop"])
def test_a_forward_segments_iterator_holds_the_engine_while_it_is_read(engine, monkeypatch, call):
    """forward_segments checked that the engine was idle only when called, and its iterator ran each segment when
    read: a generate between two segments overwrote the state the later ones ran on, and their logits came out
    wrong, silently. The iterator holds the engine from its first segment until it is read to its end or closed."""
    monkeypatch.setattr(engine, "prefill_segment", 4)
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]   # three segments
    engine.generate([1, 2, 3], 2)   # captures decoder(1), which decode_loop takes
    want = engine.forward(ids)
    segments = engine.forward_segments(ids)
    first = next(segments)
    with pytest.raises(KLError, match=rf"^{call} was called while a forward_segments iterator of this engine is being "
                                      r"read, whose later segments run on the state it would overwrite -- read the "
                                      r"iterator to its end or close\(\) it first, or call it on a second engine$"):
        _calls_into(engine)[call]()
    assert torch.equal(torch.cat([first, *segments], dim=1), want)
    engine.generate([1, 2, 3], 2)   # free once read to its end
    segments = engine.forward_segments(ids)
    next(segments)
    segments.close()
    assert torch.equal(engine.forward(ids), want)   # and once closed


def test_a_generate_ended_by_its_callback_leaves_the_engine_free(engine):
    """The hold generate takes on the engine is let go however it ends, and the failed call's partial figures are not
    left in stats: they are reset, as the docstring says."""
    def fail(*_):
        raise ValueError("the caller's own error")

    for callbacks in (dict(on_token=fail), dict(on_prefill=fail)):
        engine.generate([1, 2, 3], 4, stop_ids=frozenset())
        with pytest.raises(ValueError, match="the caller's own error"):
            engine.generate([1, 2, 3], 4, stop_ids=frozenset(), **callbacks)
        assert engine.stats == klconvert.runtime.engine.GenerationStats()
        engine.generate([1, 2, 3], 4, stop_ids=frozenset())   # not refused as running
        assert engine.stats.new_tokens == 4 and engine.stats.prompt_tokens == 3


@pytest.mark.parametrize("args, message", [
    ((-5, 1), r"^context=-5 \(--max-context\) should be a whole number of at least 1$"),
    ((64, -1), r"^batch=-1 \(--batch\) should be a whole number of at least 1$"),
    ((0, 1), r"^context=0 \(--max-context\)"),
    ((64, 0), r"^batch=0 \(--batch\)"),
    ((1.5, 1), r"^context=1\.5 \(--max-context\)"),
    ((True, 1), r"^context=True \(--max-context\)"),
    ((float("nan"), 1), r"^context=nan \(--max-context\)"),
    ((np.bool_(True), 1), rf"^context={re.escape(repr(np.True_))} \(--max-context\)"),   # numpy 1 and 2 differ
    ((64, 1, torch.int8), r"^mla_cache_dtype=torch.int8 \(--mla-cache-dtype\): choose bfloat16 or float8_e4m3fn"),
    ((64, 1, torch.float16), r"^mla_cache_dtype=torch.float16 \(--mla-cache-dtype\): choose"),
    ((64, 1, "int8"), r"^mla_cache_dtype='int8' \(--mla-cache-dtype\): choose"),
    ((2**21, 1), r"^context=2097152 \(--max-context\) is over the model's model_max_length 1,048,576; lower it$"),
])
def test_resize_checks_its_arguments_as_load_does_before_anything_changes(tiny_released, args, message):
    """resize checked nothing: a negative or fractional size was torch's error after the new plan was kept and the
    state freed (the next generate an AttributeError), 0 broke later calls, an int8 cache generated garbage."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    before, plan, state = engine.generate([1, 2, 3], 4, stop_ids=frozenset()), engine.plan, engine.state
    with pytest.raises(KLError, match=message):
        engine.resize(*args)
    assert engine.plan is plan and engine.state is state
    assert torch.equal(engine.generate([1, 2, 3], 4, stop_ids=frozenset()), before)


def test_load_and_resize_take_numpy_and_torch_integers_as_generate_does(tiny_released):
    """load(max_context=np.int64(64)) was refused as no whole number, where generate takes np.int64(4) new tokens;
    the plan holds them as Python ints."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=np.int64(64), batch=np.int32(2))
    assert (engine.plan.context, engine.plan.batch) == (64, 2) and type(engine.plan.context) is int
    engine.resize(torch.tensor(32), np.uint8(1))
    assert (engine.plan.context, engine.plan.batch) == (32, 1) and type(engine.plan.batch) is int
    assert engine.generate([1, 2, 3], 4, stop_ids=frozenset()).shape == (1, 4)


def test_generate_checks_its_arguments_once(engine, monkeypatch):
    """generate checked its sampling arguments and stop ids, then decode_loop checked them again; each check runs
    once a call now, through generate or through decode_loop called directly."""
    counts = {"check_generate_args": 0, "as_stop_ids": 0}

    def counted(name):
        check = getattr(engine_module, name)

        def count(*args):
            counts[name] += 1
            return check(*args)
        return count

    for name in counts:
        monkeypatch.setattr(engine_module, name, counted(name))
    engine.generate([1, 2, 3], 4, temperature=0.5, seed=1, stop_ids={7})
    assert counts == {"check_generate_args": 1, "as_stop_ids": 1}
    engine.decode_loop(engine.decoder(1), engine.prefill([[1, 2, 3]]), 4, stop_ids={7})
    assert counts == {"check_generate_args": 2, "as_stop_ids": 2}


def test_resize_takes_the_cache_dtype_by_name_as_load_does(tiny_released):
    """resize(64, 1, "float8_e4m3fn") was an AttributeError; load takes the name. After it the CPU's default cache,
    float32 (the compute dtype), could not be asked for again: None keeps the cache's dtype, and "float32" was
    refused."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    engine.resize(32, 1, "float8_e4m3fn")
    assert engine.plan.mla_cache_dtype == engine.state.mla_cache.dtype == torch.float8_e4m3fn
    engine.resize(64, 1)   # None keeps the cache's dtype
    assert engine.plan.mla_cache_dtype == torch.float8_e4m3fn and engine.plan.context == 64
    engine.resize(64, 1, "float32")   # the compute dtype by name: the default cache again (it was refused)
    assert engine.plan.mla_cache_dtype == engine.state.mla_cache.dtype == torch.float32
    engine.resize(64, 1, torch.float32)
    fresh = klconvert.load(tiny_released, device="cpu", max_context=64, mla_cache_dtype="float32")
    assert torch.equal(engine.generate([1, 2, 3], 4, stop_ids=frozenset()),
                       fresh.generate([1, 2, 3], 4, stop_ids=frozenset()))
    with pytest.raises(KLError, match=r"^mla_cache_dtype='bfloat16x' \(--mla-cache-dtype\): choose bfloat16 or "
                                      r"float8_e4m3fn or float32, by name or torch dtype$"):
        engine.resize(64, 1, "bfloat16x")


@pytest.mark.parametrize("stop_ids, message", [
    (44, r"^stop_ids 44 should be a set of token ids, e\.g\. \{44\} for one \(frozenset\(\) never stops\)$"),
    (torch.tensor(44), r"^stop_ids tensor\(44\) should be a set of token ids"),
    ({44.5}, r"^stop_ids should be whole numbers, got torch\.float"),
    ({True}, r"^stop_ids should be whole numbers, got a bool at \[0\]"),
    ({-1}, r"^stop id -1 is outside the vocabulary \(0\.\.\d+\)$"),
    ({10**6}, r"^stop id 1000000 is outside the vocabulary"),
    ({2**70}, r"^stop_ids should be whole numbers in a list or tensor"),
    ("44", r"^stop_ids should be whole numbers in a list or tensor"),
    ([[1, 2]], r"^stop_ids should be a flat set of token ids, got them nested \(shape \[1, 2\]\)$"),
])
def test_stop_ids_that_are_no_set_of_token_ids_are_refused(engine, stop_ids, message):
    """The device stopped at torch.tensor(sorted(stop_ids)), the host at `t in stop_ids`: {44.5} stopped one and not
    the other, {True} stopped at 1, an id no token can be never stopped, 44 and 2**70 were torch's errors. Refused
    before any work, and by decode_loop, for its own callers (bench)."""
    with pytest.raises(KLError, match=message):
        engine.generate([1, 2, 3], 4, stop_ids=stop_ids)
    with pytest.raises(KLError, match=message):
        engine.decode_loop(engine.decoder(1), torch.zeros(1, engine.config.vocab_size), 4, stop_ids=stop_ids)


def test_stop_ids_are_taken_in_every_iterable_form(engine):
    """A generator was read up by sorted() for the device: the host never saw a stop, padded on, and handed the
    padding to on_token. A list, a tensor, numpy and torch integers stop alike."""
    import numpy as np

    stop = engine.generate([1, 2, 3], 6, stop_ids=frozenset())[0, 2].item()
    want = engine.generate([1, 2, 3], 6, stop_ids=frozenset({stop}))
    assert want.shape == (1, 3) and engine.stats.new_tokens == 3
    for stop_ids in ((s for s in [stop]), [stop], torch.tensor([stop]), {np.int64(stop)}, [torch.tensor(stop)]):
        seen = []
        assert torch.equal(engine.generate([1, 2, 3], 6, stop_ids=stop_ids, on_token=lambda b, t: seen.append(t)),
                           want), stop_ids
        assert seen == want[0].tolist() and engine.stats.new_tokens == 3, stop_ids


@pytest.mark.parametrize("token, position, message", [
    (torch.tensor([[5, 6]]), 0, r"^decode_step takes one token per sequence, \[B\] or \[B, 1\] ids with B >= 1, got "
                                r"shape \[1, 2\] \(a sequence's several tokens go through prefill\)$"),
    (torch.tensor([], dtype=torch.long), 0, r"got shape \[0\]$"),
    (torch.tensor(5), 0, r"got shape \[\]$"),
    (torch.tensor([[[5]]]), 0, r"got shape \[1, 1, 1\]$"),
    ([5], [1, 2], r"^decode_step's position should be one int for all sequences or \[B\] = \[1\] positions, one a "
                  r"sequence, got shape \[2\]$"),
    ([5], [[1]], r"got shape \[1, 1\]$"),
    ([5], [], r"got shape \[0\]$"),
])
def test_decode_step_takes_one_token_per_sequence(engine, token, position, message):
    """[[5, 6]] ran as a batch of two; an empty token, positions of another length or 2-d were torch's errors."""
    with pytest.raises(KLError, match=message):
        engine.decode_step(token, position)


def test_decode_step_takes_b_or_b_by_1_tokens_alike(engine):
    engine.prefill([[1, 2, 3]])
    flat = engine.decode_step(torch.tensor([4]), 3)
    engine.prefill([[1, 2, 3]])
    assert torch.equal(engine.decode_step(torch.tensor([[4]]), torch.tensor([3])), flat)


def test_the_output_grows_with_the_tokens_made_not_max_new_tokens(tiny_released, monkeypatch):
    """decode_loop took [B, max_new_tokens] up front: through OnnxEngine.generate (no plan bounds B there) 200
    prompts and 10**6 new tokens took 1.46 GB, though every sequence stopped at its first token."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=1 << 16)
    allocate = torch.empty

    def bounded(*size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        assert torch.Size(shape).numel() <= 1 << 14, f"allocates {list(shape)}"
        return allocate(*size, **kwargs)

    logits = engine.prefill([[1, 2, 3]])
    monkeypatch.setattr(torch, "empty", bounded)
    out = engine.decode_loop(engine.decoder(1), logits, (1 << 16) - 3,
                             stop_ids=frozenset(range(engine.config.vocab_size)))
    assert out.shape == (1, 1) and engine.stats.new_tokens == 1


def test_the_output_across_blocks_is_the_output_in_one(engine, monkeypatch):
    """The new ids are kept a block of OUT_COLUMNS steps at a time: a generation over several blocks (and one ending
    inside a block) returns what one block holds."""
    want = engine.generate([1, 2, 3], 11, stop_ids=frozenset())
    stop = want[0, 8].item()
    stopped = engine.generate([1, 2, 3], 11, stop_ids={stop})
    monkeypatch.setattr(engine_module, "OUT_COLUMNS", 3)
    assert torch.equal(engine.generate([1, 2, 3], 11, stop_ids=frozenset()), want)
    assert torch.equal(engine.generate([1, 2, 3], 11, stop_ids={stop}), stopped)


def test_a_uint64_id_past_int64_is_named_as_given(engine):
    """numpy's uint64 ids past 2**63 - 1 wrapped round to negative int64 ids: the message named
    -9223372036854775803."""
    numpy = pytest.importorskip("numpy")
    with pytest.raises(KLError, match=r"^token ids: 9223372036854775813 is past any id or position"):
        engine.generate([numpy.array([5, 2**63 + 5], dtype=numpy.uint64)], 1)
    with pytest.raises(KLError, match=r"^stop_ids: 9223372036854775813 is past any id or position"):
        engine.generate([[5]], 1, stop_ids=numpy.array([2, 2**63 + 5], dtype=numpy.uint64))
    assert engine.generate([[5]], 1, stop_ids=numpy.array([2], dtype=numpy.uint64)).shape == (1, 1)


def test_triton_kernels_off_cuda_are_refused_at_load(tiny_released, monkeypatch):
    """load(kernels="triton") on the CPU was taken, and generate then failed in Triton's driver ("0 active drivers"):
    refused at load, as the CLI's --kernels triton is (under TRITON_INTERPRET=1 the interpreter runs them)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KLError, match=r"^kernels='triton' \(--kernels\) needs a CUDA GPU, but it was asked for on "):
        klconvert.load(tiny_released, device="cpu", kernels="triton")


def test_decode_loop_of_no_new_tokens_samples_nothing(engine):
    """max_new_tokens=0 passed its checks and then wrote the first sampled token into a block of no columns: an
    IndexError. It returns the [B, 0] ids generate's prefill-only run returns, its decode figures zero."""
    ids = [1, 2, 3]
    step = engine.decoder(1)
    logits = engine.prefill(ids)
    step.positions.fill_(len(ids))
    engine.stats.steps, engine.stats.new_tokens = 7, 7   # a previous loop's figures
    got = engine.decode_loop(step, logits, 0)
    assert got.shape == (1, 0) and got.dtype == torch.long and got.device.type == "cpu"
    assert (engine.stats.steps, engine.stats.timed_steps, engine.stats.new_tokens, engine.stats.timed_tokens,
            engine.stats.decode_seconds, engine.stats.batch) == (0, 0, 0, 0, 0.0, 1)
    assert engine.generate([ids], 2).shape == (1, 2)


@pytest.mark.parametrize("prompts, message", [
    ([], r"^generate needs at least one prompt$"),
    ([[1, 2], []], r"^generate's prompt \[1\] is empty; each prompt needs at least one token id$"),
    (torch.zeros(1, 1, 3, dtype=torch.long), r"^generate's prompts have shape \[1, 1, 3\]; give \[T\] or \[B, T\] ids, "
                                             r"or a list of id lists$"),
    ([1, [2, 3]], r"^generate's prompt \[0\] has shape \[\]; give \[T\] or \[B, T\] ids, or a list of id lists$"),
])
def test_a_prompt_of_the_wrong_shape_is_named_by_its_shape(engine, prompts, message):
    """A [1, 1, 3] tensor and [1, [2, 3]] were said to be no prompt, or an empty one."""
    with pytest.raises(KLError, match=message):
        engine.generate(prompts, 2)


def _decode_loop_with(engine, generator, temperature: float) -> torch.Tensor:
    step = engine.decoder(1)
    logits = engine.prefill([1, 2, 3])
    step.positions.fill_(3)
    return engine.decode_loop(step, logits, 2, temperature=temperature, generator=generator)


def test_decode_loop_takes_a_generator_of_its_device(engine):
    """An int was a TypeError from inside sampling at a temperature, and quietly ignored at 0."""
    for temperature in (0.0, 1.0):
        with pytest.raises(KLError, match=r"^decode_loop's generator should be a torch\.Generator on cpu \(or "
                                          r"None\), got an int$"):
            _decode_loop_with(engine, 5, temperature)
    assert _decode_loop_with(engine, torch.Generator().manual_seed(0), 1.0).shape == (1, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_loop_refuses_a_generator_of_another_device(engine):
    with pytest.raises(KLError, match=r"^decode_loop's generator should be a torch\.Generator on cpu \(or None\), "
                                      r"got one on cuda"):
        _decode_loop_with(engine, torch.Generator(device="cuda"), 1.0)


HUGE = 10 ** 5000   # past the 4,300 digits Python prints an int in: its repr raises ValueError


def _bundled_tokenizer():
    from klconvert.models import BUNDLED_DIR
    from klconvert.tokenizer import Tokenizer

    return Tokenizer.from_folder(BUNDLED_DIR)


@pytest.mark.parametrize("call, named", [
    (lambda e: e.generate([1, 2], HUGE), "max_new_tokens"),
    (lambda e: e.generate([1, 2], 2, temperature=HUGE), "temperature"),
    (lambda e: e.generate([1, 2], 2, top_p=-HUGE), "top_p"),
    (lambda e: e.generate([1, 2], 2, seed=HUGE), "seed"),
    (lambda e: klconvert.load("tiny", device="cpu", max_context=HUGE), "max_context"),
    (lambda e: klconvert.load("tiny", device="cpu", batch=HUGE), "batch"),
    (lambda e: e.generate([1, 2], 2, stop_ids=HUGE), "stop_ids"),
    (lambda e: _bundled_tokenizer().decode([HUGE]), "token id"),
    (lambda e: _bundled_tokenizer().encode_chat([{"role": "user", "content": "hi"}], max_tokens=-HUGE), "max_tokens"),
])
def test_an_integer_too_long_to_print_is_refused_by_its_length(engine, call, named):
    """10**5000 as an argument was a ValueError from printing it in the refusal (or an OverflowError); the last
    three, from a repr cut to 40 characters, which Python makes whole first."""
    with pytest.raises(KLError, match=rf"{named}.* integer of 5,001 digits"):
        call(engine)


@pytest.mark.parametrize("value, said", [
    (HUGE, "an integer of 5,001 digits"), (-HUGE, "a negative integer of 5,001 digits"),   # its sign was dropped
    (10 ** 80, "an integer of 81 digits"), (2 ** 240, str(2 ** 240)),   # 73 digits, shown whole: they fit in 80
    (True, "True"), ("x" * 100, repr("x" * 100)[:77] + "..."),
], ids=["huge", "negative", "81-digits", "73-digits", "bool", "long-str"])
def test_a_value_is_shown_whole_or_by_its_size(value, said):
    from klconvert.errors import shown

    assert shown(value) == said


@pytest.mark.parametrize("value, said", [
    (np.zeros(1), "an ndarray"), (np.uint8(1), "a uint8"),   # were "a ndarray" and "an uint8"
    (1, "an int"), ("x", "a str"), (OSError(), "an OSError"), (type("HTTPError", (), {})(), "an HTTPError"),
    (type("Usage", (), {})(), "a Usage"),   # h197: was "an Usage"
], ids=["ndarray", "uint8", "int", "str", "OSError", "HTTPError", "Usage"])
def test_a_type_takes_the_article_of_its_names_sound(value, said):
    from klconvert.errors import a_type

    assert a_type(value) == said


def test_a_batch_counts_each_sequences_tokens_through_its_stop_id(tiny_released):
    """The README's summary: new tokens are each sequence's through its stop id, and the decode rate's tokens the same
    (not the steps the batch runs on for a sequence that has stopped)."""
    tok = klconvert.Tokenizer.from_folder(tiny_released)
    engine = klconvert.load(tiny_released, device="cpu", max_context=64, batch=2)
    prompts = [tok.encode("ROMEO."), tok.encode("The end")]
    free = engine.generate(prompts, 12, stop_ids=frozenset()).tolist()
    at = next(i for i in range(3, 9) if free[0][i] not in free[1] and free[0][i] not in free[0][:i])
    engine.generate(prompts, 12, stop_ids={free[0][at]})
    stats = engine.stats
    assert (stats.steps, stats.timed_steps, stats.new_tokens) == (11, 10, at + 1 + 12)
    assert stats.timed_tokens == (at + 1 - 2) + 10   # columns 2.. of each: the first sequence's through its stop id
