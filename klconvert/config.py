"""KimiLinearConfig: the released config.json, checked field by field, with 0-indexed layer kinds."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from klconvert.checkpoint.folder_files import CONFIG_FILE, refuse_link_out
from klconvert.checkpoint.regular_file import parse_json, read_bounded
from klconvert.errors import KLError, few, not_utf8, refuse_if_not_permitted, shown, unreadable_reason
from klconvert.release import RELEASED_CONFIG
from klconvert.verified_files import redownload_advice
from klconvert.units import counted

SUPPORTED_MODEL_TYPES = ("kimi_linear",)
# The release's model class, which transformers and vLLM load a folder by: klconvert's outputs copy config.json
ARCHITECTURES = ["KimiLinearForCausalLM"]
MAX_CONFIG_BYTES = 1 << 20  # the released config.json is 1.6 KB

# Sane ranges of the size fields: wide around the released model (163,840 vocab, 2,304 hidden, 27 layers, 256
# experts, 1M context), so a bad or hostile value is refused before anything is sized or built from it. The
# checkpoint reader then holds the sizes to the shard headers.
SIZE_RANGES = {
    "vocab_size": (1, 1 << 20),  # 6x the released; also bounds the tokenizer built before the shards are read
    "hidden_size": (1, 1 << 16),
    "num_hidden_layers": (1, 1024),
    "intermediate_size": (1, 1 << 18),
    "moe_intermediate_size": (1, 1 << 18),
    "num_experts": (1, 4096),
    "num_shared_experts": (1, 64),  # the MoE blocks carry a shared expert, as the release's do
    "num_attention_heads": (1, 1024),
    "kv_lora_rank": (1, 1 << 14),
    "qk_nope_head_dim": (1, 1 << 12),
    "qk_rope_head_dim": (0, 1 << 12),
    "v_head_dim": (1, 1 << 12),
    "model_max_length": (1, 1 << 24),
    "linear_attn_config.head_dim": (1, 1 << 12),
    "linear_attn_config.num_heads": (1, 1024),
    "linear_attn_config.short_conv_kernel_size": (1, 64),
}

# The float fields' upper bounds, as wide around the released (1e-5, 2.446): past them the activations overflow (a
# routed_scaling_factor of 1e30 made every logit NaN).
FLOAT_BOUNDS = {"rms_norm_eps": 1.0, "routed_scaling_factor": 1000.0}
# torch_dtype's values (transformers 5 names the field dtype), each with the safetensors dtype it names: the float
# types klconvert reads weights in (checkpoint/reader.py). klconvert reads no weights by it, but its outputs copy
# config.json, and transformers and vLLM load the model in it: another string failed transformers' config ("auto",
# "garbage": torch has no such attribute) or loaded bf16 weights in float64.
WEIGHT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

# (field name in config.json, accepted Python types). bool is excluded from int fields below.
_REQUIRED = {
    "model_type": str,
    "vocab_size": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "intermediate_size": int,
    "moe_intermediate_size": int,
    "num_experts": int,
    "num_experts_per_token": int,
    "num_shared_experts": int,
    "first_k_dense_replace": int,
    "routed_scaling_factor": (int, float),
    "num_attention_heads": int,
    "kv_lora_rank": int,
    "qk_nope_head_dim": int,
    "qk_rope_head_dim": int,
    "v_head_dim": int,
    "rms_norm_eps": (int, float),
    "linear_attn_config": dict,
}
_OPTIONAL = {  # field: (types, default)
    "q_lora_rank": ((int, type(None)), None),
    "mla_use_nope": (bool, True),
    "moe_router_activation_func": (str, "sigmoid"),
    "moe_renormalize": (bool, True),
    "num_expert_group": (int, 1),
    "topk_group": (int, 1),
    "tie_word_embeddings": (bool, False),
    "model_max_length": (int, RELEASED_CONFIG["model_max_length"]),
    "bos_token_id": ((int, type(None)), None),
    "eos_token_id": ((int, list, type(None)), None),
    "pad_token_id": ((int, type(None)), None),
    "torch_dtype": ((str, type(None)), None),
}
# transformers' other name for a field of _OPTIONAL: the release writes model_max_length (torch_dtype), a config saved
# under the other name (KimiLinearConfig.attribute_map's; transformers 5's dtype) is read by it all the same
_OPTIONAL_ALIASES = {"model_max_length": "max_position_embeddings", "torch_dtype": "dtype"}
# Fields the runtime does not read, since it implements one value of each (the release's): a checkpoint with another
# would run as a model it is not (a "gelu" MLP through SiLU).
_FIXED = {name: RELEASED_CONFIG[name] for name in ("hidden_act", "moe_layer_freq", "num_nextn_predict_layers")}
_NULL_IS_ABSENT = ("num_nextn_predict_layers",)  # null: no multi-token-prediction layers, as when the field is absent
_LINEAR_REQUIRED = {
    "kda_layers": list,
    "full_attn_layers": list,
    "head_dim": int,
    "num_heads": int,
    "short_conv_kernel_size": int,
}


def _check_type(where: str, name: str, value, types) -> None:
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise KLError(f"{where}: field '{name}' should be {names}, got {type(value).__name__} {shown(value)}; "
                      f"fix the config or {redownload_advice(where)}")


def _stored_name(d: dict, name: str, where: str) -> str:
    """The name config.json gives the optional field `name`: its own, else its transformers alias where only that is
    there; KLError where both are there and disagree (which one bounds the model is then anyone's guess)."""
    alias = _OPTIONAL_ALIASES.get(name)
    if alias is None or d.get(alias) is None:   # absent, or null: as absent
        return name
    if name in d and d[name] != d[alias]:
        raise KLError(f"{where}: fields '{name}' ({shown(d[name])}) and '{alias}' ({shown(d[alias])}) are two names of "
                      "one field and disagree; keep the right one -- fix the config")
    return alias if name not in d else name


def _transformers_kinds_agree(d: dict, where: str, full_attn_layers: tuple[int, ...], first_dense: int,
                              n: int) -> None:
    """KLError where transformers' names of the layer kinds, which its KimiLinearConfig saves beside the release's
    and builds the model from when they are there, say otherwise than linear_attn_config and first_k_dense_replace,
    which klconvert (and vLLM) build it from: two readers would build two models."""
    said = {"layer_types": ("linear_attn_config",
                            ["full_attention" if i in full_attn_layers else "linear_attention" for i in range(n)]),
            "mlp_layer_types": ("first_k_dense_replace", ["dense" if i < first_dense else "sparse" for i in range(n)])}
    for name, (ours, kinds) in said.items():
        if d.get(name) is not None and d[name] != kinds:
            raise KLError(f"{where}: field '{name}' ({shown(d[name])}) says other layer kinds than {ours} "
                          f"({shown(kinds)}); transformers builds the model from the one, klconvert and vLLM from the "
                          "other -- fix the config")


def _positive_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class KimiLinearConfig:
    """The fields the runtime uses, named as in config.json, plus 0-indexed layer kinds."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    kda_layers: tuple[int, ...]          # 0-indexed
    full_attn_layers: tuple[int, ...]    # 0-indexed
    kda_num_heads: int
    kda_head_dim: int
    conv_kernel_size: int
    moe_renormalize: bool    # this and the fields below: optional in config.json (defaults: _OPTIONAL)
    num_expert_group: int
    topk_group: int
    tie_word_embeddings: bool
    model_max_length: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def kda_dim(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_cache_width(self) -> int:
        """Values cached per token per MLA layer: the latent plus the shared key slice."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def model_max_length_name(self) -> str:
        """The name config.json gives model_max_length -- its own, or transformers' max_position_embeddings -- for
        a message that sends the user to the field."""
        return _stored_name(self.raw, "model_max_length", CONFIG_FILE)

    def is_kda(self, layer: int) -> bool:
        return layer in self.kda_layers

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, d: dict, where: str = CONFIG_FILE) -> "KimiLinearConfig":
        if not isinstance(d, dict):
            raise KLError(f"{where}: expected a JSON object at the top level; {redownload_advice(where)}")
        if "model_type" in d and d["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise KLError(f"{where}: model_type {shown(d['model_type'])} is not supported; klconvert runs "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Kimi Linear) checkpoints only")
        if d.get("architectures") not in (None, ARCHITECTURES):   # absent or null: transformers' own config saves
            raise KLError(f"{where}: architectures {shown(d['architectures'])} is not {ARCHITECTURES}, the Kimi "
                          f"Linear class transformers and vLLM load this folder as; fix the config or "
                          f"{redownload_advice(where)}")
        for name, types in _REQUIRED.items():
            if name not in d:
                raise KLError(f"{where}: required field '{name}' is missing; fix the config or "
                              f"{redownload_advice(where)}")
            _check_type(where, name, d[name], types)
        values = {name: d[name] for name in _REQUIRED if name not in ("model_type", "linear_attn_config")}
        stored_as = {name: _stored_name(d, name, where) for name in _OPTIONAL}  # the name config.json gives each
        for name, (types, default) in _OPTIONAL.items():
            value = d.get(stored_as[name], default)
            _check_type(where, stored_as[name], value, types)
            values[name] = value
        for name, only in _FIXED.items():
            if d.get(name) is None and name in _NULL_IS_ABSENT:
                continue
            if name in d and (type(d[name]) is not type(only) or d[name] != only):
                raise KLError(f"{where}: field '{name}' is {shown(d[name])}; klconvert's runtime implements only "
                              f"{only!r} (the release's), so this checkpoint is another model")
        if "use_grouped_topk" in d:   # with num_expert_group 1 (checked below) grouping is a no-op either way
            _check_type(where, "use_grouped_topk", d["use_grouped_topk"], bool)
        dtype = values.pop("torch_dtype")   # checked, not kept: for the readers of the outputs that copy it
        if dtype is not None and dtype not in WEIGHT_DTYPES:
            raise KLError(f"{where}: field '{stored_as['torch_dtype']}' is {shown(dtype)}; it names the float type the "
                          f"weights are stored in, which transformers and vLLM load the model in: one of "
                          f"{', '.join(WEIGHT_DTYPES)} -- fix the config")
        # checked, not kept: the runtime implements the one value each may have
        if values.pop("q_lora_rank") is not None:
            raise KLError(f"{where}: q_lora_rank={shown(d['q_lora_rank'])} (a low-rank MLA query) is not part of "
                          "Kimi Linear; this checkpoint is another model")
        if not values.pop("mla_use_nope"):
            raise KLError(f"{where}: mla_use_nope=false (rotary MLA) is not supported; Kimi Linear uses NoPE MLA")
        if values.pop("moe_router_activation_func") != "sigmoid":
            raise KLError(f"{where}: moe_router_activation_func={shown(d['moe_router_activation_func'])} "
                          "is not supported; Kimi Linear routes with 'sigmoid'")

        lin = d["linear_attn_config"]
        for name, types in _LINEAR_REQUIRED.items():
            if name not in lin:
                raise KLError(f"{where}: required field 'linear_attn_config.{name}' is missing; "
                              f"fix the config or {redownload_advice(where)}")
            _check_type(where, f"linear_attn_config.{name}", lin[name], types)
        for name, (low, high) in SIZE_RANGES.items():
            value = lin[name.split(".", 1)[1]] if name.startswith("linear_attn_config.") else values[name]
            if not low <= value <= high:
                raise KLError(f"{where}: field '{stored_as.get(name, name)}' is {shown(value)}, outside the sane range "
                              f"{low}..{high:,}; fix the config or {redownload_advice(where)}")
        n = values["num_hidden_layers"]
        if len(lin["kda_layers"]) + len(lin["full_attn_layers"]) > n:
            raise KLError(f"{where}: linear_attn_config's kda_layers and full_attn_layers hold "
                          f"{len(lin['kda_layers']) + len(lin['full_attn_layers'])} entries for {counted(n, 'layer')}; "
                          "each layer is named once -- fix the config")
        layers = {}
        for name in ("kda_layers", "full_attn_layers"):
            for v in lin[name]:
                _check_type(where, f"linear_attn_config.{name}[]", v, int)
                if not 1 <= v <= n:  # the released lists are 1-indexed
                    raise KLError(f"{where}: linear_attn_config.{name} holds {shown(v)}, outside 1..{n} "
                                  "(the lists are 1-indexed); fix the config")
            layers[name] = tuple(v - 1 for v in lin[name])
        both = set(layers["kda_layers"]) & set(layers["full_attn_layers"])
        every = set(layers["kda_layers"]) | set(layers["full_attn_layers"])
        if both or every != set(range(n)):
            raise KLError(f"{where}: linear_attn_config's kda_layers and full_attn_layers must each name every layer "
                          f"1..{n} exactly once (overlap {few(v + 1 for v in both)}, "
                          f"missing {few(set(range(1, n + 1)) - {v + 1 for v in every})}); fix the config")
        _transformers_kinds_agree(d, where, layers["full_attn_layers"], values["first_k_dense_replace"], n)
        for name, low, high in (("num_experts_per_token", 1, values["num_experts"]),
                                ("num_expert_group", 1, values["num_experts"]),
                                ("topk_group", 1, values["num_expert_group"]), ("first_k_dense_replace", 0, n)):
            if not low <= values[name] <= high:
                raise KLError(f"{where}: field '{name}' is {shown(values[name])}, outside {low}..{high}; fix the "
                              "config")
        experts, groups = values["num_experts"], values["num_expert_group"]
        if groups > 1 and (experts % groups or experts // groups < 2
                           or values["num_experts_per_token"] > values["topk_group"] * (experts // groups)):
            raise KLError(f"{where}: num_expert_group {groups} must split num_experts {experts} into equal groups of "
                          f"at least 2 (the router ranks groups by their top-2 sums), and topk_group "
                          f"{values['topk_group']} of them must hold num_experts_per_token "
                          f"{values['num_experts_per_token']}; fix the config")
        for name, high in FLOAT_BOUNDS.items():
            if not _positive_finite(values[name]) or values[name] > high:
                raise KLError(f"{where}: field '{name}' is {shown(values[name])}; it must be a positive number of at "
                              f"most {high:g} -- fix the config")
            values[name] = float(values[name])
        eos = values.pop("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        for name, token_ids in (("bos_token_id", (values["bos_token_id"],)), ("eos_token_id", eos_ids),
                                ("pad_token_id", (values["pad_token_id"],))):
            for token_id in token_ids:
                if token_id is None:
                    continue
                _check_type(where, f"{name}[]" if name == "eos_token_id" else name, token_id, int)
                if not 0 <= token_id < values["vocab_size"]:
                    raise KLError(f"{where}: {name} {shown(token_id)} is outside the vocabulary "
                                  f"0..{values['vocab_size'] - 1}; fix the config")
        return cls(**values, kda_layers=layers["kda_layers"], full_attn_layers=layers["full_attn_layers"],
                   kda_num_heads=lin["num_heads"], kda_head_dim=lin["head_dim"],
                   conv_kernel_size=lin["short_conv_kernel_size"], eos_token_ids=eos_ids, raw=dict(d))

    @classmethod
    def from_file(cls, path: str | Path, flag: str = "--model") -> "KimiLinearConfig":
        """flag: the option that named the folder, for the message when it holds no config.json."""
        path = Path(path)
        refuse_link_out(path)
        try:
            text = read_bounded(path, MAX_CONFIG_BYTES, CONFIG_FILE).decode("utf-8")
        except FileNotFoundError:
            raise KLError(f"{path}: no config.json here; point {flag} at a Kimi Linear checkpoint folder") from None
        except UnicodeDecodeError as e:   # the codec's own words ("can't decode byte 0xff in position 7") are no line
            raise KLError(f"{not_utf8(path, e.start)}; convert it to UTF-8, or {redownload_advice(path)}") from None
        except OSError as e:
            refuse_if_not_permitted(e, path)
            raise KLError(f"{path}: cannot read the config ({unreadable_reason(e)}); re-download the model") from None

        def refuse_constant(name: str):   # json reads NaN and Infinity, which are no JSON and no size
            raise KLError(f"{path}: holds {name}, which is not a JSON number; fix the config or "
                          f"{redownload_advice(path)}")

        try:
            d = parse_json(text, parse_constant=refuse_constant)
        except json.JSONDecodeError as e:
            raise KLError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {redownload_advice(path)}") from None
        except (RecursionError, ValueError) as e:  # nesting past Python's stack; a key twice; an int of 4,300+ digits
            raise KLError(f"{path}: not a config ({unreadable_reason(e, 80)}); {redownload_advice(path)}") from None
        return cls.from_dict(d, where=str(path))
