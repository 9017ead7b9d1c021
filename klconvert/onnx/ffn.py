"""The feed-forward half of a block as ONNX: the dense SwiGLU MLP, and the MoE -- sigmoid router with correction
bias, top-k, renormalized weights times routed_scaling_factor, the routed experts plus the shared one.
runtime/model.py Router / Experts / MoE are the math it restates.

The routed experts take one of two forms:
- onnxruntime's QMoE, when every expert of the layer is stored int4 alike: the biased scores pick the experts
  (router_probs), the unbiased scores weigh them (router_weights), QMoE renormalizes, one Mul scales. QMoE's CPU
  kernel is exact in fp32 for int4; for int8 it quantizes the activations to int8, so int8 experts take the other;
- a gather per expert: the tokens that chose it, its gate/up/down (MatMulNBits, or MatMul where stored as floats),
  scattered back weighted (ScatterND add)."""
from __future__ import annotations

import numpy as np

from klconvert.errors import KLError
from klconvert.kernels.naive_moe_route import ROUTE_EPS
from klconvert.onnx.graph import MS_DOMAIN, GraphBuilder
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.onnx.matmul_nbits import stack_experts
from klconvert.runtime import model as M

QMOE_BITS = 4  # expert widths QMoE runs exactly on the CPU (see the module docstring)


def swiglu_mlp(g: GraphBuilder, x: str, mlp, prefix: str, linears: Linears) -> str:
    """down(silu(gate(x)) * up(x)) for a DenseMLP or the shared experts."""
    gate = linears.module(g, x, f"{prefix}.gate_proj", mlp.gate_proj)
    up = linears.module(g, x, f"{prefix}.up_proj", mlp.up_proj)
    return linears.module(g, g.swiglu(gate, up), f"{prefix}.down_proj", mlp.down_proj)


def _expert_names(prefix: str, e: int) -> dict[str, str]:
    return {proj: f"{prefix}.experts.{e}.{w}.weight" for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}


def _routed_by_qmoe(g: GraphBuilder, flat: str, choice: str, weigh: str, moe: M.MoE, prefix: str,
                    linears: Linears) -> str | None:
    """The routed experts' sum through QMoE, or None when the layer's experts are not all int4 alike."""
    c = moe.gate.c
    stored = [{p: linears.stored(n) for p, n in _expert_names(prefix, e).items()} for e in range(c.num_experts)]
    first = stored[0]["gate"]
    if any(w is None or (w.bits, w.block_size, w.zero_points is None) != (QMOE_BITS, first.block_size,
                                                                         first.zero_points is None)
           for s in stored for w in s.values()):
        return None
    stacked = stack_experts(*([s[p] for s in stored] for p in ("gate", "up", "down")))
    w = {n: g.weight(f"{prefix}.experts.{n}", v) for n, v in stacked.items()}
    routed = g.op("QMoE", flat, choice, w["fc1_weights"], w["fc1_scales"], "", w["fc2_weights"], w["fc2_scales"],
                  "", "", "", "", w.get("fc1_zero_points", ""), w.get("fc2_zero_points", ""), "", weigh,
                  domain=MS_DOMAIN, k=c.num_experts_per_token, activation_type="swiglu", swiglu_fusion=1,
                  activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(c.moe_renormalize),
                  expert_weight_bits=QMOE_BITS, block_size=first.block_size)
    return g.op("Mul", routed, g.const(c.routed_scaling_factor, np.float32))


def _routed_by_gather(g: GraphBuilder, flat: str, out: str, choice: str, weigh: str, moe: M.MoE, prefix: str,
                      linears: Linears) -> str:
    """out [N, D] plus each expert's output on the tokens that chose it, weighted."""
    c, I = moe.gate.c, moe.experts.w2.shape[-1]
    ids = g.op("TopK", choice, g.const([c.num_experts_per_token]), axis=-1, outputs=2)[1]     # [N, k]
    weights = g.op("GatherElements", weigh, ids, axis=1)
    if c.moe_renormalize:
        total = g.op("ReduceSum", weights, g.const([1]), keepdims=1)
        weights = g.op("Div", weights, g.op("Add", total, g.const(ROUTE_EPS, np.float32)))
    weights = g.op("Mul", weights, g.const(c.routed_scaling_factor, np.float32))
    zero = g.const(0.0, np.float32)
    for e in range(c.num_experts):
        chose = g.op("Equal", ids, g.const(e))                                               # [N, k]
        weight = g.op("ReduceSum", g.op("Where", chose, weights, zero), g.const([1]), keepdims=0)   # [N]
        hit = g.op("ReduceMax", g.op("Cast", chose, to=6), g.const([1]), keepdims=0)          # int32 [N]
        rows = g.op("Transpose", g.op("NonZero", hit), perm=[1, 0])                          # [M, 1]
        tokens = g.op("Squeeze", rows, g.const([1]))                                          # [M]
        xs = g.op("Gather", flat, tokens, axis=0)                                            # [M, D]
        names = _expert_names(prefix, e)
        gate = linears.named(g, xs, names["gate"], moe.experts.w13[e, :I])
        up = linears.named(g, xs, names["up"], moe.experts.w13[e, I:])
        y = linears.named(g, g.swiglu(gate, up), names["down"], moe.experts.w2[e])
        y = g.op("Mul", y, g.op("Unsqueeze", g.op("Gather", weight, tokens, axis=0), g.const([1])))
        out = g.op("ScatterND", out, rows, y, reduction="add")
    return out


def moe_layer(g: GraphBuilder, x: str, moe: M.MoE, prefix: str, linears: Linears) -> str:
    """x [B, T, D] normed -> routed experts + shared expert, [B, T, D]."""
    c = moe.gate.c
    if c.num_expert_group > 1:
        raise KLError(f"{prefix}: grouped routing (num_expert_group {c.num_expert_group}) is not exported to ONNX; "
                      "the released Kimi Linear routes ungrouped (num_expert_group 1)")
    flat = g.op("Reshape", x, g.const([-1, c.hidden_size]))                                # [N, D]
    router = g.weight(f"{prefix}.gate.weight_t", as_numpy(moe.gate.weight).T)
    scores = g.op("Sigmoid", g.op("MatMul", flat, router))                                 # [N, E]
    choice = g.op("Add", scores, g.weight(f"{prefix}.gate.e_score_correction_bias",
                                          as_numpy(moe.gate.e_score_correction_bias)))
    weigh = choice if moe.gate.biased else scores
    shared = swiglu_mlp(g, flat, moe.shared_experts, f"{prefix}.shared_experts", linears)
    routed = _routed_by_qmoe(g, flat, choice, weigh, moe, prefix, linears)
    out = g.op("Add", shared, routed) if routed is not None else \
        _routed_by_gather(g, flat, shared, choice, weigh, moe, prefix, linears)
    return g.op("Reshape", out, g.op("Shape", x))
