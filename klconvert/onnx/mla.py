"""An MLA layer as ONNX: the latent rows of the new tokens written into the latent cache at their positions (row j
of sequence b holds its token at position j; the cache grows to the furthest position written), expanded to per-head
keys and values through kv_b_proj, attention masked per sequence: the token at position p sees rows 0..p.
runtime/model.py MLAMixer.forward (the expanded form) and StateBuffers.write_mla_at are the math it restates."""
from __future__ import annotations

import numpy as np

from klconvert.onnx.graph import GraphBuilder
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.runtime import model as M


def _length(g: GraphBuilder, x: str, axis: int) -> str:
    """x.shape[axis] as an int64 [1]."""
    return g.op("Shape", x, start=axis, end=axis + 1)


def _write_rows(g: GraphBuilder, past: str, rows: str, position: str) -> tuple[str, str]:
    """past [B, P, W], rows [B, T, W] of the tokens at position[b] + t -> (present [B, max(P, furthest), W] with
    the rows written in, the new tokens' positions [B, T])."""
    T = _length(g, rows, 1)
    zero, one = g.const(0), g.const(1)
    at = g.op("Add", g.op("Unsqueeze", position, g.const([1])),
              g.op("Unsqueeze", g.op("Range", zero, g.op("Squeeze", T, g.const([0])), one), g.const([0])))   # [B, T]
    length = g.op("Max", _length(g, past, 1), g.op("Add", g.op("ReduceMax", position, g.const([0]), keepdims=1), T))
    pads = g.op("Concat", g.const([0, 0, 0, 0]), g.op("Sub", length, _length(g, past, 1)), g.const([0]), axis=0)
    batch = g.op("Range", zero, g.op("Squeeze", _length(g, rows, 0), g.const([0])), one)                 # [B]
    b = g.op("Expand", g.op("Unsqueeze", batch, g.const([1])), g.op("Shape", at))                        # [B, T]
    index = g.op("Concat", g.op("Unsqueeze", b, g.const([-1])), g.op("Unsqueeze", at, g.const([-1])), axis=-1)
    return g.op("ScatterND", g.op("Pad", past, pads), index, rows), at


def _visible(g: GraphBuilder, present: str, at: str) -> str:
    """bool [B, 1, T, L]: row j is visible to the token at position at[b, t] when j <= at[b, t]."""
    rows = g.op("Range", g.const(0), g.op("Squeeze", _length(g, present, 1), g.const([0])), g.const(1))   # [L]
    return g.op("Unsqueeze", g.op("LessOrEqual", rows, g.op("Unsqueeze", at, g.const([-1]))), g.const([1]))


def mla_layer(g: GraphBuilder, x: str, m: M.MLAMixer, prefix: str, linears: Linears, past: str,
              position: str) -> tuple[str, str]:
    """x [B, T, D] normed; past [B, P, r+dr] latent rows; position [B] of x[:, 0] -> (out [B, T, D],
    present [B, L, r+dr])."""
    H, dn, dr, dv, r = m.H, m.dn, m.dr, m.dv, m.r
    q = g.op("Reshape", linears.module(g, x, f"{prefix}.in_proj.q_proj", m.in_proj.q_proj),
             g.const([0, 0, H, dn + dr]))
    kv = linears.module(g, x, f"{prefix}.in_proj.kv_a_proj_with_mqa", m.in_proj.kv_a_proj_with_mqa)
    latent, k_shared = g.op("Split", kv, g.const([r, dr]), axis=-1, outputs=2)
    norm = g.weight(f"{prefix}.kv_a_layernorm.weight", as_numpy(m.kv_a_layernorm.weight))
    rows = g.op("Concat", g.rms_norm(latent, norm, m.kv_a_layernorm.eps), k_shared, axis=-1)
    present, at = _write_rows(g, past, rows, position)                                  # [B, L, r+dr]
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
    masked = g.op("Where", _visible(g, present, at), scores, g.const(-np.inf, np.float32))
    o = g.op("MatMul", g.op("Softmax", masked, axis=-1), g.op("Transpose", v, perm=[0, 2, 1, 3]))   # [B, H, T, dv]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, H * dv]))
    return linears.module(g, o, f"{prefix}.o_proj", m.o_proj), present
