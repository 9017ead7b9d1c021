"""The declarative name table: every tensor a Kimi Linear checkpoint holds, in each layout it comes in.

Canonical names are the released checkpoint's (moonshotai/Kimi-Linear-48B-A3B-*). The native
`transformers` port saves some tensors renamed, stacked or concatenated; `TRANSFORMERS_LAYOUT` says
how each of those maps back, as data, and `LLM_COMPRESSOR_LAYOUT` the names llm-compressor saves.
`{L}` is a 0-indexed layer, `{E}` an expert.
"""
from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from klconvert.config import KimiLinearConfig

C = KimiLinearConfig
Shape = Callable[[C], tuple[int, ...]]

# (name template, shape, category). Categories group weights for the memory plan and the quantizer.
GLOBAL_TENSORS: list[tuple[str, Shape, str]] = [
    ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), "embedding"),
    ("model.norm.weight", lambda c: (c.hidden_size,), "norm"),
    ("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), "lm_head"),
]
EVERY_LAYER: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.input_layernorm.weight", lambda c: (c.hidden_size,), "norm"),
    ("model.layers.{L}.post_attention_layernorm.weight", lambda c: (c.hidden_size,), "norm"),
]
KDA_LAYER: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.self_attn.q_proj.weight", lambda c: (c.kda_dim, c.hidden_size), "attention"),
    ("model.layers.{L}.self_attn.k_proj.weight", lambda c: (c.kda_dim, c.hidden_size), "attention"),
    ("model.layers.{L}.self_attn.v_proj.weight", lambda c: (c.kda_dim, c.hidden_size), "attention"),
    ("model.layers.{L}.self_attn.q_conv1d.weight", lambda c: (c.kda_dim, 1, c.conv_kernel_size), "kda_small"),
    ("model.layers.{L}.self_attn.k_conv1d.weight", lambda c: (c.kda_dim, 1, c.conv_kernel_size), "kda_small"),
    ("model.layers.{L}.self_attn.v_conv1d.weight", lambda c: (c.kda_dim, 1, c.conv_kernel_size), "kda_small"),
    ("model.layers.{L}.self_attn.A_log", lambda c: (1, 1, c.kda_num_heads, 1), "kda_small"),
    ("model.layers.{L}.self_attn.dt_bias", lambda c: (c.kda_dim,), "kda_small"),
    ("model.layers.{L}.self_attn.f_a_proj.weight", lambda c: (c.kda_head_dim, c.hidden_size), "kda_small"),
    ("model.layers.{L}.self_attn.f_b_proj.weight", lambda c: (c.kda_dim, c.kda_head_dim), "kda_small"),
    ("model.layers.{L}.self_attn.b_proj.weight", lambda c: (c.kda_num_heads, c.hidden_size), "kda_small"),
    ("model.layers.{L}.self_attn.g_a_proj.weight", lambda c: (c.kda_head_dim, c.hidden_size), "kda_small"),
    ("model.layers.{L}.self_attn.g_b_proj.weight", lambda c: (c.kda_dim, c.kda_head_dim), "kda_small"),
    ("model.layers.{L}.self_attn.o_norm.weight", lambda c: (c.kda_head_dim,), "norm"),
    ("model.layers.{L}.self_attn.o_proj.weight", lambda c: (c.hidden_size, c.kda_dim), "attention"),
]
MLA_LAYER: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.self_attn.q_proj.weight",
     lambda c: (c.num_attention_heads * c.qk_head_dim, c.hidden_size), "attention"),
    ("model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight", lambda c: (c.mla_cache_width, c.hidden_size),
     "attention"),
    ("model.layers.{L}.self_attn.kv_a_layernorm.weight", lambda c: (c.kv_lora_rank,), "norm"),
    ("model.layers.{L}.self_attn.kv_b_proj.weight",
     lambda c: (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), "attention"),
    ("model.layers.{L}.self_attn.o_proj.weight",
     lambda c: (c.hidden_size, c.num_attention_heads * c.v_head_dim), "attention"),
]
DENSE_MLP: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), "dense_mlp"),
    ("model.layers.{L}.mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), "dense_mlp"),
    ("model.layers.{L}.mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), "dense_mlp"),
]
MOE_BLOCK: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.block_sparse_moe.gate.weight", lambda c: (c.num_experts, c.hidden_size), "router"),
    ("model.layers.{L}.block_sparse_moe.gate.e_score_correction_bias", lambda c: (c.num_experts,), "router"),
    ("model.layers.{L}.block_sparse_moe.shared_experts.gate_proj.weight",
     lambda c: (c.moe_intermediate_size * c.num_shared_experts, c.hidden_size), "shared_experts"),
    ("model.layers.{L}.block_sparse_moe.shared_experts.up_proj.weight",
     lambda c: (c.moe_intermediate_size * c.num_shared_experts, c.hidden_size), "shared_experts"),
    ("model.layers.{L}.block_sparse_moe.shared_experts.down_proj.weight",
     lambda c: (c.hidden_size, c.moe_intermediate_size * c.num_shared_experts), "shared_experts"),
]
EXPERT: list[tuple[str, Shape, str]] = [
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", lambda c: (c.moe_intermediate_size, c.hidden_size),
     "experts"),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight", lambda c: (c.hidden_size, c.moe_intermediate_size),
     "experts"),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight", lambda c: (c.moe_intermediate_size, c.hidden_size),
     "experts"),
]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    category: str


def expected_tensors(c: KimiLinearConfig) -> dict[str, TensorSpec]:
    """Every tensor the released layout holds for this config, in file order, with its shape."""
    out: dict[str, TensorSpec] = {}

    def add(table, **fmt):
        for template, shape, category in table:
            name = template.format(**fmt)
            out[name] = TensorSpec(name, shape(c), category)

    add(GLOBAL_TENSORS[:1])
    for layer in range(c.num_hidden_layers):
        add(EVERY_LAYER, L=layer)
        add(KDA_LAYER if c.is_kda(layer) else MLA_LAYER, L=layer)
        if c.is_moe(layer):
            add(MOE_BLOCK, L=layer)
            for e in range(c.num_experts):
                add(EXPERT, L=layer, E=e)
        else:
            add(DENSE_MLP, L=layer)
    add(GLOBAL_TENSORS[1:])
    return out


# ---- the transformers layout -----------------------------------------------------------------
# Each rule: a source-name regex, and how its tensor splits into canonical tensors. A piece is
# (canonical-name template using the regex groups and {E}, index into the source tensor).
@dataclass(frozen=True)
class Piece:
    canonical: str   # template: "{0}" is the layer prefix captured by the rule, "{E}" an expert index
    index: Callable[[C, int], tuple]  # (config, expert) -> index tuple applied to the source tensor
    per_expert: bool = False


_LAYER = r"(model\.layers\.\d+)"


def _third(i: int):
    return lambda c, e: (slice(i * c.kda_dim, (i + 1) * c.kda_dim),)


TRANSFORMERS_LAYOUT: list[tuple[str, list[Piece]]] = [
    (_LAYER + r"\.self_attn\.forget_gate\.(f_a_proj\.weight)$", [Piece("{0}.self_attn.{1}", lambda c, e: ())]),
    (_LAYER + r"\.self_attn\.forget_gate\.(f_b_proj\.weight)$", [Piece("{0}.self_attn.{1}", lambda c, e: ())]),
    (_LAYER + r"\.self_attn\.forget_gate\.(A_log)$", [Piece("{0}.self_attn.{1}", lambda c, e: ())]),
    (_LAYER + r"\.self_attn\.forget_gate\.(dt_bias)$", [Piece("{0}.self_attn.{1}", lambda c, e: ())]),
    (_LAYER + r"\.self_attn\.conv1d\.weight$", [Piece("{0}.self_attn.q_conv1d.weight", _third(0)),
                                               Piece("{0}.self_attn.k_conv1d.weight", _third(1)),
                                               Piece("{0}.self_attn.v_conv1d.weight", _third(2))]),
    (_LAYER + r"\.mlp\.(gate\.weight|gate\.e_score_correction_bias|shared_experts\.\w+\.weight)$",
     [Piece("{0}.block_sparse_moe.{1}", lambda c, e: ())]),
    (_LAYER + r"\.mlp\.experts\.gate_up_proj$",
     [Piece("{0}.block_sparse_moe.experts.{E}.w1.weight", lambda c, e: (e, slice(0, c.moe_intermediate_size)), True),
      Piece("{0}.block_sparse_moe.experts.{E}.w3.weight",
            lambda c, e: (e, slice(c.moe_intermediate_size, 2 * c.moe_intermediate_size)), True)]),
    (_LAYER + r"\.mlp\.experts\.down_proj$",
     [Piece("{0}.block_sparse_moe.experts.{E}.w2.weight", lambda c, e: (e,), True)]),
]

# A KDA layer's short convolutions as released (one tensor each) and as transformers stacks them (q, k, v on dim 0).
KDA_CONV_PART = re.compile(r"^(model\.layers\.\d+\.self_attn\.)([qkv])_conv1d\.weight$")   # (layer prefix, q|k|v)
STACKED_CONV = "{0}conv1d.weight"   # {0}: the layer prefix


def kda_conv_parts(weight_map: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each layer prefix whose separate q/k/v_conv1d `weight_map` names -> {'q'|'k'|'v': its shard}."""
    layers: dict[str, dict[str, str]] = {}
    for name, shard in weight_map.items():
        m = KDA_CONV_PART.match(name)
        if m:
            layers.setdefault(m[1], {})[m[2]] = shard
    return layers


def with_stacked_convs(weight_map: dict[str, str], prefixes: Container[str]) -> dict[str, str]:
    """`weight_map` (tensor -> shard) with the q/k/v_conv1d entries of each layer in `prefixes` as one stacked
    conv1d entry, in q's place and shard: the order stack_kda_convs writes the index in, however often it ran."""
    out = {}
    for name, shard in weight_map.items():
        m = KDA_CONV_PART.match(name)
        if not m or m[1] not in prefixes:
            out[name] = shard
        elif m[2] == "q":
            out[STACKED_CONV.format(m[1])] = shard
    return out


def _whole(template: str) -> list[Piece]:
    return [Piece(template, lambda c, e: ())]


# llm-compressor (0.14) linearizes the stacked experts of the transformers model into per-expert gate/up/down_proj
# modules (modeling/moe/linear_experts.py), named under `mlp.` in memory; it saves them under `mlp.` (transformers
# layout) or, renamed back by transformers' save, `block_sparse_moe.` (released layout), where that save puts the
# dense MLP of layer 0 too.
def _linearized_experts(parent: str) -> list[tuple[str, list[Piece]]]:
    return [(_LAYER + rf"\.{parent}\.experts\.(\d+)\.{proj}_proj\.weight$",
             _whole(f"{{0}}.block_sparse_moe.experts.{{1}}.{w}.weight"))
            for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]


LLM_COMPRESSOR_LAYOUT: list[tuple[str, list[Piece]]] = [
    *_linearized_experts("mlp"), *_linearized_experts("block_sparse_moe"),
    (_LAYER + r"\.block_sparse_moe\.((?:gate|up|down)_proj\.weight)$", _whole("{0}.mlp.{1}")),
]
# The layouts whose names are those of modules in memory -- transformers' (5.25) model and llm-compressor's experts
# linearized in it -- which llm-compressor matches a recipe's targets and ignore list against; names only a save
# writes (block_sparse_moe. for the dense MLP and the linearized experts) are matched by no tool.
IN_MEMORY_LAYOUTS = TRANSFORMERS_LAYOUT + _linearized_experts("mlp")
_COMPILED = [(re.compile(p), pieces) for p, pieces in TRANSFORMERS_LAYOUT + LLM_COMPRESSOR_LAYOUT]
_TRANSFORMERS_COMPILED = tuple(_COMPILED[:len(TRANSFORMERS_LAYOUT)])
_ROUTED_EXPERT = re.compile("|".join(re.escape(template).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+")
                                     for template, _, _ in EXPERT))
_IN_MEMORY = [(re.compile(p), pieces) for p, pieces in IN_MEMORY_LAYOUTS]


def canonical_pieces(source_name: str, c: KimiLinearConfig) -> list[tuple[str, tuple]]:
    """The canonical tensors a source tensor provides, each with the index that cuts it out.

    A released-layout name maps to itself with an empty index. A piece naming a layer or expert the config does
    not have is returned as named; the caller finds it in no expected tensor.
    """
    for pattern, pieces in _COMPILED:
        m = pattern.match(source_name)
        if m:
            out = []
            for p in pieces:
                for e in (range(c.num_experts) if p.per_expert else (None,)):
                    out.append((p.canonical.format(*m.groups(), E=e), p.index(c, e)))
            return out
    return [(source_name, ())]


def sliced_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...] | None:
    """The shape `tensor[index]` would have, or None if the index does not fit the shape."""
    out = []
    for dim, size in enumerate(shape):
        if dim >= len(index):
            out.append(size)
            continue
        ix = index[dim]
        if isinstance(ix, int):
            if not 0 <= ix < size:
                return None
        else:
            if ix.stop > size:
                return None
            out.append(ix.stop - ix.start)
    return tuple(out)


# ---- the table read backwards: a canonical tensor's names in the other layouts -------------------------------------
def _alternatives(pattern: str) -> list[str]:
    """The top-level `|` alternatives of a group's text (`mlp|block_sparse_moe`)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        if pattern[i - 1:i] == "\\":
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
    return [*out, pattern[start:]]


@lru_cache(maxsize=None)
def _pattern_parts(pattern: str) -> tuple[tuple[str, ...] | None, ...] | None:
    """A rule's pattern as the parts of the names it matches, in order: the texts a part may be (a literal, each
    alternative of a non-capturing group), None for a capture group; None where anything else (a class, a repeat)
    sits outside the groups."""
    out: list[tuple[str, ...] | None] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            out.append((pattern[i + 1],))
            i += 2
        elif ch == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(pattern[j], 0) if pattern[j - 1] != "\\" else 0
                j += 1
            if pattern.startswith("(?:", i):
                alternatives = [_pattern_parts(alternative) for alternative in _alternatives(pattern[i + 3:j - 1])]
                if any(parts is None or None in parts for parts in alternatives):
                    return None
                out.append(tuple("".join(texts[0] for texts in parts) for parts in alternatives))
            else:
                out.append(None)
            i = j
        elif (ch == "^" and i == 0) or (ch == "$" and i == len(pattern) - 1):
            i += 1
        elif ch in ".\\[]{}*+?|":
            return None
        else:
            out.append((ch,))
            i += 1
    merged: list[tuple[str, ...] | None] = []   # runs of literals as one text: names are built part by part
    for part in out:
        if part is not None and len(part) == 1 and merged and merged[-1] is not None and len(merged[-1]) == 1:
            merged[-1] = (merged[-1][0] + part[0],)
        else:
            merged.append(part)
    return tuple(merged)


def filled_names(pattern: str, groups: tuple[str, ...]) -> list[str]:
    """The names `pattern` matches with these capture groups: its text with each top-level capture group replaced by
    its value, each non-capturing group by each of its alternatives, and escapes dropped; none where anything else (a
    class, a repeat) sits outside the groups."""
    parts = _pattern_parts(pattern)
    if parts is None or sum(part is None for part in parts) > len(groups):
        return []
    out, g = [""], iter(groups)
    for part in parts:
        texts = part if part is not None else (next(g),)
        out = [name + text for name in out for text in texts]
    return [name for name in out if re.match(pattern, name)]


@lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    """A Piece template as a regex: its positional fields as groups g0, g1, ..., {E} (an expert index) as group E."""
    return re.compile(re.sub(r"\\\{(\d+|E)\\\}",
                             lambda m: r"(?P<E>\d+)" if m.group(1) == "E" else f"(?P<g{m.group(1)}>.+)",
                             re.escape(template)))


def template_fields(template: str, name: str) -> tuple[str, ...] | None:
    """The values of a Piece template's positional fields ({0}, {1}) that make `name`; {E} is an expert index."""
    m = _template_regex(template).fullmatch(name)
    if m is None:
        return None
    fields = {int(k[1:]): v for k, v in m.groupdict().items() if k != "E"}
    return tuple(fields[i] for i in range(len(fields)))


# A layer's or an expert's index: a name part of digits alone, which every rule carries to the other layout as it is,
# in order -- so each form of name (its indexes as 0) is read backwards once, not each of the 48B's ~21,000 names.
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@lru_cache(maxsize=None)
def layout_names(name: str) -> tuple[str, ...]:
    """The names the canonical tensor `name` has in memory (IN_MEMORY_LAYOUTS, the rules read backwards; a
    concatenated weight's as the module holding it), where llm-compressor matches a recipe against it; empty where it
    is named there as released."""
    indexes = _INDEX.findall(name)
    return tuple(_INDEX.sub(lambda _, each=iter(indexes): next(each), alias)
                 for alias in _form_layout_names(_INDEX.sub("0", name)))


@lru_cache(maxsize=None)
def _form_layout_names(name: str) -> tuple[str, ...]:
    """layout_names, read off the table."""
    return _names_in(tuple(_IN_MEMORY), name)


@lru_cache(maxsize=None)
def in_memory_name(name: str) -> str:
    """The name transformers gives the tensor a layout holds whole under `name` once its load has renamed the
    checkpoint's modules to its own (forget_gate.f_a_proj, mlp.shared_experts; TRANSFORMERS_LAYOUT read backwards):
    what its quantizers match module names against. A tensor transformers names as released keeps its name."""
    released = released_name(name)
    return next(iter(_names_in(_TRANSFORMERS_COMPILED, released)), released)


def released_name(name: str) -> str:
    """The released name of the tensor a layout holds whole under `name`: itself where no rule renames it, and where
    a rule cuts it into pieces (a stack, a concatenation), which no one name is."""
    for pattern, pieces in _COMPILED:
        m = pattern.match(name)
        if m:
            return pieces[0].canonical.format(*m.groups()) if len(pieces) == 1 and not pieces[0].per_expert else name
    return name


def is_routed_expert(name: str) -> bool:
    """Whether the released name `name` is a routed expert's weight (EXPERT's: experts.{E}.w1, w2, w3)."""
    return _ROUTED_EXPERT.fullmatch(name) is not None


def _names_in(rules: tuple[tuple[re.Pattern, list[Piece]], ...], name: str) -> tuple[str, ...]:
    """The names the canonical tensor `name` has in the layouts of `rules`, read backwards (layout_names)."""
    out = []
    for pattern, pieces in rules:
        for piece in pieces:
            made = _template_regex(piece.canonical).fullmatch(name)
            if made is None:
                continue
            for source in filled_names(pattern.pattern, template_fields(piece.canonical, name)):
                # a stacked tensor (mlp.experts.gate_up_proj) is a parameter of the experts module, not a module
                whole = source.endswith(".weight") == name.endswith(".weight")
                back = piece.canonical.format(*pattern.match(source).groups(), E=made.groupdict().get("E"))
                if whole and back == name:
                    out.append(source)
    return tuple(out)
