"""An MLA layer as ONNX: the latent rows of the new tokens appended to the past latent cache (the present cache
grows by T), the latents expanded to per-head keys and values through kv_b_proj, attention masked per sequence.
runtime/model.py MLAMixer.forward (the expanded form) is the math it restates.

The mask: query t of sequence b (at position position[b] + t) sees the past rows before position[b] -- rows at or
past it are another sequence's padding -- and the new rows up to itself."""
from __future__ import annotations

import numpy as np

from klconvert.onnx.graph import GraphBuilder
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.runtime import model as M


def _length(g: GraphBuilder, x: str, axis: int) -> str:
    """x.shape[axis] as an int64 scalar."""
    return g.op("Squeeze", g.op("Shape", x, start=axis, end=axis + 1), g.const([0]))


def _visible(g: GraphBuilder, past: str, x: str, position: str) -> str:
    """bool [B, 1, T, P+T]: which cache rows each new token attends to."""
    P, T = _length(g, past, 1), _length(g, x, 1)
    zero, one = g.const(0), g.const(1)
    rows = g.op("Range", zero, g.op("Add", P, T), one)                                 # [L]
    in_past = g.op("Less", rows, g.op("Unsqueeze", position, g.const([1])))          # [B, L]
    new = g.op("Sub", rows, P)                                                          # row's offset among the new
    query = g.op("Unsqueeze", g.op("Range", zero, T, one), g.const([1]))              # [T, 1]
    causal = g.op("And", g.op("GreaterOrEqual", new, zero), g.op("LessOrEqual", new, query))   # [T, L]
    return g.op("Or", g.op("Unsqueeze", in_past, g.const([1, 2])), causal)            # [B, 1, T, L]


def mla_layer(g: GraphBuilder, x: str, m: M.MLAMixer, prefix: str, linears: Linears, past: str,
              position: str) -> tuple[str, str]:
    """x [B, T, D] normed; past [B, P, r+dr] latent rows; position [B] -> (out [B, T, D], present [B, P+T, r+dr])."""
    H, dn, dr, dv, r = m.H, m.dn, m.dr, m.dv, m.r
    q = g.op("Reshape", linears.module(g, x, f"{prefix}.in_proj.q_proj", m.in_proj.q_proj),
             g.const([0, 0, H, dn + dr]))
    kv = linears.module(g, x, f"{prefix}.in_proj.kv_a_proj_with_mqa", m.in_proj.kv_a_proj_with_mqa)
    latent, k_shared = g.op("Split", kv, g.const([r, dr]), axis=-1, outputs=2)
    norm = g.weight(f"{prefix}.kv_a_layernorm.weight", as_numpy(m.kv_a_layernorm.weight))
    rows = g.op("Concat", g.rms_norm(latent, norm, m.kv_a_layernorm.eps), k_shared, axis=-1)
    present = g.op("Concat", past, rows, axis=1)                                        # [B, L, r+dr]
    c_lat, c_key = g.op("Split", present, g.const([r, dr]), axis=-1, outputs=2)
    kv_b = g.op("Reshape", linears.apply(g, c_lat, f"{prefix}.kv_b_proj", m.kv_b_proj.weight),
                g.const([0, 0, H, dn + dv]))
    k_nope, v = g.op("Split", kv_b, g.const([dn, dv]), axis=-1, outputs=2)             # [B, L, H, dn] / dv
    q_nope, q_rope = g.op("Split", q, g.const([dn, dr]), axis=-1, outputs=2)           # [B, T, H, .]
    # q . [k_nope, shared key] as two products: the shared key is one row per token for every head
    nope = g.op("MatMul", g.op("Transpose", q_nope, perm=[0, 2, 1, 3]), g.op("Transpose", k_nope, perm=[0, 2, 3, 1]))
    rope = g.op("MatMul", g.op("Transpose", q_rope, perm=[0, 2, 1, 3]),
                g.op("Unsqueeze", g.op("Transpose", c_key, perm=[0, 2, 1]), g.const([1])))
    scores = g.op("Add", nope, rope)                                                    # [B, H, T, L]
    scores = g.op("Mul", scores, g.const(m.scale, np.float32))
    masked = g.op("Where", _visible(g, past, x, position), scores, g.const(-np.inf, np.float32))
    o = g.op("MatMul", g.op("Softmax", masked, axis=-1), g.op("Transpose", v, perm=[0, 2, 1, 3]))   # [B, H, T, dv]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, H * dv]))
    return linears.module(g, o, f"{prefix}.o_proj", m.o_proj), present
