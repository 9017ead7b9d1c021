"""bind: fill the declared model (runtime/model.py, on `meta`) from a checkpoint, choosing each module's
implementation in this one place -- dense PyTorch, a packed int4/int8 Triton linear (one kernel for a group of
projections that read the same input), the fused MoE, the fused KDA step, the Triton latent attention.

`packed_choice` decides from the checkpoint's metadata alone which stored-packed weights stay packed on the
device, so the memory plan sizes exactly what `bind` then builds (everything else is dequantized at load).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.quant import QuantScheme
from klconvert.quant.group_rules import CHANNEL
from klconvert.runtime import model as M
from klconvert.runtime.device_experts import DeviceExperts
from klconvert.runtime.weights import Packed, held_in_fp32, kernel_takes

Read = Callable[[str], torch.Tensor]


def _expert_names(prefix: str, num_experts: int) -> dict[str, list[str]]:
    """prefix `model.layers.L.block_sparse_moe` -> {gate, up, down: [per-expert canonical names]}."""
    return {proj: [f"{prefix}.experts.{e}.{w}.weight" for e in range(num_experts)]
            for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}


def _shared_names(prefix: str) -> dict[str, str]:
    return {proj: f"{prefix}.shared_experts.{proj}_proj.weight" for proj in ("gate", "up", "down")}


def packed_choice(model: M.KimiLinear, schemes: dict[str, QuantScheme], triton: bool) -> dict[str, QuantScheme]:
    """The canonical weights that stay packed for the Triton kernels: int schemes whose groups the kernels take;
    a layer's routed experts only all together and alike (else the whole stack is dequantized)."""
    if not triton:
        return {}
    c, held = model.config, {}
    for name, module in model.named_modules():
        if isinstance(module, M.Linear):
            weight = M.canonical_names(c, f"{name}.weight")[0][0]
            s = schemes.get(weight)
            if s is not None and kernel_takes(s, module.weight.shape[1]):
                held[weight] = s
        elif isinstance(module, M.Experts):
            names = _expert_names(name.removesuffix(".experts"), c.num_experts)
            found = {schemes.get(n) for ns in names.values() for n in ns}
            s = found.pop() if len(found) == 1 else None
            if s is not None and kernel_takes(s, c.hidden_size) and kernel_takes(s, c.moe_intermediate_size):
                held.update({n: s for ns in names.values() for n in ns})
    return held


def _int_parts(packed: Packed, name: str, device: torch.device) -> dict[str, torch.Tensor]:
    parts, _ = packed(name)
    return {n: t.to(device) for n, t in parts.items()}


def _packed_linear(packed: Packed, name: str, scheme: QuantScheme, device: torch.device):
    from klconvert.kernels.int_linear import repack_int_weight

    p = _int_parts(packed, name, device)
    return repack_int_weight(p["weight_packed"], p["weight_scale"], p.get("weight_zero_point"), p["weight_shape"],
                             scheme.bits, None if scheme.group_size == CHANNEL else scheme.group_size)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _swap_packed(model: M.KimiLinear, packed: Packed, held: dict[str, QuantScheme], device: torch.device) -> None:
    """Replace every held Experts stack, then every held Linear, with its Triton module."""
    from klconvert.kernels.fused_moe import repack_moe_experts
    from klconvert.runtime.kernel_modules import FusedExperts, PackedIntLinear, SharedInStack

    c = model.config
    for name, module in list(model.named_modules()):
        if not isinstance(module, M.Experts):
            continue
        prefix = name.removesuffix(".experts")
        names = _expert_names(prefix, c.num_experts)
        if names["gate"][0] not in held:
            continue
        s = held[names["gate"][0]]
        experts = [{proj: _int_parts(packed, names[proj][e], device) for proj in names}
                   for e in range(c.num_experts)]
        shared = _shared_names(prefix)
        stack_shared = all(held.get(n) == s for n in shared.values())
        stacked = repack_moe_experts(
            experts, shared={p: _int_parts(packed, n, device) for p, n in shared.items()} if stack_shared else None,
            bits=s.bits, group_size=None if s.group_size == CHANNEL else s.group_size)
        _replace(model, name, FusedExperts(stacked))
        if stack_shared:  # the fused kernel carries it: no separate copy
            model.get_submodule(prefix).shared_experts = SharedInStack()
    # walked after the stacks, so a stacked shared expert's Linears are gone: walked beside the stacks, each got a
    # packed copy of its own hung on the SharedInStack, held beside the stack's and never called (h267)
    for name, module in list(model.named_modules()):
        if isinstance(module, M.Linear):
            weight = M.canonical_names(c, f"{name}.weight")[0][0]
            if weight in held:
                _replace(model, name, PackedIntLinear(_packed_linear(packed, weight, held[weight], device)))


def _stack_groups(model: M.KimiLinear) -> None:
    """Each ParallelLinear becomes a StackedLinear: its packed members that stack (same format, whole row blocks)
    as one packed kernel, its dense members as one matmul; fewer launches per token, the same outputs."""
    for name, group in list(model.named_modules()):
        if not isinstance(group, M.ParallelLinear):
            continue
        runs: dict[tuple, list[str]] = {}
        for member in group.order:
            p = getattr(getattr(group, member), "packed", None)
            if p is None:
                key: tuple = ("dense",)
            elif p.n % p.qweight.shape[2] == 0:   # whole blocks of packed rows: no padding lands between members
                key = (p.k, p.bits, p.group_size, p.zeros is None)
            else:
                key = ("alone", member)
            runs.setdefault(key, []).append(member)
        parts, order = [], []
        for key, members in runs.items():
            modules = [getattr(group, m) for m in members]
            if len(modules) == 1:
                parts.append(modules[0])
            elif key == ("dense",):
                stacked = M.Linear(0, 0)
                stacked.weight = nn.Parameter(torch.cat([m.weight for m in modules]), requires_grad=False)
                parts.append(stacked)
            else:
                from klconvert.kernels.int_linear import concat_packed_linears
                from klconvert.runtime.kernel_modules import PackedIntLinear

                parts.append(PackedIntLinear(concat_packed_linears([m.packed for m in modules])))
            order += members
        _replace(model, name, M.StackedLinear(parts, order, group.sizes))


def _fill(model: M.KimiLinear, read: Read, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter still on `meta` its checkpoint value (dequantized where packed), fp32 where the
    runtime keeps fp32, the compute dtype otherwise."""
    c = model.config
    specs = expected_tensors(c)
    for pname, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        pieces = M.canonical_names(c, pname)
        spec = specs[pieces[0][0]]
        want = torch.float32 if held_in_fp32(spec.name, spec.category) else dtype
        if pieces[0][1] == ():
            value = read(spec.name).to(device=device, dtype=want).view(p.shape)
        else:
            value = torch.empty(p.shape, device=device, dtype=want)
            for name, index in pieces:
                value[index] = read(name)
        owner, _, leaf = pname.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def bind(model: M.KimiLinear, read: Read, packed: Packed | None, held: dict[str, QuantScheme],
         device: torch.device, dtype: torch.dtype, triton: bool, restack: bool = True) -> M.KimiLinear:
    """Fill `model` in place: `held` (from packed_choice) stays packed, the rest is read dense; with `triton`
    the KDA step and prefill and the latent attention become their fused kernels; with `restack` (inference) each
    group of projections that read the same input becomes one matmul per format (training keeps the declared
    modules, whose parameters carry the checkpoint's names); fp32 inference on the CPU without Triton gets the
    PyTorch forms of runtime/cpu_modules.py (fewer ops a decode step, the same results). Returns the model."""
    if held:
        _swap_packed(model, packed, held, device)
    _fill(model, read, device, dtype)
    if restack:
        _stack_groups(model)
    if triton:
        _swap_fused(model, latent_kernel=latent_kernel_reads(model.config, dtype))
    elif cpu_forms_bound(device, dtype, triton, restack):
        _cpu_layout(model)
        _swap_cpu(model)
    return model.eval()


def cpu_forms_bound(device: torch.device, dtype: torch.dtype, triton: bool, restack: bool = True) -> bool:
    """Whether bind gives the model runtime/cpu_modules.py's forms, which hold decode copies of the weights beside
    them: fp32 inference on the CPU without Triton."""
    return not triton and restack and device.type == "cpu" and dtype == torch.float32


def latent_kernel_reads(config: KimiLinearConfig, dtype: torch.dtype) -> bool:
    """Whether the Triton path attends the MLA cache with the latent kernels (else with PyTorch's attention): the
    compute dtype is not fp32 (the cache is bf16 or e4m3, what they read) and they take the latent's and the shared
    key's sizes (the release's 512 and 64 are taken; a config may give others)."""
    from klconvert.kernels.mla_limits import latent_dims_taken   # no Triton

    return dtype != torch.float32 and latent_dims_taken(config.kv_lora_rank, config.qk_rope_head_dim)


def _swap_fused(model: M.KimiLinear, latent_kernel: bool) -> None:
    """The weight-less decode and prefill modules and the small ones whose PyTorch form is many launches.
    latent_kernel: latent_kernel_reads (the Triton latent attention and row write for the MLA cache)."""
    from klconvert.runtime.kernel_modules import (ConcurrentStackedLinear, FusedDenseMLP, FusedKDAStep, FusedNormMoE,
                                                  FusedRMSNorm, FusedRouter, PackedDenseLinear, TritonLatentAttention,
                                                  TritonLatentRowWrite, TritonPrefillAttention, kda_chunk_module)

    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        if isinstance(module, M.StackedLinear) and PackedDenseLinear.takes(module):
            _replace(model, name, PackedDenseLinear(module))
        elif isinstance(module, M.StackedLinear) and len(module.parts) > 1 and device.type == "cuda":
            _replace(model, name, ConcurrentStackedLinear(module, device))
        elif isinstance(module, M.KDAMixer):
            module.chunk = kda_chunk_module(module)
            if isinstance(module.f_b_proj, M.Linear) and isinstance(module.g_b_proj, M.Linear):  # else quantized:
                module.step = FusedKDAStep(module, module.chunk)         # the PyTorch step calls them as they are
        elif isinstance(module, M.MLAMixer):
            module.prefill_attention = TritonPrefillAttention(module.prefill_attention.key_block)
            if latent_kernel:
                module.attend, module.write_rows = TritonLatentAttention(), TritonLatentRowWrite()
        elif isinstance(module, M.RMSNorm):
            _replace(model, name, FusedRMSNorm(module))
        elif isinstance(module, M.Router) and model.config.num_expert_group == 1:
            _replace(model, name, FusedRouter(module))
        elif isinstance(module, M.DenseMLP) and (chunk := FusedDenseMLP.chunk(module, model.config)):
            _replace(model, name, FusedDenseMLP(module, chunk))
    for module in model.modules():  # after the loop: an MoE is met before the router it holds is swapped
        if isinstance(module, M.MoE):
            FusedNormMoE.adopt(module)
        elif isinstance(module, M.Experts) and device.type == "cuda":   # dense experts: no host sync at decode
            DeviceExperts.adopt(module)
    _park_o_proj(model)
    _logits_in_fp32(model)
    _prefetch_ahead(model)


def _park_o_proj(model: M.KimiLinear) -> None:
    """An MoE block's packed o_proj leaves its split-K partials to the fused router's launch, which adds them up
    beside the residual add (PackedIntLinear.park, at one token): the o_proj launch skips its arrival and
    last-split sum. On an H200 a graph of o_proj -> norm + router pairs at the 48B's shapes, one token: 10.8 -> 10.1
    us a pair (BENCHMARKS.md, twenty-second decode round)."""
    from klconvert.runtime.kernel_modules import FusedNormMoE, PackedIntLinear

    for block in model.blocks:
        if type(block.ffn) is FusedNormMoE and isinstance(block.self_attn.o_proj, PackedIntLinear):
            block.self_attn.o_proj.park = True


def _logits_in_fp32(model: M.KimiLinear) -> None:
    """A packed lm_head writes the logits in fp32, the dtype KimiLinear returns them in, so the model's widening of
    them is no copy (on an H200 a 4.2 us launch a decode step, BENCHMARKS.md twenty-third decode round); the
    logits are then the kernel's fp32 sums, not their bf16 rounding."""
    from klconvert.runtime.kernel_modules import PackedIntLinear

    if isinstance(model.lm_head, PackedIntLinear):
        model.lm_head.out_dtype = torch.float32


def _projection_weight(module: nn.Module) -> torch.Tensor | None:
    """The bulk of what a projection reads at decode: a packed linear's codes, a group's first part's, or a dense
    weight; None for anything else."""
    packed = getattr(module, "packed", None)
    if packed is not None:
        return packed.qweight
    parts = getattr(module, "parts", None)
    if parts:
        return _projection_weight(parts[0])
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _prefetch_ahead(model: M.KimiLinear) -> None:
    """An MoE layer's down launch (a fused dense MLP's too) also pulls the next block's input projection into L2
    (with PDL, in shares over its programs, while the gate+up launch runs): that projection's own prefetch starts
    only during the short add+RMSNorm launch before it, too late for its 8-14 MB. On an H200, 27 layers at 4K:
    1.746 -> 1.719 ms a step (BENCHMARKS.md, fourteenth decode round; the same for the MLA blocks' kv_b and the
    latent attention fetching o_proj measured no further gain)."""
    from klconvert.runtime.kernel_modules import FusedDenseMLP, FusedExperts

    blocks = list(model.blocks)
    for block, following in zip(blocks, blocks[1:]):
        launches = block.ffn if isinstance(block.ffn, FusedDenseMLP) else getattr(block.ffn, "experts", None)
        if isinstance(launches, (FusedExperts, FusedDenseMLP)):
            launches.after = _projection_weight(following.self_attn.in_proj)


def _cpu_layout(model: M.KimiLinear) -> None:
    """fp32 on the CPU: each Linear's and router's weight laid out [in, out] in memory, the same values
    (`column_major`). F.linear then multiplies as a plain x @ W-as-stored, which the project's 2-core host ran up
    to 2.6x faster than over the [out, in] rows for decode's one-row products of wide outputs (README). Every path
    bound so -- the declared modules and the CPU forms -- reads the same layout."""
    from klconvert.runtime.cpu_modules import column_major

    for module in model.modules():
        if type(module) in (M.Linear, M.Router):
            module.weight = nn.Parameter(column_major(module.weight.detach()), requires_grad=False)


def _swap_cpu(model: M.KimiLinear) -> None:
    """The CPU's fp32 PyTorch forms (runtime/cpu_modules.py); each keeps the reference where it does not apply."""
    from klconvert.runtime.cpu_modules import CPUDenseMLP, CPUKDAMixer, CPUMLAMixer, CPUMoE, CPURMSNorm

    for name, module in list(model.named_modules()):
        if isinstance(module, M.KDAMixer):
            CPUKDAMixer.adopt(module)
        elif isinstance(module, M.MLAMixer):
            CPUMLAMixer.adopt(module)
        elif isinstance(module, M.RMSNorm):
            _replace(model, name, CPURMSNorm(module))
        elif isinstance(module, M.MoE):
            _replace(model, name, CPUMoE(module))
        elif isinstance(module, M.DenseMLP):
            CPUDenseMLP.adopt(module)
