"""The default policy for Kimi Linear: every linear layer at --bits except the few kept as they are."""
from __future__ import annotations

from klconvert.quant.policy import LINEAR, Entry, Group, Policy
from klconvert.quant.scheme import NF4_BLOCKSIZE, QuantScheme
from klconvert.release import ROUTER, SHORT_CONVS

SMALL_KDA_PROJECTIONS = ("f_b", "g_a", "g_b")   # KDA forget-gate up-projection, output gate low-rank pair: tiny


def kda_projections(names: tuple[str, ...]) -> str:
    """The ignore target of the KDA projections `names` (f_b: f_b_proj) of every layer."""
    return rf"re:.*\.({'|'.join(names)})_proj$"


# The main group targets "Linear" rather than a list of regexes on purpose: vLLM's compressed-tensors
# MoE method looks the routed experts' scheme up under "Linear" (or gate/up/down_proj names, which
# Kimi's w1/w2/w3 are not), and llm-compressor's MoE recipes do the same. What stays out is listed in
# `ignore`, which both vLLM and transformers (as llm_int8_skip_modules) read.
# With the names of reference/model.md this quantizes: routed experts w1/w2/w3, shared experts,
# the dense MLP of layer 0, KDA q/k/v/b/f_a/o_proj and MLA q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj.
KEEP = (
    f"re:{ROUTER}$",                            # MoE router (gate.weight; its correction bias is not a weight)
    kda_projections(SMALL_KDA_PROJECTIONS),     # KDA projections too small to gain from quantizing
    f"re:{SHORT_CONVS}$",                       # KDA short convolutions (vLLM builds them as linear layers)
)
# vLLM fuses a KDA layer's q, k, v, b and f_a projections into one module (in_proj_qkvgfab) with one scheme, so
# b_proj and f_a_proj cannot stay bf16 while q/k/v are quantized. The default quantizes them with q/k/v: on the
# calmed tiny model it moves the int4 KL by +1.2% against keeping just those two (README, "Fused modules"), while
# keeping the whole group as released costs 0.79 GiB on the 48B. To keep the whole group instead, set this to
# ("in_proj_qkvgfab",): the one switch (quant/fused.py names the fused modules).
KEEP_WHOLE: tuple[str, ...] = ()
DEFAULT = QuantScheme()  # the flags' defaults: int4, groups of GROUP_SIZE, symmetric, min-max ranges
GROUP_SIZE_FLAG = "--group-size"  # the flag whose group size the policy's int groups take, as refusals name it
LM_HEAD_BITS = 8  # lm_head's bits in the default policy: 4 costs it several times the rest's KL (README, study 2)
LM_HEAD = "re:^lm_head$"  # a re: target: transformers takes the first plain-string target's group for the experts
# Not linear layers, hence never selected by "Linear": embed_tokens, every norm, A_log, dt_bias,
# e_score_correction_bias (Policy refuses any target that would select them).


def policy_from_options(bits: int = DEFAULT.bits, group_size: int = DEFAULT.group_size,
                        symmetric: bool = DEFAULT.symmetric, scheme: str = DEFAULT.kind,
                        lm_head_bits: int | None = LM_HEAD_BITS, observer: str = DEFAULT.observer) -> Policy:
    """The default policy for the converter's --bits/--group-size/--symmetric/--scheme/--observer options.

    scheme "int": group_0 = "Linear" at `bits` (group_size, symmetric), group_1 = lm_head at
    `lm_head_bits` (symmetric, same group size; None keeps lm_head as it is); both groups' ranges from `observer`.
    scheme "nf4": every linear layer outside KEEP in bitsandbytes NF4 (bits must be 4, blocks of 64);
    lm_head stays as it is, since a bitsandbytes 4-bit checkpoint cannot hold an 8-bit layer.
    Targets that select nothing in a given checkpoint are dropped by Policy.check_against.
    """
    keep = [Entry(p) for p in KEEP]
    if scheme == "nf4":
        main = QuantScheme(bits=bits, group_size=NF4_BLOCKSIZE, symmetric=True, kind="nf4")
        return Policy(groups=(Group("group_0", (Entry(LINEAR),), main),), ignore=(*keep, Entry("lm_head")),
                      strict=False, keep_fused=KEEP_WHOLE)
    groups = [Group("group_0", (Entry(LINEAR),), QuantScheme(bits, group_size, symmetric, scheme, observer))]
    if lm_head_bits is None:
        keep.append(Entry("lm_head"))
    else:
        groups.append(Group("group_1", (Entry(LM_HEAD),), QuantScheme(lm_head_bits, group_size, True, "int",
                                                                      observer)))
    return Policy(groups=tuple(groups), ignore=tuple(keep), strict=False, keep_fused=KEEP_WHOLE,
                  group_size_flag=GROUP_SIZE_FLAG)
