"""The Python API (`klconvert.load` and its Engine) refuses bad arguments in one KLError line, as the CLI's flags
do: garbage tokens, NaN logits and allocator or index errors before."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import klconvert
from klconvert.errors import KLError
import klconvert.runtime.engine as engine_module
from klconvert.runtime.host_memory import ADDRESS_SPACE_BOUND, HostMemory, HostMemoryExhausted
from testkit import assert_one_line_error, run_cli


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
    (dict(seed=2**70), "seed 1180591620717411303424 should be a whole number torch.Generator takes"),
    (dict(temperature=True), "temperature True should be"),
    (dict(top_p=True), r"top_p True should be in \(0, 1\]"),
])
def test_sampling_arguments_are_checked(engine, kwargs, message):
    """A NaN temperature sampled token 0 at every step; a seed of 2**70 was a ValueError from torch."""
    with pytest.raises(KLError, match=message):
        engine.generate([[1, 2, 3]], 2, **kwargs)


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


@pytest.mark.parametrize("token, position, message", [
    ([5], -3, r"position -3 is outside the planned context 0\.\.63"),
    ([5], 10**6, r"position 1000000 is outside the planned context"),
    ([10**6], 0, r"token id 1000000 is outside the vocabulary"),
])
def test_decode_step_checks_its_token_and_position(engine, token, position, message):
    """Position -3 gave NaN logits, 10**6 and an id past the vocabulary IndexErrors."""
    with pytest.raises(KLError, match=message):
        engine.decode_step(torch.tensor(token), position)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mla_cache_dtype=torch.int8), "--mla-cache-dtype torch.int8: choose bfloat16 or float8_e4m3fn"),
    (dict(mla_cache_dtype=torch.bool), "--mla-cache-dtype torch.bool"),
    (dict(dtype=torch.int32), "--dtype torch.int32: choose float32 or bfloat16"),
    (dict(max_context=4096.5), r"--max-context \(4096.5\) and --batch \(1\) must be whole numbers"),
    (dict(max_context="4096"), r"--max-context \('4096'\)"),
    (dict(device="tpu"), "device 'tpu' is not one torch knows"),
    (dict(device="meta"), "device meta is not supported"),
])
def test_load_checks_its_arguments(tiny_released, kwargs, message):
    """An int8 cache decoded garbage; the others were TypeError, KeyError or torch's RuntimeError."""
    with pytest.raises(KLError, match=message):
        klconvert.load(tiny_released, **{"device": "cpu", **kwargs})


def test_a_batch_past_the_hosts_memory_is_refused_before_allocating(tiny_released, monkeypatch):
    """batch=10**9 asked the allocator for 98 TB: its RuntimeError."""
    monkeypatch.setattr(engine_module, "host_memory", lambda: HostMemory(1 << 30))
    with pytest.raises(KLError, match=r"the plan needs [\d,.]+ GiB but cpu has 1\.0 GiB available on the host "
                                      r"\(MemAvailable\); .*, or free some memory$"):
        klconvert.load(tiny_released, device="cpu", batch=10**9)


def test_a_plan_past_a_process_limit_names_the_limit(tiny_released, monkeypatch):
    """ulimit -v 1500000 and --max-context 1000000 was the allocator's traceback, MemAvailable being all it read."""
    monkeypatch.setattr(engine_module, "host_memory", lambda: HostMemory(1 << 29, *ADDRESS_SPACE_BOUND))
    with pytest.raises(KLError, match=r"^the plan needs 1\.\d GiB but cpu has 0\.5 GiB available under the process's "
                                      r"address-space limit \(ulimit -v\); lower --max-context to \d+ or less, or "
                                      r"raise ulimit -v$"):
        klconvert.load(tiny_released, device="cpu", max_context=10**6)


def test_a_resize_counts_the_weights_it_holds_as_its_own(tiny_released, monkeypatch):
    """After load the weights are out of what the host has left: a resize held them against it a second time. The
    state it holds counts as its own too (the new plan's is allocated once the old one is freed)."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    plan = engine.plan
    left = plan.total_for(4096) - plan.weights - plan.state_bytes - plan.mla_cache_bytes + 1   # 64's state held
    monkeypatch.setattr(engine_module, "host_memory", lambda: HostMemory(left))
    engine.resize(4096, 1)
    assert engine.state.context == 4096
    limit = left + plan.weights + engine.plan.state_bytes + engine.plan.mla_cache_bytes   # 4096's state held now
    fit = dataclasses.replace(engine.plan, memory_limit=limit).largest_context()
    assert 4096 <= fit < 8192
    with pytest.raises(KLError, match=rf"lower --max-context to {fit} or less"):
        engine.resize(8192, 1)


def test_a_refused_resize_leaves_the_engine_as_it_was(tiny_released):
    """resize freed the state before checking the new plan: a refusal left the engine with none (generate's
    AttributeError), and a batch no context fits was said to be the weights not fitting."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    before = engine.generate([1, 2, 3], 4, stop_ids=frozenset())
    with pytest.raises(KLError, match=r"no context fits a batch of 1000000000: lower --batch"):
        engine.resize(64, 10**9)
    assert engine.plan.batch == 1 and engine.state.context == 64
    assert torch.equal(engine.generate([1, 2, 3], 4, stop_ids=frozenset()), before)


def test_load_checks_the_plan_once_before_the_weights_take_their_share(tiny_released, monkeypatch):
    """Reading the weights (and the threads that do it) takes more than the weights' bytes: a second check after them
    refused the --max-context the first had named as fitting."""
    answers = iter([HostMemory(1 << 40)])
    monkeypatch.setattr(engine_module, "host_memory", lambda: next(answers, HostMemory(0)))
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
                                                  r"the (memory plan's state and MLA cache|weights) \(\d\.\d GiB\): "
                                                  r".*DefaultCPUAllocator: can't allocate memory"):
        klconvert.load(tiny_released, device="cpu", max_context=64)
    code, _, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "a", "--max-new-tokens", "2")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit)")


def test_other_runtime_errors_at_load_are_not_called_out_of_memory(tiny_released, monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("DefaultCPUAllocator is fine; something else is not")
    monkeypatch.setattr("klconvert.runtime.memory_plan.MemoryPlan._allocate", broken)
    with pytest.raises(RuntimeError, match="something else") as error:
        klconvert.load(tiny_released, device="cpu", max_context=64)
    assert not isinstance(error.value, MemoryError)
