"""The modules vLLM builds fused from several checkpoint modules (one scheme each), declared as data, and the check
that a policy stores every member of one fused module the same way."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from klconvert.errors import KLError


@dataclass(frozen=True)
class FusedModule:
    """A module vLLM builds from several checkpoint modules under one parent, with a single quantization scheme.

    members: regexes over a module's name below the parent; an instance exists where all of them are present.
    scheme_from: the names (below the parent) vLLM looks the fused module's scheme up under, when they are not the
    members themselves; same order as `members`.
    """

    name: str
    members: tuple[str, ...]
    scheme_from: tuple[str, ...] = ()


# vLLM 0.33.0 runs KimiLinearForCausalLM with vllm/models/kimi_k3/nvidia/model.py: KimiLinearModel's
# packed_modules_mapping and load_weights' stacked_params_mapping fuse these (the KDA layer without a full-rank gate
# is vllm/model_executor/layers/mamba/gdn/kimi_gdn_linear_attn.py, whose in_proj_qkvgfab is q, k, v, b, f_a).
# The routed experts of a layer are one FusedMoE module whose scheme get_moe_method (compressed_tensors_moe.py) looks
# up at experts.0.{gate,up,down}_proj, the default checkpoint names, while load_weights maps w1/w3/w2 into it.
VLLM_FUSED_MODULES = (
    FusedModule("in_proj_qkvgfab", ("q_proj", "k_proj", "v_proj", "b_proj", "f_a_proj")),
    FusedModule("gate_up_proj", ("gate_proj", "up_proj")),
    FusedModule("conv1d", ("q_conv1d", "k_conv1d", "v_conv1d")),
    FusedModule("experts", (r"experts\.\d+\.w1", r"experts\.\d+\.w3", r"experts\.\d+\.w2"),
                scheme_from=("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj")),
)
ALLOW_FLAG = "--allow-split-fused"


@dataclass(frozen=True)
class FusedInstance:
    """One fused module of one checkpoint: its vLLM name, and its members' tensor names and shapes."""

    module: FusedModule
    parent: str
    members: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]  # per member pattern: (tensor name, shape)...

    @property
    def name(self) -> str:
        return f"{self.parent}.{self.module.name}"


def fused_instances(names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> list[FusedInstance]:
    """Every fused module the checkpoint's `.weight` tensors form, in checkpoint order."""
    weights = [(n, tuple(s)) for n, s in names_and_shapes if n.endswith(".weight")]
    out = []
    for fused in VLLM_FUSED_MODULES:
        patterns = [re.compile(rf"^(?P<parent>.+)\.(?:{m})\.weight$") for m in fused.members]
        found: dict[str, list[list[tuple[str, tuple[int, ...]]]]] = {}
        for name, shape in weights:
            for i, pattern in enumerate(patterns):
                m = pattern.match(name)
                if m:
                    found.setdefault(m["parent"], [[] for _ in patterns])[i].append((name, shape))
                    break
        out += [FusedInstance(fused, parent, tuple(map(tuple, members)))
                for parent, members in found.items() if all(members)]
    return out


def refuse_split_fused(policy, names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> None:
    """KLError naming the first fused module whose members `policy` stores differently, or whose scheme vLLM would
    look up under names the policy stores otherwise (vLLM refuses the first and misreads the second)."""
    for inst in fused_instances(names_and_shapes):
        stored = {name: policy.scheme_for(name, shape) for member in inst.members for name, shape in member}
        first, scheme = next(iter(stored.items()))
        other = next(((n, s) for n, s in stored.items() if s != scheme), None)
        if other is not None:
            members = ", ".join(m.replace("\\d+", "E").replace("\\.", ".") for m in inst.module.members)
            raise KLError(f"{inst.name}: vLLM fuses {members} into one module with one scheme, but this policy "
                          f"stores {first} as {_describe(scheme)} and {other[0]} as {_describe(other[1])}; put "
                          f"them in one config group or ignore them all (or pass {ALLOW_FLAG} if the folder "
                          "never goes to vLLM)")
        for looked_up, (name, shape) in zip(inst.module.scheme_from, (m[0] for m in inst.members)):
            seen = policy.scheme_for(f"{inst.parent}.{looked_up}.weight", shape)
            if seen != scheme:
                raise KLError(f"{inst.name}: vLLM looks this fused module's scheme up under "
                              f"{inst.parent}.{looked_up}, which this policy stores as {_describe(seen)}, but "
                              f"{name} as {_describe(scheme)}; select the routed experts with \"Linear\" or a "
                              f"pattern that matches both names (or pass {ALLOW_FLAG} if the folder never goes "
                              "to vLLM)")


def _describe(scheme) -> str:
    return scheme.describe() if scheme is not None else "kept as it is"
