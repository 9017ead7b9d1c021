"""What each canonical tensor becomes: output names, dtypes, shapes planned from its scheme; made in one pass."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from klconvert.checkpoint.reader import Checkpoint
from klconvert.checkpoint.safetensors_header import DTYPE_BYTES
from klconvert.checkpoint.safetensors_writer import PlannedTensor
from klconvert.checkpoint.stored_tensor import TORCH_DTYPES
from klconvert.quant import Policy, QuantScheme, compress_nf4, compress_weight
from klconvert.quant.pack_quantized import weight_shape_tensor
from klconvert.quant.scheme import NF4_BLOCKSIZE
from klconvert.quant.stored import NF4_STATE, nf4_parts, packed_parts

Output = tuple[str, torch.dtype, tuple[int, ...]]  # (tensor name, dtype, shape) as written

# Rows quantized per compress_weight call. Group-wise int quantization is row-local, so blocks give the same
# bits as one call, while the temporaries of the 163840-row lm_head stay near 40 MB instead of 3 GB.
# A multiple of 8, so int4 zero points (8 rows to an int32 word) never straddle two blocks.
ROW_BLOCK = 8192
LONGEST_FLOAT = -2.2250738585072014e-308  # a double whose repr is as long as any (24 characters)


@dataclass(frozen=True, eq=False)
class ModulePlan:
    """One canonical tensor and what is written for it: itself (scheme None) or its quantized tensors."""

    name: str
    scheme: QuantScheme | None
    numel: int
    source_bytes: int
    outputs: tuple[Output, ...]

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.outputs)


def packed_outputs(prefix: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme) -> tuple[Output, ...]:
    """The tensors compress_weight makes for a [out, in] weight (compressed-tensors pack-quantized)."""
    return tuple((f"{prefix}.{part}", d, s) for part, d, s in packed_parts(shape, dtype, scheme))


@functools.cache
def _nf4_state_fields(dtype: torch.dtype) -> tuple:
    """The fields bitsandbytes writes into its JSON quant state, read off one quantized block."""
    sample = compress_nf4("sample", torch.ones(1, NF4_BLOCKSIZE, dtype=dtype, device="cpu"))
    return tuple(json.loads(bytes(sample[f"sample.{NF4_STATE}"].tolist())).items())


def nf4_state_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Planned length of the JSON quant state: its real length varies with the repr of nested_offset, so
    it is planned for the longest one and padded with spaces (JSON whitespace) to that length."""
    fields = dict(_nf4_state_fields(dtype), shape=list(shape), nested_offset=LONGEST_FLOAT)
    return len(json.dumps(fields).encode())


def nf4_outputs(prefix: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Output, ...]:
    """The tensors compress_nf4 makes (bitsandbytes' Linear4bit serialization, double-quantized absmax)."""
    return (*((f"{prefix}.{part}", d, s) for part, d, s in nf4_parts(shape)),
            (f"{prefix}.{NF4_STATE}", torch.uint8, (nf4_state_bytes(shape, dtype),)))


def plan_modules(checkpoint: Checkpoint, policy: Policy) -> list[ModulePlan]:
    """Every canonical tensor in file order, with the tensors written for it under the released names."""
    plans = []
    for name, spec in checkpoint.expected.items():
        scheme = policy.scheme_for(name, spec.shape)
        stored = checkpoint.sources[name].dtype
        dtype = TORCH_DTYPES[stored]
        prefix = name.removesuffix(".weight")
        if scheme is None:
            outputs: tuple[Output, ...] = ((name, dtype, spec.shape),)
        elif scheme.kind == "nf4":
            outputs = nf4_outputs(prefix, spec.shape, dtype)
        else:
            outputs = packed_outputs(prefix, spec.shape, dtype, scheme)
        numel = math.prod(spec.shape)
        plans.append(ModulePlan(name, scheme, numel, numel * DTYPE_BYTES[stored], outputs))
    return plans


def compress_in_row_blocks(prefix: str, w: torch.Tensor, scheme: QuantScheme,
                           outputs: tuple[Output, ...]) -> dict[str, torch.Tensor]:
    """compress_weight over ROW_BLOCK rows at a time, gathered on the CPU into the planned tensors."""
    if w.shape[0] <= ROW_BLOCK:
        return {k: v.cpu() for k, v in compress_weight(prefix, w, scheme).items()}
    made = {name: torch.empty(shape, dtype=dtype, device="cpu") for name, dtype, shape in outputs}
    per_word = 32 // scheme.bits
    for start in range(0, w.shape[0], ROW_BLOCK):
        for name, t in compress_weight(prefix, w[start:start + ROW_BLOCK], scheme).items():
            if name.endswith(".weight_zero_point"):            # packed along rows: per_word rows a word
                made[name][start // per_word:start // per_word + t.shape[0]] = t
            elif not name.endswith(".weight_shape"):
                made[name][start:start + t.shape[0]] = t
    made[f"{prefix}.weight_shape"] = weight_shape_tensor(w.shape)
    return made


def make_nf4(prefix: str, w: torch.Tensor, outputs: tuple[Output, ...]) -> dict[str, torch.Tensor]:
    """compress_nf4 on w's device, brought to the CPU, the JSON quant state padded to its planned length."""
    made = {k: v.cpu() for k, v in compress_nf4(prefix, w).items()}
    state = f"{prefix}.{NF4_STATE}"
    length = next(shape[0] for name, _, shape in outputs if name == state)
    pad = length - made[state].numel()
    made[state] = torch.cat([made[state], torch.full((pad,), ord(" "), dtype=torch.uint8, device="cpu")])
    return made


class ModuleMaker:
    """Makes one module's output tensors together and hands them to the shard writer one at a time.

    It holds at most one module's tensors: asking for the next module releases the previous one, so
    host memory stays near the largest tensor whatever the model's size.
    """

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.checkpoint, self.device = checkpoint, device
        self._module: ModulePlan | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def planned_tensors(self, plans: list[ModulePlan]) -> list[PlannedTensor]:
        return [PlannedTensor(name, dtype, shape, functools.partial(self.take, plan, name))
                for plan in plans for name, dtype, shape in plan.outputs]

    def take(self, plan: ModulePlan, name: str) -> torch.Tensor:
        if self._module is not plan:
            self._module, self._tensors = None, {}  # release the previous module before reading the next
            self._tensors, self._module = self._make(plan), plan
        return self._tensors.pop(name)

    def _make(self, plan: ModulePlan) -> dict[str, torch.Tensor]:
        w = self.checkpoint.get(plan.name)
        if plan.scheme is None:
            return {plan.name: w}
        prefix = plan.name.removesuffix(".weight")
        w = w.to(self.device)
        if plan.scheme.kind == "nf4":
            return make_nf4(prefix, w, plan.outputs)
        return compress_in_row_blocks(prefix, w, plan.scheme, plan.outputs)


@dataclass(frozen=True)
class PlanTotals:
    """Sizes before and after, and how many tensors and parameters each scheme stores."""

    params: int
    quantized_params: int
    bytes_in: int
    bytes_out: int
    quantized_bytes_out: int
    by_scheme: dict[str, tuple[int, int]]  # scheme description, or "kept", -> (tensors, parameters)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_out / self.params

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes_out / self.quantized_params if self.quantized_params else 0.0


def plan_totals(plans: list[ModulePlan]) -> PlanTotals:
    quantized = [p for p in plans if p.scheme is not None]
    by_scheme: dict[str, tuple[int, int]] = {}
    for p in plans:
        key = p.scheme.describe() if p.scheme else "kept"
        tensors, params = by_scheme.get(key, (0, 0))
        by_scheme[key] = (tensors + 1, params + p.numel)
    return PlanTotals(params=sum(p.numel for p in plans), quantized_params=sum(p.numel for p in quantized),
                      bytes_in=sum(p.source_bytes for p in plans), bytes_out=sum(p.output_bytes for p in plans),
                      quantized_bytes_out=sum(p.output_bytes for p in quantized), by_scheme=by_scheme)
