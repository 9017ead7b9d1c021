"""The bounds the README states are the code's: each phrase is built from the constant it names, so changing one
fails here until the README says the new figure (the behaviour tests shrink these constants to small values, so
they do not pin the real ones)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())   # a phrase may wrap across lines


def stated(phrase: str) -> None:
    assert phrase in README, f"README.md does not say {phrase!r}"


def as_written(bound: float) -> str:
    """A one-digit bound as the README writes it: 5e-2, 1e-6."""
    mantissa, exponent = f"{bound:.0e}".split("e")
    written = f"{mantissa}e{int(exponent)}"
    assert float(written) == bound, bound
    return written


def test_the_hub_bounds():
    from klconvert.hub import MAX_LISTED_FILES, MAX_PULLED_FILES
    from klconvert.hub_guard import (MAX_OTHER_ANSWERS, MAX_OTHER_BYTES, MAX_OTHER_SECONDS, SILENCE_SECONDS,
                                     SLOW_WINDOW_BYTES, SLOW_WINDOW_SECONDS)

    stated(f"at most {MAX_LISTED_FILES:,} files listed, {MAX_PULLED_FILES:,} pulled")
    stated(f"bounded at {MAX_OTHER_ANSWERS:,} and {MAX_OTHER_BYTES >> 20} MiB and at {MAX_OTHER_SECONDS} s together")
    stated(f"gives up after {SILENCE_SECONDS} s without a byte")
    stated(f"sent at under {SLOW_WINDOW_BYTES // SLOW_WINDOW_SECONDS:,} bytes a second over {SLOW_WINDOW_SECONDS} s")


def test_the_recipe_pattern_bounds():
    from klconvert.quant.policy import MAX_PATTERN_EXPANSION, REGEX_BUDGET_S

    stated(f"spell out at most {MAX_PATTERN_EXPANSION:,} items")
    stated(f"within {REGEX_BUDGET_S:g} s of CPU time")


def test_the_onnx_bounds():
    pytest.importorskip("onnxruntime")
    from klconvert.onnx.export import LOWEST_ONNXRUNTIME, LOWEST_ONNXRUNTIME_IR, PROTOBUF_LIMIT
    from klconvert.onnx.mla import KEY_BLOCK
    from klconvert.onnx.session import ARENA_SHARE, SCORE_BYTES

    stated(f"scores stay under {SCORE_BYTES >> 20} MiB a layer")
    stated(f"attends its cached latents {KEY_BLOCK:,} rows at a")
    stated(f"capped at {ARENA_SHARE:.0%} of what the host has available")
    stated(f"weights over {PROTOBUF_LIMIT >> 30} GB go to `model.onnx.data`")
    stated(f"onnxruntime {LOWEST_ONNXRUNTIME}, the lowest the `[onnx]` extra allows, loads -- IR "
           f"{LOWEST_ONNXRUNTIME_IR} at most")


def test_the_bench_new_tokens_bounds():
    from klconvert.cli import cli

    option = next(p for p in cli.commands["bench"].params if p.name == "new_tokens")
    stated(f"`--new-tokens N` (default {option.default}, at least {option.type.min})")


def test_the_eval_max_tokens_bounds():
    from klconvert.cli import cli

    option = next(p for p in cli.commands["eval"].params if p.name == "max_tokens")
    stated(f"cut the text to N tokens (default {option.default}, at least {option.type.min};")


def test_the_mse_observer_search():
    from klconvert.quant.groupwise import MSE_GRID, MSE_MAX_SHRINK, MSE_NORM

    trials = int(MSE_MAX_SHRINK * MSE_GRID)    # the search's loop: p = 1 - i / MSE_GRID for i < trials
    stated(f"in steps of {100 / MSE_GRID:g}%, down to {round(100 * (1 - (trials - 1) / MSE_GRID), 6):g}%")
    stated(f"the sum of its magnitudes to the power {MSE_NORM:g}) is least")
    stated(f"up to {trials} trial quantizations per weight")


def test_the_side_file_and_special_token_bounds():
    from klconvert.checkpoint.folder_files import MAX_SIDE_FILE_BYTES
    from klconvert.tokenizer import MAX_SPECIAL_TEXT_CHARS, MAX_SPECIAL_TOKEN_CHARS

    stated(f"side files copied into an output are bounded ({MAX_SIDE_FILE_BYTES / 2**20:g} MiB each), special "
           f"tokens' text by {MAX_SPECIAL_TOKEN_CHARS:,} characters each and {MAX_SPECIAL_TEXT_CHARS:,} in all")


def test_the_bench_prefill_check():
    from klconvert.bench import PREFILL_CHECK_BOUND, PREFILL_CHECK_TOKENS

    stated(f"checks a {PREFILL_CHECK_TOKENS:,}-token prefill's last logits")
    stated(f"refused past {as_written(PREFILL_CHECK_BOUND)} relative")


def _plan_default(name: str):
    from klconvert.runtime.plan_report import RUNTIME_DEFAULTS

    return RUNTIME_DEFAULTS[name]


def _opset_default():
    return pytest.importorskip("klconvert.onnx.export").DEFAULT_OPSET


def _group_size_default():
    from klconvert.quant.scheme import GROUP_SIZE

    return GROUP_SIZE


def _shard_gb_default():
    from klconvert.release import RELEASED_SHARD_BYTES

    return f"{RELEASED_SHARD_BYTES / 1e9:g}"


# (command, option, the README's phrase, what the command takes where the option's default is None)
DEFAULTS_IN_PROSE = [
    ("synth", "seed", "`--seed S` | seed of the random weights (default {})", None),
    ("run", "max_new_tokens", "`--max-new-tokens N` | default {} (0: only prefill the prompts)", None),
    ("plan", "max_context", "`--max-context N` (default {})", lambda: _plan_default("max_context")),
    ("plan", "batch", "`--batch B` (default {})", lambda: _plan_default("batch")),
    ("plan", "group_size", "(`-1`: one scale per row; default {})", _group_size_default),
    ("eval", "max_tokens", "cut the text to N tokens (default {}, at least", None),
    ("export-onnx", "opset", "(opset {} by default, up to the newest whose IR version onnxruntime", _opset_default),
    ("quantize", "max_shard_size", "shards holding at most `--max-shard-size` of tensor data ({} GB;",
     _shard_gb_default),
]


@pytest.mark.parametrize("command, name, phrase, unset", DEFAULTS_IN_PROSE,
                         ids=[f"{command} {name}" for command, name, _, _ in DEFAULTS_IN_PROSE])
def test_the_option_defaults_stated_in_prose(command, name, phrase, unset):
    """Each default the README states in words: the click option's own, or, where the option's is None, what the
    command then takes (`unset`: plan's RUNTIME_DEFAULTS and GROUP_SIZE, export's DEFAULT_OPSET, the release's
    shard size)."""
    from klconvert.cli import cli

    option = next(p for p in cli.commands[command].params if p.name == name)
    assert (option.default is None) == (unset is not None), option.default
    stated(phrase.format(option.default if unset is None else unset()))


def test_the_context_a_host_refusal_names():
    from klconvert.runtime.host_memory import NAMED_FIT_SHARE

    stated(f"the largest context that fits {NAMED_FIT_SHARE:.0%} of what is left")


def test_the_least_gpu_memory():
    from klconvert.sizes import LEAST_BARE_BYTES

    least = f"{LEAST_BARE_BYTES / 2**20:g} MiB"
    stated(f"one under {least} (`80`) is refused as a unit left off; under {least} in any form")


def test_the_bench_defaults():
    from klconvert.cli import DECODE_CONTEXT, cli

    default = {p.name: p.default for p in cli.commands["bench"].params}
    assert default["contexts"] is None and default["check_depth"] is True   # the context: DECODE_CONTEXT, below
    stated(f"(defaults: `--bits {default['bits']}`, `--context {DECODE_CONTEXT}` -- none when `--prefill` is given "
           f"alone --, `--batch {default['batches']}`, `--mla-cache-dtype {default['mla_cache_dtype']}`, `--peer "
           f"{default['peer']}`, the check on)")


def test_the_prefill_workspace_bounds():
    from klconvert.runtime.memory_plan import PREFILL_SEGMENT
    from klconvert.runtime.model import MLA_KEY_BLOCK

    stated(f"a prefill runs {PREFILL_SEGMENT:,} prompt tokens at a time")
    stated(f"one key block ({MLA_KEY_BLOCK:,} cached rows) at a time")


def test_the_mla_latent_norm_eps():
    from klconvert.runtime.model import MLA_LATENT_NORM_EPS

    stated(f"the MLA latent is normalized with eps {as_written(MLA_LATENT_NORM_EPS)}")


def test_the_default_policy_lm_head():
    """The default policy's lm_head as the README says it: at LM_HEAD_BITS, and kept as stored with --scheme nf4
    (policy_from_options leaves it out of nf4's one group). It said "`lm_head` at 8 bits (as it is with `--scheme
    nf4`)", which reads as 8 bits under nf4 too, where an nf4 folder's lm_head is bf16 (h319)."""
    from klconvert.quant.defaults import LM_HEAD_BITS, policy_from_options

    nf4 = policy_from_options(4, scheme="nf4")
    assert "lm_head" in [entry.pattern for entry in nf4.ignore] and len(nf4.groups) == 1
    stated(f"and `lm_head` at {LM_HEAD_BITS} bits (with `--scheme nf4` kept as stored, bf16 in the release);")
