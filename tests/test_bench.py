"""klconvert bench's code path on the CPU (Triton's interpreter, tiny shapes): it checks before it times, and its
floor counts the bytes a step must move. The figures themselves come from the GPU (BENCHMARKS.md)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klconvert import bench as B
from klconvert.cli import cli
from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.models import bundled_dir
from klconvert.presets import preset_config
from klconvert.runtime import engine as engine_module
from klconvert.runtime.device_memory import ContextDoesNotFit
from klconvert.units import size_text
from testkit import assert_one_line_error, gpu_with_free, run_cli, shown_lines


# the Triton path on CPU tensors: Triton's interpreter, which conftest turns on only where there is no GPU
ON_THE_INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter "
                                        "(conftest sets it only without a GPU); the GPU runs `klconvert bench` itself")


@pytest.fixture(scope="module")
def tiny4():
    """Two layers of the tiny preset (KDA with the dense MLP, MLA with the MoE): the interpreter is slow."""
    return KimiLinearConfig.from_dict(preset_config("tiny", 2))


@pytest.fixture(scope="module")
def tiny4_one_routed():
    """tiny4 routing each token to one expert beside the shared one, for the bound bench's runs: the interpreter runs
    the fused MoE's decode kernel once per (token, slot) and n-tile, 2 slots a token where tiny's 4 experts make 5,
    and those programs were the most of its time (1,904 in the check-and-time test)."""
    return KimiLinearConfig.from_dict({**preset_config("tiny", 2), "num_experts_per_token": 1})


@pytest.fixture(scope="module")
def tiny1():
    """One layer of the tiny preset (MLA with the dense MLP), for the refusals: a check that fails must run through
    both paths before it refuses, and no KDA or MoE layer need run through the interpreter for that (the MoE's
    decode kernel and the KDA chunk were most of the two-layer checks' time; the passing checks above run them)."""
    return KimiLinearConfig.from_dict(preset_config("tiny", 1))


@pytest.mark.slow
@ON_THE_INTERPRETER
def test_bench_checks_then_times_on_the_cpu(tiny4_one_routed, monkeypatch):
    """Decode rows, then prefill rows (segments of 2), on one bound model: the depth check (two decode steps after
    its prompt) and the prefill check (prefill against prefill + one decode step) pass before anything is timed.
    One call, short prompts: the interpreter is slow."""
    monkeypatch.setattr(engine_module, "PREFILL_SEGMENT", 2)
    monkeypatch.setattr(B, "CHECK_DECODE", 2)
    weights = B.random_quantized_weights(tiny4_one_routed, 4, "cpu")
    calm = B.random_quantized_weights(tiny4_one_routed, 4, "cpu", calm=True)
    lines: list[str] = []
    # asking for the longest context fills 72 - 2 - 16
    short = dataclasses.replace(tiny4_one_routed, model_max_length=72)
    result = B.bench(short, weights, bits="int4", contexts=[72], batches=[2], new_tokens=2, calm_weights=calm,
                     report=lines.append, device="cpu", check_prompt=2, prefills=[3], prefill_check_tokens=3,
                     warmup=False)
    # the kernels take bf16 inputs; the bound bench itself refuses past
    assert result.depth_check["rel_err"] <= B.DEPTH_CHECK_BOUND and result.depth_check["top1"] >= B.DEPTH_CHECK_TOP1
    (row,) = result.rows
    assert (row.context, row.batch) == (54, 2)
    k = tiny4_one_routed.num_experts_per_token
    assert k <= row.experts_touched_per_layer <= 2 * k                                     # two tokens' choices
    assert row.bytes_per_step > 0 and row.ms_per_step > 0 and row.floor_ratio > 0
    assert row.ms_per_step * row.tokens_per_s == pytest.approx(1e3 * row.batch)   # a step is the batch's tokens
    assert row.graph_check == "no graph: the eager step is what runs"   # on the CPU; the JSON said "bit-exact"
    assert any("ms/step" in line for line in lines)
    assert result.prefill_check["rel_err"] <= B.PREFILL_CHECK_BOUND and result.prefill_check["top1"]
    assert [r.tokens for r in result.prefill_rows] == [3]                       # two segments
    assert all(r.seconds > 0 and r.tokens_per_s > 0 and r.plan_total_gib > 0 for r in result.prefill_rows)
    assert sum("prefill 3 tokens" in line and "tokens/s" in line for line in lines) == 1


def _refusal(config, monkeypatch) -> str:
    """bench's one-line refusal on `config` with one decode row and one prefill row asked for, checked to come before
    any timing function ran or any figure was reported."""
    timed: list[str] = []

    def timing(name):
        def called(*args, **kwargs):
            timed.append(name)
            raise AssertionError(f"{name} ran after a failed check")
        return called

    for name in ("time_decode", "time_prefill", "check_graph_matches_eager"):
        monkeypatch.setattr(B, name, timing(name))
    weights = B.random_quantized_weights(config, 4, "cpu")
    calm = B.random_quantized_weights(config, 4, "cpu", calm=True)
    lines: list[str] = []
    with pytest.raises(B.KLError) as refused:
        B.bench(config, weights, bits="int4", contexts=[32], batches=[1], new_tokens=2, calm_weights=calm,
                report=lines.append, device="cpu", check_prompt=2, prefills=[3], prefill_check_tokens=3, warmup=False)
    assert timed == [] and not any("ms/step" in line or "tokens/s" in line for line in lines)
    return str(refused.value)


@pytest.mark.slow
@ON_THE_INTERPRETER
@pytest.mark.parametrize("failing", ["relative error", "top-1"])
def test_bench_refuses_to_time_when_the_depth_check_fails(tiny1, monkeypatch, failing):
    """The Triton path reading far from the PyTorch path, or choosing other tokens (a top-1 no run reaches): one line
    with the figures, and no row timed -- each condition alone."""
    monkeypatch.setattr(B, "CHECK_DECODE", 2)
    if failing == "relative error":
        monkeypatch.setattr(B, "_rel", lambda a, b: 0.5)
    else:
        monkeypatch.setattr(B, "DEPTH_CHECK_TOP1", 1.01)
    message = _refusal(tiny1, monkeypatch)
    assert "\n" not in message and "bench check failed" in message and "nothing was timed" in message
    assert ("rel err 0.5" in message) == (failing == "relative error")
    assert f"bound {B.DEPTH_CHECK_BOUND}" in message and f"(at least {B.DEPTH_CHECK_TOP1})" in message


@pytest.mark.slow
@ON_THE_INTERPRETER
def test_bench_refuses_to_time_when_the_prefill_check_fails(tiny1, monkeypatch):
    """Prefill and prefill + one decode step reading apart: one line with the figures, and nothing timed (the
    prefill check runs before the decode rows too)."""
    monkeypatch.setattr(engine_module, "PREFILL_SEGMENT", 2)
    monkeypatch.setattr(B, "depth_check", lambda *a, **k: {"rel_err": 0.0, "top1": 1.0})   # tested above
    monkeypatch.setattr(B, "_rel", lambda a, b: 0.5)
    message = _refusal(tiny1, monkeypatch)
    assert "\n" not in message and "3-token prefill and prefill + one decode step differ by 0.5" in message
    assert f"bound {B.PREFILL_CHECK_BOUND}" in message and "nothing was timed" in message


def test_a_failed_prefill_check_writes_its_prefill_length_with_thousands_separators(tiny4, monkeypatch):
    """The prefill check's refusal said "a 4096-token prefill" (h322's left-alone): the length is a count in prose,
    written with ','. Engine and _rel stand in for the two paths (the test above runs them): a 4,096-token prefill on
    the interpreter takes minutes, and the line is what is tested here."""
    class TwoReadings:
        def __init__(self, *args, **kwargs):
            pass

        def prefill(self, ids):
            return torch.zeros(1, 8)

        def decode_step(self, ids, position):
            return torch.ones(1, 8)

    monkeypatch.setattr(B, "Engine", TwoReadings)
    monkeypatch.setattr(B, "_rel", lambda a, b: 0.5)
    weights = B.Weights(read=lambda name: pytest.fail("read a weight"), packed=lambda name: None, schemes={})
    with pytest.raises(KLError, match=r"^bench check failed: a 4,096-token prefill and prefill \+ one decode step "
                                      r"differ by 0\.5 relative"):
        B.prefill_check(tiny4, weights, torch.device("cpu"), 4096, torch.bfloat16)


def test_the_depth_check_takes_any_top_1_of_a_tie_in_the_reference():
    """The PyTorch bf16 path's logits tie at the top: argmax takes the first, and 8 layers of calm weights read top-1
    0.297 where the Triton path chose the fp32 path's top-1 at every position (session 61's GPU call)."""
    ref = torch.tensor([[1.0, 1.0, 0.5], [2.0, 0.0, 1.0], [0.0, 3.0, 3.0]], dtype=torch.bfloat16)
    fast = torch.tensor([[0.9, 1.1, 0.5], [2.1, 0.0, 1.0], [0.0, 2.9, 3.1]])
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean().item() == pytest.approx(1 / 3)
    assert B._top1_agreement(fast, ref) == 1.0
    assert B._top1_agreement(torch.tensor([[0.0, 0.0, 1.0]] * 3), ref) == pytest.approx(1 / 3)   # no tie's


def test_one_token_touches_k_experts(tiny4):
    engine = B.Engine(tiny4, B.random_quantized_weights(tiny4, 4, "cpu").read, torch.device("cpu"), torch.float32,
                      64, 1)
    B.fill_state(engine, 20)
    assert B.experts_touched(engine, 1) == tiny4.num_experts_per_token


def test_fill_state_draws_a_bounded_slice_of_the_whole_batch(tiny4, monkeypatch):
    """fill_state drew FILL_SLICE_ROWS rows of every sequence at once: at the 48B preset's batch 16 from 64K tokens
    up, 2.4 GB of fp32 rows a draw (3.4 GiB with their bf16 copy, past the plan's 2.7 GiB of workspace). Each draw
    holds FILL_SLICE_ROWS rows over the batch, and every row of the context is written still."""
    engine = B.Engine(tiny4, B.random_quantized_weights(tiny4, 4, "cpu").read, torch.device("cpu"), torch.float32,
                      64, 4)
    monkeypatch.setattr(B, "FILL_SLICE_ROWS", 8)
    drawn, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: drawn.append(shape) or randn(*shape, **kw))
    engine.state.mla_cache.zero_()
    B.fill_state(engine, 20)
    assert drawn and all(batch * rows <= 8 for batch, rows, _ in drawn)
    assert sum(rows for _, rows, _ in drawn) == 20 * engine.state.mla_cache.shape[0]
    assert (engine.state.mla_cache[:, :, :20] != 0).any(-1).all()   # every sequence's first 20 rows
    assert not engine.state.mla_cache[:, :, 20:].any()


def test_spread_routing_gives_each_sequence_its_own_experts(tiny4):
    engine = B.Engine(tiny4, B.random_quantized_weights(tiny4, 4, "cpu").read, torch.device("cpu"), torch.float32,
                      64, 4)
    B.fill_state(engine, 20)
    B.spread_routing(engine, 4)
    B.spread_routing(engine, 4)  # re-wrapping (after a resize) wraps the router, not the wrapper
    gates = [b.ffn.gate for i, b in enumerate(engine.model.blocks) if tiny4.is_moe(i)]
    assert not any(isinstance(g.router, B.SpreadRouting) for g in gates)
    assert all(len({tuple(sorted(r.tolist())) for r in g.ids}) == 4 for g in gates)   # each sequence its own set
    distinct = [g.ids.unique().numel() for g in gates]
    assert B.experts_touched(engine, 4) == round(sum(distinct) / len(distinct))


@ON_THE_INTERPRETER
def test_spread_routing_keeps_the_fused_norm_and_router_launch(tiny4, monkeypatch):
    """On the Triton path the wrapped router's launch (the MoE layer's add, norm and router in one) still runs; the
    experts get the spread choices."""
    from klconvert.runtime import kernel_modules

    w = B.random_quantized_weights(tiny4, 4, "cpu")
    engine = B.Engine(tiny4, w.read, torch.device("cpu"), torch.float32, 64, 2, packed=w.packed, kernels="triton",
                      stored_schemes=w.schemes)
    B.spread_routing(engine, 2)
    block = next(b for i, b in enumerate(engine.model.blocks) if tiny4.is_moe(i))
    launches, routed = [], []
    fused, experts = kernel_modules.moe_add_norm_router, kernel_modules.fused_moe
    monkeypatch.setattr(kernel_modules, "moe_add_norm_router", lambda *a, **k: launches.append(1) or fused(*a, **k))
    monkeypatch.setattr(kernel_modules, "fused_moe",
                        lambda h, ids, *a, **k: routed.append(ids) or experts(h, ids, *a, **k))
    x, branch = torch.randn(2, tiny4.hidden_size), torch.randn(2, tiny4.hidden_size)
    block.ffn.decode(block.post_attention_layernorm, x, branch)
    assert launches == [1] and torch.equal(routed[0], block.ffn.gate.ids)


def test_random_weights_are_quantized_where_the_policy_says(tiny4):
    w = B.random_quantized_weights(tiny4, 4, "cpu")
    assert w.schemes["lm_head.weight"].bits == 8 and w.schemes["model.layers.1.self_attn.q_proj.weight"].bits == 4
    assert w.packed("model.norm.weight") is None
    q = w.read("model.layers.1.block_sparse_moe.experts.0.w1.weight")
    assert q.shape == (128, 128) and 0.5 < q.float().std().item() * 128 ** 0.5 < 2.0        # O(1) activations
    assert torch.equal(q, w.read("model.layers.1.block_sparse_moe.experts.0.w1.weight"))     # deterministic


def _bench_inputs(config: KimiLinearConfig) -> list[torch.Tensor]:
    """What the bench binds and checks with: every calm weight read, every packed one's parts, the checks' prompt."""
    weights = B.random_quantized_weights(config, 4, "cpu", calm=True)
    names = list(expected_tensors(config))
    packed = [t for name in names if (found := weights.packed(name)) is not None for t in found[0].values()]
    return [weights.read(name) for name in names] + packed + [B.check_ids(config, 9)]


def test_an_apps_default_device_changes_no_weight_nor_check_prompt(tiny4):
    """Under torch.set_default_device("meta") each packed weight's weight_shape, the calm router biases' pinned
    experts and the checks' prompt were made there (reading a packed weight failed on its meta shape). They are made
    on the host or the bench's device: the same tensors, there."""
    want = _bench_inputs(tiny4)
    torch.set_default_device("meta")
    try:
        got = _bench_inputs(tiny4)
    finally:
        torch.set_default_device(None)
    assert len(got) == len(want) and all(g.device.type == "cpu" and torch.equal(g, w) for g, w in zip(got, want))


def test_a_cache_dtype_the_runtime_does_not_take_is_refused_as_load_refuses_it(tiny4):
    """bench worded load's refusal its own way; both say it with engine.checked_mla_cache_dtype now."""
    weights = B.random_quantized_weights(tiny4, 4, "cpu")
    with pytest.raises(B.KLError, match=r"^mla_cache_dtype='int8' \(--mla-cache-dtype\): choose bfloat16 or "
                                        r"float8_e4m3fn, by name or torch dtype$"):
        B.bench(tiny4, weights, bits="int4", contexts=[32], batches=[1], mla_cache_dtype="int8", device="cpu")


def test_bytes_per_step_grow_with_context(tiny4):
    engine = B.Engine(tiny4, B.random_quantized_weights(tiny4, 4, "cpu").read, torch.device("cpu"), torch.float32,
                      64, 1)
    grown = B.bytes_per_step(engine, 60, 1, 4) - B.bytes_per_step(engine, 30, 1, 4)
    assert grown == 30 * engine.plan.mla_bytes_per_token


@ON_THE_INTERPRETER
def test_the_floor_counts_each_weight_once():
    """bytes_per_step summed each module's own weights, so the parameters FusedKDAStep and TritonKDAChunk hold again
    (their KDA mixer's f_b, g_b, o_norm, dt_bias) counted two or three times: on the tiny preset 105,216 bytes over
    (with the shared expert's copy, gone from the bind, 282,624), at the 48B 42.6 MB, 2% of its floor (h267). The
    count from the plan: every weight once, as the repack holds it (its padded rows too), but the embedding (a row per
    token) and the routed experts (the ones touched), with the state read and written, and the cache rows read."""
    c = KimiLinearConfig.from_dict(preset_config("tiny"))
    weights = B.random_quantized_weights(c, 4, "cpu")
    engine = B.Engine(c, weights.read, torch.device("cpu"), torch.bfloat16, 64, 1, packed=weights.packed,
                      kernels="triton", stored_schemes=weights.schemes)
    plan, held, touched = engine.plan, engine.plan.weight_bytes, c.num_experts_per_token
    moved = (plan.weights - held["embedding"] + c.hidden_size * torch.bfloat16.itemsize
             - held["experts"] + held["experts"] // c.num_experts * touched
             + 2 * (plan.kda_state_bytes_per_seq + plan.conv_bytes_per_seq) + 60 * plan.mla_bytes_per_token)
    assert B.bytes_per_step(engine, 60, 1, touched) == moved


@pytest.mark.slow
def test_bench_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run = subprocess.run([sys.executable, "-m", "klconvert", "bench", "--preset", "kimi-linear-48b", "--layers", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in run.stderr


def test_a_bench_that_fails_leaves_no_folder_for_its_json(tmp_path, capsys):
    """The --json file's folders are made before the bench (so a bad path is said at once) and go again when it
    fails; a --context past the model's length is refused as --prefill is (it was cut to fit, unsaid)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    json_file = tmp_path / "new" / "sub" / "x.json"
    assert_one_line_error(*run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--json",
                                   json_file)[::2], "needs a CUDA GPU")
    assert not (tmp_path / "new").exists()
    assert_one_line_error(*run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--context",
                                   "2000000")[::2], "--context 2000000 is over the model's model_max_length")


def test_new_tokens_that_leave_no_context_are_refused_before_the_device(tiny4, monkeypatch):
    """bench fills each decode row's context short by the decoded tokens and DECODE_SPARE_ROWS: 60 of a 72-token
    model left a context of -4, decoded at unsaid. One line, before the device is looked at (no GPU here says this,
    not that none is visible); one token fewer than the bound binds a one-token context."""
    short = dataclasses.replace(tiny4, model_max_length=72)
    weights = B.random_quantized_weights(short, 4, "cpu")

    class Bound(Exception):
        pass

    def engine(config, read, device, dtype, plan_context, batch, **kwargs):
        raise Bound(plan_context)

    monkeypatch.setattr(B, "Engine", engine)
    for new_tokens in (56, 60, 2**40):
        with pytest.raises(B.KLError) as refused:
            B.bench(short, weights, bits="int4", contexts=[32], batches=[1], new_tokens=new_tokens, device="cuda",
                    report=lambda line: pytest.fail(f"reported {line!r} before refusing"))
        assert str(refused.value) == (f"--new-tokens {new_tokens} leaves no context to decode at: the decoded "
                                      "tokens and 16 spare cache rows must fit the model's model_max_length of 72 "
                                      "tokens; give --new-tokens 55 or fewer")
    with pytest.raises(Bound) as bound:
        B.bench(short, weights, bits="int4", contexts=[32], batches=[1], new_tokens=55, device="cpu",
                report=lambda line: None)
    assert bound.value.args == (72,)   # context 1 + 55 decoded + 16 spare rows


def test_a_row_whose_gpu_fits_one_token_of_context_says_one():
    """A decode row's refusal where the context that fits is under what the row plans past its --context said "at
    most 1 tokens of context fit" (formatted by hand; units.counted now)."""
    refusal = ContextDoesNotFit("the plan needs 9 GB but cuda has 8 GB free", 1, True, "--context", None)
    assert str(B._row_refusal(refusal, "--context", planned_past=144)) == (
        "the plan needs 9 GB but cuda has 8 GB free; at most 1 token of context fit, and a decode row plans 144 past "
        "its --context (--new-tokens and 16 spare cache rows): lower --new-tokens or --batch")


@pytest.mark.parametrize("model", [("--preset", "kimi-linear-48b", "--layers", "1"), ("--model", "tiny")],
                         ids=["preset", "tiny"])
def test_the_command_refuses_new_tokens_past_the_model_length_with_the_other_flags(capsys, monkeypatch, model):
    """--new-tokens 1,048,560 of a 1,048,576-token model: refused by the command's own checks (bench() stood in
    for), in one line naming the flag, the bound and what to give."""
    ran = []
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: ran.append(kwargs) or B.BenchResult(
        "stand-in", 1, "int4", 1.0))
    assert_one_line_error(*run_cli(capsys, "bench", *model, "--new-tokens", "1048560")[::2],
                          "--new-tokens 1048560 leaves no context to decode at", "model_max_length of 1,048,576 "
                          "tokens; give --new-tokens 1048559 or fewer")
    assert ran == []
    assert run_cli(capsys, "bench", *model, "--new-tokens", "1048559")[0] == 0 and ran[0]["new_tokens"] == 1048559


@pytest.mark.parametrize("kind", ["FIFO", "link to a file", "link to nothing"])
def test_a_json_name_that_is_no_regular_file_is_refused_and_left_as_it_is(tmp_path, capsys, kind):
    """The results are written whole: a new file renamed over --json. Only a folder was refused: a FIFO there (or
    /dev/null, /dev/stdout, a link) was replaced by a regular file after the bench."""
    json_file, target = tmp_path / "bench.json", tmp_path / "earlier.json"
    if kind == "FIFO":
        os.mkfifo(json_file)
    else:
        if kind == "link to a file":
            target.write_text("{}")
        json_file.symlink_to(target)
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--json", json_file)
    if kind == "FIFO":
        assert_one_line_error(code, err, f"--json {json_file}: is a FIFO, not a file; give the name of a file to "
                                         "write (a new one, or one to replace)")
        assert stat.S_ISFIFO(os.lstat(json_file).st_mode)
    else:
        assert_one_line_error(code, err, f"--json {json_file}: is a link (to {target}), which the results would "
                                         f"replace, not write through; give the file's own name or a new one")
        assert json_file.is_symlink()


def test_a_json_named_dash_is_refused_before_the_bench(tmp_path, capsys, monkeypatch):
    """- is standard input or output elsewhere (--prompt-file -, eval's --text-file -): --json - wrote a file named
    "-" after the whole bench (h282). Refused before it (bench() stood in for), as /dev/stdout is."""
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: ran.append(kwargs) or B.BenchResult(
        "stand-in", 1, "int4", 1.0))
    assert_one_line_error(*run_cli(capsys, "bench", "--model", "tiny", "--json", "-")[::2],
                          "--json -: bench writes its results whole to a file, not to standard output; give a file "
                          "name, e.g. bench.json")
    assert ran == [] and list(tmp_path.iterdir()) == []
    # ./- is the file named -, as run's --prompt-file and eval's --text-file take it (it was refused as -)
    code, _, err = run_cli(capsys, "bench", "--model", "tiny", "--json", "./-")
    assert code == 0 and len(ran) == 1, err
    assert json.loads((tmp_path / "-").read_text())["gpu"] == "stand-in"


def test_a_json_file_of_the_model_being_timed_is_refused_and_left_as_it_is(tmp_path, capsys):
    """`bench --model DIR --json DIR/config.json` wrote the results over the model's config (helper-129)."""
    folder = shutil.copytree(bundled_dir(), tmp_path / "model")
    before = (folder / "config.json").read_bytes()
    (tmp_path / "elsewhere").mkdir()
    for name in (folder / "config.json", tmp_path / "elsewhere" / ".." / "model" / "config.json"):
        assert_one_line_error(*run_cli(capsys, "bench", "--model", folder, "--json", name)[::2],
                              f"--json {name}: is a file of the model folder {folder}, which the results would "
                              "replace; give a name outside it")
    assert (folder / "config.json").read_bytes() == before


def test_a_json_file_that_cannot_be_written_is_refused_before_the_bench(tmp_path, capsys):
    """--json naming a folder, or a file in a folder that takes no files, ends in one line before anything runs
    (on a GPU too: nothing would be timed)."""
    cases = [(tmp_path, f"--json {tmp_path}: is a folder; give a file name")]
    if Path("/proc/self").is_dir():   # Linux's /proc: a folder where no file can be created
        cases.append((Path("/proc/bench.json"),
                      "/proc/bench.json: cannot create files in the folder it goes in, /proc ("))
    for where, needle in cases:
        assert_one_line_error(*run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--json",
                                       where)[::2], needle)


@pytest.mark.parametrize("given, layers", [((), 4), (("--peer-layers", "2"), 2)])
def test_peer_times_transformers_on_the_release_at_peer_layers_with_the_same_new_tokens(tmp_path, monkeypatch, capsys,
                                                                                       given, layers):
    """README: `--peer transformers` times KimiLinearForCausalLM (`--peer-layers`, default 4, the same
    `--new-tokens`) in the same call. klconvert's own bench, which needs a GPU, stands in here."""
    timed = []
    monkeypatch.setattr(B, "random_quantized_weights", lambda *args, **kwargs: None)
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: B.BenchResult("stand-in", 1, "int4", 1.0))
    monkeypatch.setattr(B, "time_transformers", lambda raw, **kwargs: timed.append((raw, kwargs)) or {"ms": 1.5})
    json_file = tmp_path / "bench.json"
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--new-tokens", "32",
                           "--peer", "transformers", *given, "--json", json_file)
    assert code == 0, err
    ((raw, kwargs),) = timed
    assert raw == preset_config("kimi-linear-48b", layers) and kwargs["new_tokens"] == 32
    assert json.loads(json_file.read_text())["peer"] == {"ms": 1.5}
    assert run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1")[0] == 0 and len(timed) == 1
    assert_one_line_error(*run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--peer", "transformers",
                                   "--peer-layers", "0")[::2], "--peer-layers")
    # with no peer to size it was ignored, unsaid
    assert_one_line_error(*run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--peer-layers",
                                   "2")[::2], "--peer-layers 2 sizes the peer's model, and no peer is timed; add "
                                              "--peer transformers, or drop --peer-layers")
    assert len(timed) == 1


@pytest.mark.parametrize("args, refused", [
    (["--model", "tiny", "--bits", "8"], "--bits 8 sets the bits of a --preset's random weights; a --model folder is "
                                         "timed as it is stored -- drop --bits"),
    (["--model", "tiny", "--bits", "4"], "--bits 4 sets the bits"),   # the default, given: still ignored
    (["--preset", "kimi-linear-48b", "--prefill", "1024", "--batch", "1,16"],
     "--batch 1,16 shapes the decode rows, and --prefill without --context times none (each prompt is prefilled "
     "alone, at batch 1); add --context N to time decode rows too, or drop --batch"),
    (["--preset", "kimi-linear-48b", "--prefill", "1024", "--new-tokens", "32"], "--new-tokens 32 shapes the decode"),
    (["--model", "tiny", "--prefill", "1024", "--spread-routing", "--batch", "1"],
     "--batch 1 and --spread-routing shape the decode rows, and --prefill without --context times none"),
])
def test_flags_the_bench_would_ignore_are_refused_before_anything_runs(capsys, monkeypatch, args, refused):
    """--bits with a --model folder, and the decode rows' --batch, --new-tokens and --spread-routing beside --prefill
    alone, were ignored unsaid. Refused before weights are made or read, and before the GPU is looked for."""
    monkeypatch.setattr(B, "random_quantized_weights", lambda *args, **kwargs: pytest.fail("weights were made"))
    monkeypatch.setattr(B, "bench", lambda *args, **kwargs: pytest.fail("the bench ran"))
    assert_one_line_error(*run_cli(capsys, "bench", *args)[::2], refused)


def test_flags_the_bench_uses_are_taken(capsys, monkeypatch):
    """--bits with --preset; --batch, --new-tokens and --spread-routing with --context rows beside --prefill; and
    --new-tokens beside --prefill alone when the peer decodes them."""
    ran, timed = [], []
    monkeypatch.setattr(B, "random_quantized_weights", lambda config, bits, *args, **kwargs: ran.append(bits))
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: ran.append(kwargs) or B.BenchResult(
        "stand-in", 1, "int8", 1.0))
    monkeypatch.setattr(B, "transformers_peer", lambda: None)
    monkeypatch.setattr(B, "time_transformers", lambda raw, **kwargs: timed.append(kwargs) or {"ms": 1.5})
    preset = ("--preset", "kimi-linear-48b", "--layers", "1")
    assert run_cli(capsys, "bench", *preset, "--bits", "8", "--prefill", "1024", "--context", "4096", "--batch", "2",
                   "--new-tokens", "32", "--spread-routing")[0] == 0
    assert ran[:2] == [8, 8] and (ran[2]["contexts"], ran[2]["batches"], ran[2]["new_tokens"], ran[2]["spread"],
                                  ran[2]["prefills"]) == ([4096], [2], 32, True, [1024])
    code, _, err = run_cli(capsys, "bench", *preset, "--prefill", "1024", "--new-tokens", "32", "--peer",
                           "transformers")
    assert code == 0, err
    assert ran[-1]["contexts"] == [] and [kwargs["new_tokens"] for kwargs in timed] == [32]


def test_peer_layers_past_the_release_are_refused_before_anything_is_timed(tmp_path, monkeypatch, capsys):
    """--peer-layers 28 was taken, and refused only once the whole bench had run, naming --layers: no --json."""
    layers = preset_config("kimi-linear-48b")["num_hidden_layers"]
    monkeypatch.setattr(B, "transformers_peer", lambda: None)
    monkeypatch.setattr(B, "random_quantized_weights", lambda *args, **kwargs: pytest.fail("weights were made"))
    monkeypatch.setattr(B, "bench", lambda *args, **kwargs: pytest.fail("the bench ran"))
    for model in (("--model", "tiny"), ("--preset", "kimi-linear-48b")):
        code, _, err = run_cli(capsys, "bench", *model, "--peer", "transformers", "--peer-layers", layers + 1,
                               "--json", tmp_path / "bench.json")
        assert_one_line_error(code, err, "--peer-layers", f"{layers + 1} is not in the range 1<=x<={layers}",
                              "(see `klconvert bench --help`)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, free, refused", [
    (("--peer-layers", "27"), 80 << 30, r"--peer-layers 27: transformers' bf16 model of 27 layers needs about "
                                        r"100\.71 GB, more than the 85\.90 GB cuda has free for this process; give "
                                        r"--peer-layers (2[0-6]) or fewer"),
    ((), 1 << 30, r"--peer transformers \(4 layers\): transformers' bf16 model of 4 layers needs about 15\.24 GB, "
                  r"more than the 1\.07 GB cuda has free for this process; drop --peer, or stop what else holds the "
                  r"GPU"),
], ids=["27-on-80-GiB", "4-on-1-GiB"])
def test_a_peer_that_does_not_fit_the_gpu_is_refused_before_anything_is_timed(tmp_path, monkeypatch, capsys, given,
                                                                               free, refused):
    """--peer-layers 27 (98 GB in bf16) passed its range check on an 80 GB card and failed only once the whole bench
    had run (h292): the timings lost, no --json written. Refused up front now, saying how many layers fit, or to stop
    what else holds the GPU where the whole card would hold the peer; a peer that fits goes on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_with_free(monkeypatch, free)
    monkeypatch.setattr(B, "random_quantized_weights", lambda *args, **kwargs: pytest.fail("weights were made"))
    monkeypatch.setattr(B, "bench", lambda *args, **kwargs: pytest.fail("the bench ran"))
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--no-check", "--peer", "transformers",
                           *given, "--json", tmp_path / "bench.json")
    line = assert_one_line_error(code, err)
    match = re.fullmatch(r"klconvert: error: " + refused, line)
    assert match, line
    assert list(tmp_path.iterdir()) == []
    if given:   # the layers it names fit, one more does not
        fit = int(match[1])
        room = 80 << 30
        assert B.peer_bytes(preset_config("kimi-linear-48b", fit), 128) <= room
        assert B.peer_bytes(preset_config("kimi-linear-48b", fit + 1), 128) > room
        B.refuse_a_peer_that_does_not_fit(lambda n: preset_config("kimi-linear-48b", n), fit, "--peer-layers", 128)


def test_a_peer_of_one_layer_that_does_not_fit_is_said_in_the_singular(tmp_path, monkeypatch, capsys):
    """The refusal said "transformers' bf16 model of 1 layers" (h298's F5)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_with_free(monkeypatch, 1 << 20)
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--no-check", "--peer", "transformers",
                           "--peer-layers", "1", "--json", tmp_path / "bench.json")
    assert_one_line_error(code, err, "--peer-layers 1: transformers' bf16 model of 1 layer needs about ")


PEER_PEAK = """
import torch
from transformers import KimiLinearConfig, KimiLinearForCausalLM
from klconvert import bench as B
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
raw = {raw!r}
model = KimiLinearForCausalLM._from_config(KimiLinearConfig(**raw), dtype=torch.bfloat16).eval()
ids = torch.randint(0, raw["vocab_size"] - B.NUM_SPECIAL_TOKENS, (1, B.PEER_PROMPT_TOKENS))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
with torch.no_grad():
    model.generate(ids, max_new_tokens={new_tokens}, min_new_tokens={new_tokens}, do_sample=False)
print(sum(p.nbytes for p in model.parameters()) + status("VmHWM:") - before)
"""


@pytest.mark.slow
def test_the_peer_check_counts_what_the_peer_holds_running_its_prompt_through_plain_pytorch_kda():
    """peer_bytes counted the weights and an engine's plan, and transformers' plain-PyTorch KDA, which it runs
    without flash-linear-attention, allocated ~1.5 GB more for the prompt: the --peer-layers 23 the check offered on
    an H100 ran out of memory after the whole bench (h298's F1). Measured on the CPU, where transformers always runs
    it: the release's KDA heads on a tiny model, whose weights are a few MB."""
    pytest.importorskip("transformers.models.kimi_linear")
    raw = preset_config("tiny", 2)
    raw["linear_attn_config"] = {**raw["linear_attn_config"],
                                 **{key: preset_config("kimi-linear-48b", 2)["linear_attn_config"][key]
                                    for key in ("num_heads", "head_dim")}}
    run = subprocess.run([sys.executable, "-c", PEER_PEAK.format(raw=raw, new_tokens=16)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    peak = int(run.stdout)
    assert peak <= B.peer_bytes(raw, 16), f"the peer held {size_text(peak)}, counted {size_text(B.peer_bytes(raw, 16))}"


def test_no_check_skips_the_prefill_check_too_as_the_help_says(capsys, monkeypatch):
    """--prefill's help said each length is checked first, and --check's named the depth check alone; --no-check
    makes no calm weights, and the prefill check runs on them."""
    made, checked_on = [], []
    monkeypatch.setattr(B, "random_quantized_weights", lambda config, bits, device, calm=False: made.append(calm))
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: checked_on.append(kwargs["calm_weights"]) or
                        B.BenchResult("stand-in", 1, "int4", 1.0))
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--layers", "1", "--prefill", "1024",
                           "--no-check")
    assert code == 0, err
    assert made == [False] and checked_on == [None]
    helps = {param.name: " ".join(param.help.split()) for param in cli.commands["bench"].params}
    assert helps["prefills"].endswith("checked first against prefill + one decode step (calm weights) unless "
                                      "--no-check.")
    assert "a prefill against prefill + one decode step" in helps["check_depth"]
    assert "--no-check skips both" in helps["check_depth"]


def test_a_peer_without_transformers_is_refused_before_anything_is_timed(tmp_path, monkeypatch, capsys):
    """It was asked for only after the whole bench had run: the timings were lost and no --json written."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(B, "random_quantized_weights", lambda *args, **kwargs: pytest.fail("weights were made"))
    monkeypatch.setattr(B, "bench", lambda *args, **kwargs: pytest.fail("the bench ran"))
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--peer", "transformers", "--json",
                           tmp_path / "bench.json")
    assert_one_line_error(code, err, "--peer transformers needs transformers with Kimi Linear support",
                          "pip install 'klconvert[test]'")
    assert list(tmp_path.iterdir()) == []


def test_the_peer_is_timed_in_bf16_after_a_512_token_prompt_until_two_timings_agree_within_5_percent(monkeypatch):
    """README: the peer runs in bf16 after a 512-token prompt, the same new tokens, warmed until two timings agree
    within 5%. transformers' model stands in (a fake whose decode takes the ms below, on a clock the test sets)."""
    import types

    per_token_ms = iter([12.0, 10.0, 9.4, 9.35, 1.0])   # 10 -> 9.4 is 6% apart; 9.4 -> 9.35 within 5%: 4 rounds
    clock, seen = [0.0], []

    class Model:
        @classmethod
        def _from_config(cls, config, dtype):   # made in bf16, not made in fp32 and cast: twice the bytes (h295)
            seen.append(("config", config.fields))
            seen.append(("dtype", dtype))
            return cls()

        def eval(self):
            return self

        def generate(self, ids, max_new_tokens, min_new_tokens, do_sample):
            seen.append(("generate", tuple(ids.shape), max_new_tokens, min_new_tokens, do_sample))
            clock[0] += 0.05 + (0 if max_new_tokens == 1 else (max_new_tokens - 1) * next(per_token_ms) / 1e3)

    class Config:
        def __init__(self, **fields):
            self.fields = fields

    fake = types.ModuleType("transformers")
    fake.KimiLinearConfig, fake.KimiLinearForCausalLM = Config, Model
    monkeypatch.setitem(sys.modules, "transformers", fake)
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *args, device=None, **kwargs: randint(*args, **kwargs))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(B, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    raw, lines = preset_config("tiny", 2), []
    result = B.time_transformers(raw, new_tokens=32, report=lines.append)
    assert result["ms_per_token"] == pytest.approx(9.35) and result["warmup_ms"] == pytest.approx([12, 10, 9.4, 9.35])
    assert (result["prompt_tokens"], result["new_tokens"], result["layers"]) == (512, 32, 2)
    assert seen[:2] == [("config", raw), ("dtype", torch.bfloat16)]
    assert seen[2:] == [("generate", (1, 512), n, n, False) for _ in range(4) for n in (32, 1)]
    assert len(lines) == 1 and "9.35 ms/token" in lines[0]


@pytest.mark.parametrize("context", [1, 3, 4, 4096])
def test_the_graph_check_decodes_at_positions_inside_the_cache(context):
    """The check's steps ran from context - 4: `--context 1` wrote the MLA cache at position -3 on the GPU. A stand-in
    step records the positions each eager and graph step runs at (no GPU here to capture a graph)."""
    class Step:
        graph = object()
        positions = torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, dtype=torch.long)
        seen: list[int] = []

        def eager(self):
            self.seen.append(int(self.positions))
            return self.positions.clone()

        step = eager

    class State:
        kda_state, conv_state = torch.zeros(2), torch.zeros(2)

    step = Step()
    engine = type("Engine", (), {"decoder": lambda self, batch: step, "state": State(),
                                 "config": type("Config", (), {"vocab_size": 8})(), "device": "cpu"})()
    B.check_graph_matches_eager(engine, 1, context)
    first = max(context - B.GRAPH_CHECK_STEPS, 0)
    assert step.seen == [*range(first, first + B.GRAPH_CHECK_STEPS)] * 2


def test_the_graph_check_keeps_the_state_it_overwrites_on_the_host():
    """The check saved the KDA state and conv tails by a clone on their device: 640 MiB more at the 48B preset's
    batch 16, which the row's peak reserved counted as the runtime's (0.47 GiB over the plan on an H100). A stand-in
    state records where each saved copy went and that the state got it back."""
    class Held:
        def __init__(self):
            self.saved_to, self.restored_from = [], []

        def clone(self):
            raise AssertionError("the check cloned the state on its device")

        def to(self, device, copy=False):
            self.saved_to.append((device, copy))
            return ("saved", id(self))

        def copy_(self, source):
            self.restored_from.append(source)

    class Step:
        graph = object()
        positions = torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, dtype=torch.long)

        def eager(self):
            return self.positions.clone()

        step = eager

    class State:
        kda_state, conv_state = Held(), Held()

    engine = type("Engine", (), {"decoder": lambda self, batch: Step(), "state": State(),
                                 "config": type("Config", (), {"vocab_size": 8})(), "device": "cpu"})()
    B.check_graph_matches_eager(engine, 1, 8)
    for held in (State.kda_state, State.conv_state):
        assert held.saved_to == [("cpu", True)]
        assert held.restored_from == [("saved", id(held))] * 3        # before each of the two runs, and after


@pytest.mark.parametrize("gib, total, advice", [(80, 141, ", or stop what else holds the GPU"), (80, 80, ""),
                                                 (141, 141, None)], ids=["card", "whole-card", "fits"])
def test_a_depth_check_whose_reference_does_not_fit_the_gpu_says_so(monkeypatch, gib, total, advice):
    """The PyTorch path the check compares against holds the 48B preset's weights dequantized (98 GB in bf16): on an
    80 GB card the Engine refused it as "the weights alone do not fit: use a quantized model (klconvert quantize
    --bits 4)", for a bench of a quantized preset. Now the refusal names --check and what to do, and to stop what
    else holds the GPU where the whole card would hold the reference, as the Engine's refusals do (it never said
    so); a card that holds it (`advice` None) goes on."""
    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
    gpu_with_free(monkeypatch, gib * 2**30, total=total * 2**30)
    if advice is None:
        B._refuse_a_reference_that_does_not_fit(config, torch.device("cuda"), 80)
        return
    with pytest.raises(KLError, match=r"^--check compares against the PyTorch path, whose weights are dequantized to "
                                      r"bfloat16 \(9\d\.\d\d GB at 27 layers\), more than the 85\.90 GB cuda has free "
                                      r"for this process; pass --no-check \(the CUDA graph is still checked against "
                                      rf"the eager step\){re.escape(advice)}$"):   # the API: its config sets layers
        B._refuse_a_reference_that_does_not_fit(config, torch.device("cuda"), 80)


FREE_THE_CARD = ", or stop what else holds the GPU"   # where the whole card (80 GB) holds the reference


@pytest.mark.parametrize("timing, timed, fewer", [
    (("--model", "tiny"), "8 layers", FREE_THE_CARD),
    (("--preset", "kimi-linear-48b"), "27 layers", ", or time fewer --layers of a --preset"),   # 98 GB
    (("--preset", "kimi-linear-48b", "--layers", "2"), "2 layers",
     ", or time fewer --layers of a --preset" + FREE_THE_CARD),
    (("--preset", "kimi-linear-48b", "--layers", "1"), "1 layer", FREE_THE_CARD),
], ids=["model", "preset", "preset-2", "preset-1"])
def test_a_depth_check_that_does_not_fit_offers_fewer_layers_only_where_bench_has_them(monkeypatch, capsys, timing,
                                                                                       timed, fewer):
    """The refusal offered "time fewer layers (--preset ... --layers N)" to a --model folder of more than one layer,
    whose config.json sets its layers (h233's leftover), as it had to a --preset of one: the command words it with
    its own ways to fewer weights, fewer --layers only of a --preset of more than one, then to stop what else holds
    the GPU where the whole card would hold the reference."""
    gpu_with_free(monkeypatch, 1 << 20)
    monkeypatch.setattr(B, "bench", lambda config, weights, **kwargs: B._refuse_a_reference_that_does_not_fit(
        config, torch.device("cuda"), 80))   # what the depth check refuses, before anything reaches the GPU
    code, _, err = run_cli(capsys, "bench", *timing)
    line = assert_one_line_error(code, err)
    assert re.fullmatch(r"klconvert: error: --check compares against the PyTorch path, whose weights are dequantized "
                        rf"to bfloat16 \([\d.]+ [MG]B at {timed}\), more than the 1\.05 MB cuda has free for this "
                        r"process; pass --no-check \(the CUDA graph is still checked against the eager step\)"
                        + re.escape(fewer), line), line


class BoundTheWeights(Exception):
    """What a stand-in for binding the weights raises: the plan before it passed."""


def _binding(*args, **kwargs):
    raise BoundTheWeights


def _a_gpu_with_free(monkeypatch, free: int, total: int = 80 << 30) -> None:
    """A CUDA GPU as bench sees one, with `free` bytes of its `total` left (gpu_with_free), on a machine without: an
    engine's plan is checked against it before any weight is read onto it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(B, "copy_bandwidth", lambda *args, **kwargs: 1e12)
    gpu_with_free(monkeypatch, free, total)


NOT_FREE = 40 << 20   # free on a GPU: the tiny model's weights fit, with a context of some hundred tokens


def _refused_line(code: int, err: str, timed: str = "8 layers, tiny") -> str:
    """bench's refusal on the command line: exit status 2, no traceback, and one line after the GPU's it reports
    first (with what it times, `timed`)."""
    assert code == 2 and "Traceback" not in err, err
    *before, line = shown_lines(err)
    assert before == [f"a GPU: copy 1000 GB/s; {timed}"], err
    return line


@pytest.mark.parametrize("total, advice", [(80 << 30, ", or stop what else holds the GPU"), (NOT_FREE, "")],
                         ids=["card", "whole-card"])
@pytest.mark.parametrize("flag", ["--context", "--prefill"])
def test_a_row_past_the_gpu_names_benchs_own_flag_and_a_value_of_it_that_fits(monkeypatch, capsys, flag, total,
                                                                              advice):
    """A row whose plan the GPU could not hold was told to "lower context (--max-context) to 704 or less": bench has
    no --max-context, and a decode row plans its --new-tokens and spare cache rows past its --context, so 704 was no
    --context that fitted. The line names the row's own flag, and the value it names passes the plan; and to stop
    what else holds the GPU where the whole card would hold the row asked, which it never said."""
    _a_gpu_with_free(monkeypatch, NOT_FREE, total)
    code, _, err = run_cli(capsys, "bench", "--model", "tiny", "--no-check", flag, "100000")
    line = _refused_line(code, err)
    said = re.fullmatch(rf"klconvert: error: the plan needs [\d.]+ [MG]B but cuda has {re.escape(size_text(NOT_FREE))}"
                        rf" free for this process; lower {flag} to (\d+) or less" + re.escape(advice), line)
    assert said, line
    monkeypatch.setattr(engine_module, "bind", _binding)
    with pytest.raises(BoundTheWeights):
        run_cli(capsys, "bench", "--model", "tiny", "--no-check", flag, said.group(1))


def test_a_decode_row_whose_new_tokens_leave_no_context_that_fits_names_them(monkeypatch, capsys):
    """The context that fits is under what a decode row plans past its --context: no --context to name."""
    _a_gpu_with_free(monkeypatch, NOT_FREE)
    code, _, err = run_cli(capsys, "bench", "--model", "tiny", "--no-check", "--context", "100000", "--new-tokens",
                           "2000")
    line = _refused_line(code, err)
    assert re.fullmatch(rf"klconvert: error: the plan needs [\d.]+ [MG]B but cuda has {re.escape(size_text(NOT_FREE))}"
                        r" free for this process; at most \d+ tokens of context fit, and a decode row plans 2,016 past "
                        r"its --context \(--new-tokens and 16 spare cache rows\): lower --new-tokens or --batch, or "
                        r"stop what else holds the GPU", line), line


@pytest.mark.parametrize("total, advice", [(80 << 30, ", or stop what else holds the GPU"), (NOT_FREE, "")],
                         ids=["card", "whole-card"])
def test_a_batch_no_context_fits_on_the_gpu_names_benchs_batch(monkeypatch, capsys, total, advice):
    """bench's line where its plan does not fit at any context, from the command line: its own --batch; and to stop
    what else holds the GPU where the whole card would hold the batch, which it never said (h228's F7)."""
    _a_gpu_with_free(monkeypatch, NOT_FREE, total)
    code, _, err = run_cli(capsys, "bench", "--model", "tiny", "--no-check", "--context", "64", "--batch", "4096")
    line = _refused_line(code, err)
    assert re.fullmatch(rf"klconvert: error: the plan needs [\d.]+ [MG]B but cuda has {re.escape(size_text(NOT_FREE))}"
                        r" free for this process; no context fits a batch of 4096: lower --batch" + re.escape(advice),
                        line), line


BENCH_FEWER_BITS = "time fewer bits (--bits 4 with --preset; a --model folder of klconvert quantize --bits 4)"


@pytest.mark.parametrize("timing, timed, total, advice", [
    (("--model", "tiny"), "8 layers, tiny", 80 << 30, BENCH_FEWER_BITS + ", or stop what else holds the GPU"),   # bf16
    (("--preset", "kimi-linear-48b", "--layers", "2", "--bits", "8"), "2 layers, int8 g128, lm_head int8", 80 << 30,
     "time fewer --layers of a --preset, or " + BENCH_FEWER_BITS + ", or stop what else holds the GPU"),
    (("--preset", "kimi-linear-48b", "--layers", "2"), "2 layers, int4 g128, lm_head int8", 80 << 30,
     "time fewer --layers of a --preset, or stop what else holds the GPU"),   # 4 bits already, but lm_head
    (("--preset", "kimi-linear-48b", "--layers", "1", "--bits", "8"), "1 layer, int8 g128, lm_head int8", 80 << 30,
     BENCH_FEWER_BITS + ", or stop what else holds the GPU"),
    (("--preset", "kimi-linear-48b", "--layers", "1"), "1 layer, int4 g128, lm_head int8", 80 << 30,
     "stop what else holds the GPU"),
    (("--preset", "kimi-linear-48b", "--layers", "1"), "1 layer, int4 g128, lm_head int8", 1 << 20,
     "this device cannot hold this model"),   # the whole card is what is free
], ids=["model-bf16", "preset-2-int8", "preset-2-int4", "preset-1-int8", "preset-1-int4", "preset-1-whole-card"])
def test_weights_alone_past_the_gpu_name_their_size_and_benchs_ways_to_fewer(monkeypatch, capsys, timing, timed,
                                                                              total, advice):
    """bench's line where the weights timed are alone past the GPU said "use a quantized model (klconvert quantize
    --bits 4)", to a --preset too, whose weights are quantized already, at 4 bits or not: it names the weights' size,
    and fewer bits only where they would hold less. It told a --model, and a --preset of one layer -- even as all it
    said on a card too small for that layer -- to "time fewer --layers of a --preset" (h228's F5): --layers cuts only
    a --preset, to one layer at the least; it says so only to a --preset of more."""
    _a_gpu_with_free(monkeypatch, 1 << 20, total)
    code, _, err = run_cli(capsys, "bench", *timing, "--no-check")
    line = _refused_line(code, err, timed)
    assert re.fullmatch(rf"klconvert: error: the plan needs [\d.]+ [MG]B but cuda has {re.escape(size_text(1 << 20))}"
                        r" free for this process; the weights alone need [\d.]+ [MG]B: " + re.escape(advice),
                        line), line
