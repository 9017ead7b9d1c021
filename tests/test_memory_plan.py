"""Memory-plan arithmetic against hand-computed figures for the real 48B config, and the plan's refusals."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import klconvert
from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.presets import preset_config
from klconvert.quant import Entry, Group, QuantScheme, compress_nf4, compress_weight, policy_from_options
from klconvert.quant.group_rules import CHANNEL
from klconvert.quant.stored import (
    NF4_PARTS,
    NF4_REQUIRED,
    NF4_STATE,
    PACKED_PARTS,
    PACKED_REQUIRED,
    nf4_parts,
    packed_parts,
    stored_parts,
)
from klconvert.runtime.memory_plan import MemoryPlan, stored_bytes, weight_bytes
from klconvert.runtime.plan_report import held_as_written, plan_for, render_plan
from testkit import assert_one_line_error, run_cli

REAL = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))


def test_name_table_matches_the_released_model():
    specs = expected_tensors(REAL)
    assert len(specs) == 20_493
    params = 0
    for s in specs.values():
        n = 1
        for d in s.shape:
            n *= d
        params += n
    assert params == 49_122_681_728
    assert REAL.full_attn_layers == (3, 7, 11, 15, 19, 23, 26)  # 1-indexed [4, 8, ..., 27] in config.json
    assert len(REAL.kda_layers) == 20


def test_state_and_cache_figures():
    p = MemoryPlan(REAL, batch=1, context=1 << 20, weight_bytes={})
    assert p.mla_bytes_per_token == 8064                      # 7 layers x 576 values x 2 bytes
    assert p.kda_state_bytes_per_seq == 41_943_040            # 20 x 32 x 128 x 128 x 4 = 41.9 MB
    assert p.conv_bytes_per_seq == 20 * 3 * 4096 * 3 * 2      # tails of the last 3 inputs, bf16
    assert p.mla_cache_bytes == 8064 * (1 << 20)              # about 8.5 GB at 1M tokens
    assert round(p.mla_cache_bytes / 1e9, 1) == 8.5
    p4 = MemoryPlan(REAL, batch=4, context=1000, weight_bytes={})
    assert p4.state_bytes == 4 * (41_943_040 + 20 * 3 * 4096 * 3 * 2)
    assert p4.mla_cache_bytes == 4 * 1000 * 8064


def test_weight_bytes_bf16_and_int4():
    bf16 = weight_bytes(REAL, torch.bfloat16)
    assert bf16["experts"] == 26 * 256 * 3 * 1024 * 2304 * 2
    assert bf16["lm_head"] == bf16["embedding"] == 163840 * 2304 * 2
    assert bf16["router"] == 26 * (256 * 2304 + 256) * 4      # held in fp32
    # the KDA layers' q/k/v/o and the MLA layers' q, kv_a, kv_b and o projections; the KDA convs are kda_small's
    assert bf16["attention"] == (20 * 4 * 4096 * 2304 + 7 * (6144 * 2304 + 576 * 2304 + 8192 * 512 + 2304 * 4096)) * 2
    w4 = weight_bytes(REAL, torch.bfloat16, policy_from_options(bits=4, group_size=128))
    n_exp = 26 * 256 * 3 * 1024 * 2304
    assert w4["experts"] == n_exp // 2 + n_exp // 128 * 2      # packed nibbles + one bf16 scale per group
    assert w4["lm_head"] == 163840 * 2304 + 163840 * 2304 // 128 * 2  # lm_head at 8 bits
    assert w4["embedding"] == bf16["embedding"]               # kept as is


def test_each_shared_projection_is_as_wide_as_the_shared_experts():
    """A config of two shared experts (config.json may say up to 64) holds each shared projection over 2 x 1,024
    intermediate rows, as transformers (KimiLinearMoE) and the runtime build them: the name table's shapes
    are what a folder is held to and what the plan sizes."""
    two = dataclasses.replace(REAL, num_shared_experts=2)
    assert weight_bytes(two, torch.bfloat16)["shared_experts"] == 26 * 3 * 2 * 1024 * 2304 * 2
    shared = "model.layers.1.block_sparse_moe.shared_experts"
    assert [expected_tensors(two)[f"{shared}.{p}_proj.weight"].shape for p in ("gate", "up", "down")] == \
        [(2048, 2304), (2048, 2304), (2304, 2048)]


def test_largest_context_fits_and_one_more_chunk_does_not():
    p = plan_for(preset="kimi-linear-48b", bits=4, memory_limit=32 * 2**30, context=131072)
    n = p.largest_context()
    assert n > 131072
    assert p.total_for(n) <= 32 * 2**30 < p.total_for(n + 64)
    assert p.headroom > 0
    roomy = plan_for(preset="kimi-linear-48b", bits=4, memory_limit=141 * 2**30)
    assert roomy.largest_context() == REAL.model_max_length  # capped at the model's own limit
    bf16 = plan_for(preset="kimi-linear-48b", memory_limit=80 * 2**30)
    assert bf16.headroom < 0 and bf16.largest_context() == 0  # 98 GB of bf16 weights do not fit 80 GiB


def test_largest_context_under_64_where_no_multiple_of_64_fits():
    """A batch large enough that no multiple of 64 fits got 0 from largest_context, and a refusal then named a
    context of 1 (the least the call needed) where 40 fitted: the largest context under 64 that fits is named."""
    p = plan_for(preset="kimi-linear-48b", bits=4, batch=64, context=64)
    tight = dataclasses.replace(p, memory_limit=p.total_for(40))
    assert tight.total_for(41) > tight.memory_limit and tight.largest_context() == 40
    assert dataclasses.replace(p, memory_limit=p.total_for(1) - 1).largest_context() == 0


def test_workspace_at_short_contexts_and_with_an_e4m3_cache():
    """The prefill workspace by hand for the 48B, batch 1, bf16 activations (h169's mutation testing: every pinned
    figure was at a long context, where MLA's term is the largest; KDA's, the chunk's and MLA's key block at short
    ones, and the e4m3 rows' scales, could change unseen). Segment S = min(16384, context), key block min(32768,
    context), KDA chunk C = min(64, S); the largest of KDA's, the MLP's and MLA's terms, plus 6 hidden rows: the
    blocks'; with generate's last logits, or, in a plan that holds all_logits, forward_segments' logits min(256, S) rows
    at a time, where more than the blocks', with those it handed on (min(256, S) rows, fp32). A plan for generate alone
    (plan_for's, run's) counts no all-position logits: it never makes them."""
    hidden = lambda S: S * 2304 * 2 * 6
    kda = lambda S, C: S * 4096 * (3 * 2 + 6 * 4) + 32 * max(2 * C * C, C * C + 4 * 128) * 128 * 4
    mla = lambda S, block, row: block * 576 * row + block * 32 * (256 + 192) * 2 + S * 32 * (192 * 2 + 128 * 18)
    logits = lambda S: S * 2304 * 2 + min(256, S) * 163840 * (2 + 4)   # last hidden rows; bf16, then fp32
    prefill = lambda S, blocks: blocks + 2 * 163840 * 4
    every_position = lambda S, blocks: max(prefill(S, blocks), max(blocks, logits(S)) + min(256, S) * 163840 * 4)
    want = {  # context: (cache, segment, the blocks' temporaries)
        4: ("bfloat16", 4, hidden(4) + kda(4, 4)),       # C^2 + 4K > 2 C^2: the four states
        16: ("bfloat16", 16, hidden(16) + kda(16, 16)),
        4096: ("bfloat16", 4096, hidden(4096) + kda(4096, 64)),  # KDA's term the largest, MLA's 452 MiB
        131072: ("float8_e4m3fn", 16384, hidden(16384) + mla(16384, 32768, 2 + 4)),   # fp32 row scales
    }
    for context, (cache, S, blocks) in want.items():
        p = plan_for(preset="kimi-linear-48b", bits=4, context=context, mla_cache_dtype=cache)
        assert p.prefill_workspace_for(context) == prefill(S, blocks), context
        assert p.workspace == prefill(S, blocks) + decode_workspace(1)
        every = dataclasses.replace(p, all_logits=True)
        assert every.prefill_workspace_for(context) == every_position(S, blocks), context


def decode_workspace(batch: int) -> int:
    """A decode step's temporaries by hand for the 48B in bf16, the Triton path's: 6 hidden rows, the KDA step's
    projections, fp32 q/k/v/gate and one fp32 state [H, K, V] a sequence (more than MLA's absorbed q, q_lat, o_lat,
    o and the MLP's rows), the logits in bf16 and in fp32, and the fp32 copy the graph-captured step keeps outside
    its graph's pool."""
    kda = 4096 * (3 * 2 + 6 * 4) + 32 * 128 * 128 * 4
    assert kda > max(32 * (128 + 64 + 2 * 512 + 128) * 2, max(2 * 9216, 2 * 1024 * 8) * 2)
    return batch * (2304 * 2 * 6 + kda + 163840 * (2 + 4 + 4))


def test_a_batch_plans_one_prompts_prefill_and_the_batchs_decode_step():
    """Engine prefills a batch's prompts one at a time, so a batch's workspace is one prompt's prefill segment (and
    each prompt's last logits, fp32, kept and joined) and a decode step of the batch: it was B times the prefill's,
    and `klconvert plan --recipe 32gb --batch 16 --max-context 8192` said 46.99 GiB, no fit, for what is 27.95 GiB
    (generate's: a plan holding every position's logits, all_logits, counts more, as the test below shows)."""
    one = plan_for(preset="kimi-linear-48b", recipe="32gb", batch=1, context=8192)
    sixteen = plan_for(preset="kimi-linear-48b", recipe="32gb", batch=16, context=8192)
    # the prompts' last logits, kept and joined: 2 rows of fp32 logits a prompt
    prefill = one.prefill_workspace_for(8192)
    assert sixteen.prefill_workspace_for(8192) == prefill + 2 * 15 * 163840 * 4
    assert sixteen.workspace == sixteen.prefill_workspace_for(8192) + decode_workspace(16)
    assert f"{sixteen.total / 2**30:.2f}" == "27.95" and sixteen.headroom > 0


def test_a_batch_holds_each_prompts_last_hidden_rows():
    """forward_segments holds every prompt's last hidden rows of a segment, [B, S, hidden], from the first prompt's
    blocks until the segment's logits are made (75 MB a prompt at the release's 16K segment), where the plan counted
    one prompt's: beside the later prompts' blocks, or beside the logits, whichever is more. By hand for the 48B at a
    segment of 8,192, bf16: 256 rows of logits in bf16 and fp32 made, 256 fp32 handed on."""
    one = plan_for(preset="kimi-linear-48b", recipe="32gb", batch=1, context=8192)
    blocks = one.prefill_workspace_for(8192) - 2 * 163840 * 4   # generate's, less the prompt's last logits
    rows, logits = 8192 * 2304 * 2, 256 * 163840
    assert rows == 37_748_736
    for batch in (1, 4, 64):
        p = dataclasses.replace(one, batch=batch, all_logits=True)
        beside_blocks = batch * rows if batch > 1 else 0   # one prompt's are the blocks' own output
        want = max(blocks + 2 * batch * 163840 * 4, max(blocks + beside_blocks, batch * rows + logits * (2 + 4))
                   + logits * 4)
        assert p.prefill_workspace_for(8192) == want, batch
    four = dataclasses.replace(one, batch=4, all_logits=True)
    assert four.prefill_workspace_for(8192) - dataclasses.replace(one, all_logits=True).prefill_workspace_for(8192) \
        == 4 * rows


def test_the_pytorch_decode_attention_plans_its_scores_over_the_context():
    """The PyTorch path's latent attention (the CPU's) makes fp32 scores over every cached row of each sequence; the
    Triton kernel's per-split partials are a few MB at any context."""
    context = 1 << 20
    triton = MemoryPlan(REAL, batch=4, context=context, weight_bytes={})
    torch_path = dataclasses.replace(triton, torch_decode_attention=True)
    assert triton.decode_workspace_for(context) == decode_workspace(4)
    assert torch_path.decode_workspace_for(context) == \
        4 * (2304 * 2 * 6 + 32 * (128 + 64 + 2 * 512 + 128) * 2 + context * 32 * (3 * 4 + 2) + 163840 * (2 + 4))


def test_group_size_sizes_the_groups_of_bits_or_is_refused(capsys):
    """--group-size without --bits 4|8 (or beside a recipe) was ignored: the plan read as if it applied."""
    g32, g128 = (plan_for(preset="kimi-linear-48b", bits=4, group_size=g).weights for g in (32, None))
    assert g32 > 3 * g128  # dequantized to bf16: the kernels keep only groups of 128 (or a multiple) packed
    assert g128 == plan_for(preset="kimi-linear-48b", bits=4, group_size=128).weights
    for extra in ([], ["--bits", "16"]):
        code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--group-size", "32", *extra)
        assert_one_line_error(code, err, "--group-size 32", "add --bits 4 or 8, or drop --group-size")
    # beside a recipe, not "add --bits", which the recipe's own refusal then refused (h319)
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--group-size", "32", "--recipe",
                           str(Path(__file__).parents[1] / "recipes" / "32gb.yaml"))
    assert_one_line_error(code, err, "give a recipe or --group-size, not both")


def test_a_group_size_that_leaves_partial_groups_is_refused_saying_the_sizes_that_plan(capsys):
    """--group-size 1024 was told to "use a group size that divides 2304 or leave this tensor out of the recipe's
    targets", and 2304 then to use one that divides 4096 -- no recipe was given; 100 was refused without naming
    --group-size. Each line now names the flag, and the sizes it offers plan."""
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--bits", "4", "--group-size", "100")
    assert_one_line_error(code, err, ": --group-size 100 is not a positive multiple of 8 (or -1 for per-channel); use "
                                     "--group-size 32, 64 or 128")
    for size, in_dim, tensor in (("1024", 2304, "q_proj.weight [4096, 2304]"),
                                 ("2304", 4096, "o_proj.weight [2304, 4096]")):
        code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", "--group-size", size)
        assert_one_line_error(code, err, f": --group-size {size} does not divide {in_dim}, the input dim of "
                                         f"model.layers.0.self_attn.{tensor}; use --group-size 256, the largest that "
                                         "divides the input dim of every weight the flags quantize, or a smaller one "
                                         "that does: 32, 64 or 128")
    for size in ("256", "32", "64", "128"):
        code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", "--group-size", size)
        assert code == 0, err


def test_a_checked_policy_answers_for_the_tensors_it_was_checked_against_without_matching_them_again(monkeypatch):
    """A plan at --bits matched every tensor name against the policy twice, to check the policy and again to size each
    weight (held_as_written's scheme_for): about a quarter of `klconvert plan --bits 4` for the 48B. check_against's
    result keeps the scheme it found for each tensor; scheme_for answers those from it -- the schemes a policy that
    matches them anew finds."""
    from klconvert.quant import Policy

    specs = expected_tensors(KimiLinearConfig.from_dict(preset_config("tiny")))
    checked = policy_from_options(bits=4, group_size=32).check_against((s.name, s.shape) for s in specs.values())
    anew = dataclasses.replace(checked)   # the same groups and ignore list, nothing found yet
    want = {name: anew.scheme_for(name, spec.shape) for name, spec in specs.items()}
    assert {s.bits for s in want.values() if s is not None} == {4, 8} and None in want.values()
    monkeypatch.setattr(Policy, "_resolve", lambda *_: pytest.fail("a checked tensor was matched again"))
    assert {name: checked.scheme_for(name, list(spec.shape)) for name, spec in specs.items()} == want


@pytest.mark.parametrize("group_size", [64, 128])
def test_a_policy_is_planned_as_the_folder_it_writes_is_held(tmp_path, group_size):
    """--bits planned the policy's stored bytes, where the runtime on a GPU dequantizes what the Triton kernels do
    not take (groups of 64; MLA's kv_b_proj always): the 48B at --group-size 64 planned 25.1 GiB and would hold
    91.5. Now the same bytes as `plan --model` of the folder that policy writes."""
    from klconvert.models import bundled_dir
    from klconvert.quantize import quantize

    folder = quantize(bundled_dir(), tmp_path / "q", bits=4, group_size=group_size, progress=False).path
    from_folder = plan_for(model=folder).weight_bytes
    assert plan_for(model=bundled_dir(), bits=4, group_size=group_size).weight_bytes == from_folder
    bf16 = weight_bytes(KimiLinearConfig.from_file(folder / "config.json"), torch.bfloat16)
    assert (from_folder["experts"] == bf16["experts"]) == (group_size == 64)
    assert plan_for(model=folder, bits=16).weight_bytes == bf16    # --bits 16: unquantized (was: as stored)


def test_a_layers_experts_are_planned_packed_only_all_alike_and_of_widths_the_kernels_take():
    """What stays packed (bind.packed_choice, which the plan and the Triton path both take): a layer's routed experts
    only all at one scheme -- expert 0 at int8 beside int4 ones dequantizes the layer's stack --, and only where the
    kernels' 128-wide tile divides both their widths (moe_intermediate_size 1,088 per-channel does not)."""
    int4 = policy_from_options(bits=4, group_size=128)
    expert_0 = Group("expert_0", (Entry(r"re:.*\.experts\.0\.w[123]$"),), QuantScheme(8, 128, True))
    held = held_as_written(REAL, dataclasses.replace(int4, groups=(expert_0, *int4.groups))).schemes
    assert held["model.layers.1.self_attn.q_proj.weight"] == QuantScheme(4, 128, True)
    assert not [name for name in held if ".experts." in name]
    narrow = dataclasses.replace(REAL, moe_intermediate_size=1088)
    held = held_as_written(narrow, policy_from_options(bits=4, group_size=CHANNEL)).schemes
    assert "model.layers.1.block_sparse_moe.shared_experts.up_proj.weight" in held
    assert not [name for name in held if ".experts." in name]


def test_render_plan_lists_every_part():
    text = render_plan(plan_for(preset="kimi-linear-48b", bits=4, memory_limit=24 * 2**30, context=8192), "x")
    for needle in ("weights: experts", "KDA recurrent state / sequence", "41.9 MB", "MLA latent cache / token",
                   "8,064 B", "workspace", "headroom", "largest context that fits"):
        assert needle in text


def test_a_plan_of_one_token_says_one(capsys, one_token_model):
    """The plan's lines said "@ 1 tokens", "fits 1 tokens" and "plan for 1 tokens or fewer" (units.counted)."""
    p = plan_for(preset="tiny", context=1)
    text = render_plan(dataclasses.replace(p, memory_limit=p.total_for(1)), "x")
    assert "MLA latent cache @ 1 token x 1 " in text, text
    assert text.splitlines()[-1].split() == ["largest", "context", "that", "fits", "1", "token"], text
    assert_one_line_error(*run_cli(capsys, "plan", "--model", one_token_model, "--max-context", "2")[::2],
                          "--max-context 2 is over the model's model_max_length 1; plan for 1 token or fewer")


def test_a_prompt_of_one_token_over_the_plan_is_said_as_one(one_token_model):
    """Engine.check_fits said "the prompt (1 tokens)" and "of 1 tokens" (units.counted)."""
    with pytest.raises(klconvert.KLError, match=r"^the prompt \(1 token\) plus max_new_tokens=1 \(--max-new-tokens\) "
                                                r"needs a context of 2 tokens but the memory plan holds 1;"):
        klconvert.load("tiny", device="cpu", max_context=1).check_fits(1, 1)
    with pytest.raises(klconvert.KLError, match=r"^the prompt \(1 token\) plus max_new_tokens=1 \(--max-new-tokens\) "
                                                r"is over the model's model_max_length of 1 token;"):
        klconvert.load(one_token_model, device="cpu", max_context=1).check_fits(1, 1)


def test_prompt_over_the_plan_is_refused(tiny_released):
    engine = klconvert.load(tiny_released, device="cpu", max_context=32)
    with pytest.raises(klconvert.KLError, match=r"prompt \(30 tokens\).*max_new_tokens=8 \(--max-new-tokens\).*32.*"
                                                r"max_context \(--max-context\)"):
        engine.generate(torch.zeros(30, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(klconvert.KLError, match="--max-context"):
        engine.forward(torch.zeros(1, 33, dtype=torch.long))


def test_state_is_allocated_once(tiny_released):
    engine = klconvert.load(tiny_released, device="cpu", max_context=64)
    buffers = [engine.state.kda_state.data_ptr(), engine.state.conv_state.data_ptr(),
               engine.state.mla_cache.data_ptr()]
    engine.generate(torch.arange(10), max_new_tokens=20)
    engine.forward(torch.arange(40).view(1, 40))
    assert buffers == [engine.state.kda_state.data_ptr(), engine.state.conv_state.data_ptr(),
                       engine.state.mla_cache.data_ptr()]
    assert engine.state.mla_cache.shape[2] == 64


def test_a_batched_forward_and_prefill_run_within_the_plan_one_prompt_at_a_time(tiny_released, monkeypatch):
    """forward and prefill of [B, T] ran the B prompts through the model at once, B times the prefill workspace the
    plan now sizes: they run them one at a time, each segment, with the logits of each prompt alone."""
    engine = klconvert.load(tiny_released, device="cpu", max_context=64, batch=3)
    engine.prefill_segment = 16   # several segments: each prompt's state carries over between them
    ids = torch.randint(0, engine.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    alone = [engine.forward(row.view(1, -1)) for row in ids]
    rows = []
    run = engine.model.hidden_states
    monkeypatch.setattr(engine.model, "hidden_states",
                        lambda seg, *a, **k: rows.append(seg.shape[0]) or run(seg, *a, **k))
    assert torch.equal(engine.forward(ids), torch.cat(alone))
    torch.testing.assert_close(engine.prefill(ids), torch.cat(alone)[:, -1])   # lm_head over the last row alone
    assert rows == [1] * 2 * 3 * 3    # two calls x three segments x three prompts


def test_every_positions_logits_come_a_few_rows_at_a_time(tiny_released, monkeypatch):
    """forward_segments made a segment's logits at once, [B, S, vocab] fp32 (10.7 GB for one prompt's segment of the
    release), which no plan counted: it makes LOGIT_ROWS rows at a time, the positions of a batch's prompts together,
    and they are the logits forward gives whole."""
    from klconvert.runtime import engine as engine_module

    engine = klconvert.load(tiny_released, device="cpu", max_context=64, batch=2)
    engine.prefill_segment = 16   # 40 tokens: segments of 16, 16 and 8
    ids = torch.randint(0, engine.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    whole = engine.forward(ids)
    monkeypatch.setattr(engine_module, "LOGIT_ROWS", 12)    # 6 positions of each prompt
    rows = list(engine.forward_segments(ids))
    assert [r.shape[:2] for r in rows] == [(2, n) for n in (6, 6, 4, 6, 6, 4, 6, 2)]
    torch.testing.assert_close(torch.cat(rows, dim=1), whole, rtol=0, atol=0)


@pytest.mark.slow
def test_the_runtime_plans_the_release_without_synth():
    """The release's facts live in klconvert.release: planning the real model loads no synthetic-data code."""
    code = ("import sys\nfrom klconvert.runtime.plan_report import plan_for\nimport klconvert.runtime.engine\n"
            "assert plan_for(preset='kimi-linear-48b', bits=4).weights > 0\n"
            "print([m for m in sys.modules if m.startswith('klconvert.synth')])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("scheme, shape", [
    (QuantScheme(4, 128, True), (256, 384)), (QuantScheme(8, 32, False), (256, 384)),
    (QuantScheme(4, CHANNEL, False), (256, 384)), (QuantScheme(4, 64, True, "nf4"), (256, 384)),
    # no whole int32 words: 70 rows of zero points, 100 columns of codes (a row's scale takes any width)
    (QuantScheme(4, CHANNEL, False), (70, 100)), (QuantScheme(8, CHANNEL, False), (70, 100)),
    (QuantScheme(4, 64, True, "nf4"), (64, 96)),   # 96 blocks: one nested block, not a whole one
], ids=lambda v: v.describe() if isinstance(v, QuantScheme) else "x".join(map(str, v)))
def test_stored_parts_are_the_tensors_the_converter_writes(scheme, shape):
    """The plan sizes a weight, and the converter plans its output, from the parts quant.stored names: each is a
    tensor the converter makes, of that dtype and shape."""
    w = torch.randn(shape, dtype=torch.bfloat16)
    made = compress_nf4("m", w) if scheme.kind == "nf4" else compress_weight("m", w, scheme)
    on_device = {n: t for n, t in made.items() if not n.endswith(("weight_shape", NF4_STATE))}
    assert sum(t.nbytes for t in on_device.values()) == stored_bytes(shape, scheme, torch.bfloat16)
    assert {f"m.{p}": (dtype, size) for p, dtype, size in stored_parts(shape, torch.bfloat16, scheme)} == \
        {n: (t.dtype, tuple(t.shape)) for n, t in made.items() if not n.endswith(NF4_STATE)}


def test_the_part_tables_the_readers_use_are_the_parts_planned():
    """The names the readers look for and require (PACKED_*, NF4_*) are those of the parts the converter plans: all
    of them where a scheme writes all (zero points, double quantization), the required ones where it does not."""
    for symmetric in (True, False):
        planned = [p for p, _, _ in packed_parts((256, 384), torch.bfloat16, QuantScheme(4, 128, symmetric))]
        assert planned == list(PACKED_REQUIRED if symmetric else PACKED_PARTS)
    for nested_blocksize in (256, None):
        planned = [p for p, _, _ in nf4_parts((256, 384), nested_blocksize=nested_blocksize)] + [NF4_STATE]
        assert planned == list(NF4_PARTS if nested_blocksize else NF4_REQUIRED)


def test_plan_help_states_the_runtime_defaults_the_code_has():
    """The help restates the plan's defaults in words; they are defined once (RUNTIME_DEFAULTS), held to it here."""
    import click

    from klconvert.cli import cli
    from klconvert.runtime.plan_report import RUNTIME_DEFAULTS

    helps = {p.name: p.help for p in cli.commands["plan"].params if isinstance(p, click.Option)}
    for name, value in RUNTIME_DEFAULTS.items():
        assert f"[default: the recipe's, else {value}]" in helps[name], (name, helps[name])
