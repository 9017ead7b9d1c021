"""The options of `quantize` and `pull_and_quantize` that need no model -- the flags that choose the policy, a
--recipe, the switches, the shard size -- checked without importing torch (~2 s of CPU): `klconvert quantize` and
`klconvert pull-and-quantize` refuse them before the quantizer (klconvert/quantize.py, which checks them through here
again for the Python API) imports it. Only an NF4 policy (bitsandbytes) and a recipe's runtime: section (checked as
the planner reads it) import torch here."""
from __future__ import annotations

from pathlib import Path

from klconvert.errors import KLError, argument, either, refuse_non_bool
from klconvert.extras import require
from klconvert.quant import Policy, Recipe, load_recipe, policy_from_options
from klconvert.quant.defaults import DEFAULT, GROUP_SIZE_FLAG
from klconvert.quant.group_rules import (GROUP_SIZE_ADVICE, OBSERVERS, SUPPORTED_BITS, check_group_size,
                                         unsupported_observer)
from klconvert.quant.scheme import KINDS, NF4_BLOCKSIZE
from klconvert.release import RELEASED_SHARD_BYTES
from klconvert.scalars import as_number
from klconvert.sizes import SHARD_SIZE_EXAMPLES
from klconvert.units import counted, size_text

MIN_SHARD_BYTES = 1  # the smallest limit a shard takes (a tensor larger than the limit gets a shard of its own)


def _checked_flag_types(group_size, symmetric, scheme, observer) -> int | None:
    """The group size as a Python int (as_number: numpy and torch integers taken), or None; KLError for a value of
    the flags that the command line's parser never passes (a float, a string, a bool where a whole number belongs; a
    symmetric that is no bool): a caller of the library gets it named, not written into config.json, taken for the
    default or met as a TypeError. None is each one's default; --bits is checked with its values."""
    size = None if group_size is None else as_number(group_size, whole=True)
    if group_size is not None and size is None:
        raise KLError(f"--group-size {group_size!r} is not a whole number; use {GROUP_SIZE_ADVICE} (or -1 for one "
                      "scale per row)")
    if symmetric is not None and type(symmetric) is not bool:
        raise KLError(f"--sym/--asym: symmetric={symmetric!r} is not a bool; pass symmetric=True (--sym), False "
                      "(--asym) or None (the default, --sym)")
    if scheme is not None and (not isinstance(scheme, str) or scheme not in KINDS):
        raise KLError(f"--scheme {scheme!r} is not supported; use {either(KINDS, '--scheme')}")
    if observer is not None and (not isinstance(observer, str) or observer not in OBSERVERS):
        raise KLError(unsupported_observer(observer, "--observer"))
    return size


def refuse_bad_switches(force, progress, allow_split_fused, recipe) -> None:
    """KLError for a switch of quantize's that is no bool (force="no" would replace OUT), or that changes nothing."""
    refuse_non_bool(force, "force", "--force")
    refuse_non_bool(progress, "progress")
    refuse_non_bool(allow_split_fused, "allow_split_fused", "--allow-split-fused")
    if allow_split_fused and recipe is None:
        raise KLError("--allow-split-fused lets a --recipe split a module vLLM fuses, and no --recipe is given "
                      "(the other options never split one); drop --allow-split-fused")


def choose_policy(bits: int | None = None, group_size: int | None = None, symmetric: bool | None = None,
                  scheme: str | None = None, recipe: str | Path | Recipe | None = None,
                  observer: str | None = None) -> tuple[Policy, Recipe | None]:
    """(policy, the recipe read) from --recipe, or (policy, None) from the flags (defaults: int4, group 128,
    symmetric, min-max ranges). `recipe`: a recipe file's path or shipped name, or one read already (the Recipe an
    earlier choose_policy returned), which is checked again but not read again: the command line's check, and
    pull_and_quantize's before its download, hand the quantizer the recipe they checked, not a path whose file may
    have changed since (edited during a 98 GB download, it would be read anew, refused only then or quantized by
    other rules than OUT's name and the split-fused check were taken from)."""
    group_size = _checked_flag_types(group_size, symmetric, scheme, observer)
    if recipe is not None:
        given = [flag for flag, value in (("--bits", bits), ("--group-size", group_size), ("--sym/--asym", symmetric),
                                          ("--scheme", scheme), ("--observer", observer)) if value is not None]
        named = recipe.path if isinstance(recipe, Recipe) else recipe
        if given:
            raise KLError(f"--recipe {named} says how each tensor is stored; drop {', '.join(given)} or the recipe")
        parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if parsed.runtime:   # checked as `plan --model OUT` will read it; the planner imports the runtime, so only then
            from klconvert.runtime.plan_report import check_runtime_settings

            check_runtime_settings(parsed)
        if parsed.policy.kind == "nf4":
            require("bitsandbytes.functional", f"--recipe {named} (NF4 weights)")
        return parsed.policy, parsed
    scheme = DEFAULT.kind if scheme is None else scheme
    given_bits, bits = bits, DEFAULT.bits if bits is None else as_number(bits, whole=True)
    if bits not in SUPPORTED_BITS:   # 4.0 and "4" too: the repr shows which
        raise KLError(f"--bits {given_bits!r} is not supported; use {either(SUPPORTED_BITS, '--bits')}")
    if scheme == "nf4":
        clashes = [flag for flag, clash in ((f"--bits {bits}", bits != 4), (f"--group-size {group_size}",
                                            group_size is not None), ("--asym", symmetric is False),
                                            (f"--observer {observer}", observer is not None)) if clash]
        if clashes:
            raise KLError(f"--scheme nf4 is 4-bit and symmetric, in blocks of {NF4_BLOCKSIZE} with bitsandbytes' own "
                          f"scales; drop {', '.join(clashes)}")
        require("bitsandbytes.functional", "--scheme nf4")
    elif group_size is not None:
        check_group_size(group_size, flag=GROUP_SIZE_FLAG)
    return policy_from_options(bits, DEFAULT.group_size if group_size is None else group_size,
                               DEFAULT.symmetric if symmetric is None else symmetric, scheme,
                               observer=DEFAULT.observer if observer is None else observer), None


def shard_limit(max_shard_bytes: int | None, given: str | None = None) -> int:
    """The most bytes a shard holds: `max_shard_bytes`, a whole number of at least MIN_SHARD_BYTES, or
    RELEASED_SHARD_BYTES for None. `given`: the --max-shard-size text it was read from, which a refusal then quotes."""
    if max_shard_bytes is None:
        return RELEASED_SHARD_BYTES
    number = as_number(max_shard_bytes, whole=True)
    if number is None or number < MIN_SHARD_BYTES:
        least = counted(MIN_SHARD_BYTES, "byte")
        if given is not None:
            raise KLError(f"--max-shard-size {given!r}: a shard holds at least {least}; give a size such as "
                          f"{SHARD_SIZE_EXAMPLES}")
        raise KLError(f"{argument('max_shard_bytes', '--max-shard-size', max_shard_bytes)}: give a whole number of "
                      f"bytes, at least {MIN_SHARD_BYTES:,}, or None for the default {size_text(RELEASED_SHARD_BYTES)}")
    return number
