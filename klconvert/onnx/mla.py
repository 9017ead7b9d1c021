"""An MLA layer as ONNX: the latent rows of the new tokens written into the latent cache at their positions (row j
of sequence b holds its token at position j; the cache grows to the furthest position written), then attended in
one of two forms, an If on the call's tokens per sequence:
- one (a decode step): absorbed, kv_b_proj folded into the query and the output, so every cached row is read as it
  is (MQA over its r+dr values), as runtime/model.py MLAMixer.decode and LatentAttention do. Expanding the rows
  instead cost each step an [L, r] x [r, H*(dn+dv)] product, growing with the context;
- more (a prefill): KEY_BLOCK rows at a time in a Loop -- each block expanded to per-head keys and values through
  kv_b_proj, masked per sequence (the token at position p sees rows 0..p), the blocks merged by a running max and
  sum -- as runtime/model.py PrefillAttention does, and for its reason: per query-key pair the absorbed form does
  3.4x the work.
StateBuffers.write_mla_at is the cache write it restates."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from klconvert.onnx.export_folder import KEY_BLOCK_GRAPH
from klconvert.onnx.graph import FLOAT, GraphBuilder
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.runtime import model as M

# Cached rows a prefill call's queries attend at once. Built whole, one call's scores [B, H, tokens, keys] grew with the
# square of the prompt (4,000 tokens of the bundled model peaked at 1.5 GB); by blocks, a call's workspace is bounded
# by the block and its tokens at any context. Smaller than the runtime's MLA_KEY_BLOCK: onnxruntime writes each score
# tensor out, several times over, where SDPA's fused kernels keep tiles. genai_config.json records it, which OnnxEngine
# sizes its prefill calls by.
KEY_BLOCK = 1024


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


def _key_block_body(g: GraphBuilder, m: M.MLAMixer, prefix: str, linears: Linears, q_nope: str, q_rope: str,
                    present: str, at: str):
    """The Loop body attending block i of `present`'s rows (outer-scope q_nope [B, H, T, dn], q_rope [B, H, T, dr],
    present [B, L, r+dr], at [B, T]), carrying the running max [B, H, T, 1], sum [B, H, T, 1] and unnormalized
    output [B, H, T, dv] of the blocks before: rescaled to the new max, the block's terms added. Block 0 holds row 0,
    which every token sees, so the max is finite from the first block on (exp(-inf - max) = 0, never NaN)."""
    b = g.body()
    H, dn, dr, dv, r = m.H, m.dn, m.dr, m.dv, m.r
    first = b.op("Mul", b.op("Unsqueeze", "i", b.const([0])), b.const([KEY_BLOCK]))            # [1]
    rows = b.op("Slice", present, first, b.op("Add", first, b.const([KEY_BLOCK])), b.const([1]))  # [B, n, r+dr]
    c_lat, c_key = b.op("Split", rows, b.const([r, dr]), axis=-1, outputs=2)
    kv_b = b.op("Reshape", linears.apply(b, c_lat, f"{prefix}.kv_b_proj", m.kv_b_proj.weight),
                b.const([0, 0, H, dn + dv]))
    k_nope, v = b.op("Split", kv_b, b.const([dn, dv]), axis=-1, outputs=2)             # [B, n, H, dn] / dv
    # q . [k_nope, shared key] as two products: the shared key is one row per token for every head
    nope = b.op("MatMul", q_nope, b.op("Transpose", k_nope, perm=[0, 2, 3, 1]))
    rope = b.op("MatMul", q_rope, b.op("Unsqueeze", b.op("Transpose", c_key, perm=[0, 2, 1]), b.const([1])))
    scores = b.op("Mul", b.op("Add", nope, rope), b.const(m.scale, np.float32))         # [B, H, T, n]
    keys = b.op("Range", b.op("Squeeze", first, b.const([0])),
                b.op("Squeeze", b.op("Add", first, b.op("Shape", rows, start=1, end=2)), b.const([0])), b.const(1))
    visible = b.op("Unsqueeze", b.op("LessOrEqual", keys, b.op("Unsqueeze", at, b.const([-1]))), b.const([1]))
    scores = b.op("Where", visible, scores, b.const(-np.inf, np.float32))
    top = b.op("Max", "top", b.op("ReduceMax", scores, b.const([-1]), keepdims=1))
    kept = b.op("Exp", b.op("Sub", "top", top))                                         # the blocks before, rescaled
    p = b.op("Exp", b.op("Sub", scores, top))
    total = b.op("Add", b.op("Mul", "total", kept), b.op("ReduceSum", p, b.const([-1]), keepdims=1))
    o = b.op("Add", b.op("Mul", "o", kept), b.op("MatMul", p, b.op("Transpose", v, perm=[0, 2, 1, 3])))
    for name, value in (("go_out", "go"), ("top_out", top), ("total_out", total), ("o_out", o)):
        b.nodes.append(helper.make_node("Identity", [value], [name]))
    carried = [helper.make_tensor_value_info(n, FLOAT, [None] * 4) for n in ("top", "total", "o")]
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("go", TensorProto.BOOL, []), *carried]
    outputs = [helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
               *(helper.make_tensor_value_info(f"{v.name}_out", FLOAT, [None] * 4) for v in carried)]
    return helper.make_graph(b.nodes, KEY_BLOCK_GRAPH, inputs, outputs)


def _attend_expanded(g: GraphBuilder, m: M.MLAMixer, prefix: str, linears: Linears, q: str, present: str,
                     at: str) -> str:
    """q [B, T, H, dn+dr] of the tokens at positions at [B, T] over present [B, L, r+dr] -> o [B, H, T, dv], in
    ceil(L / KEY_BLOCK) trips of _key_block_body."""
    q_nope, q_rope = (g.op("Transpose", part, perm=[0, 2, 1, 3])
                      for part in g.op("Split", q, g.const([m.dn, m.dr]), axis=-1, outputs=2))   # [B, H, T, .]
    trips = g.op("Squeeze", g.op("Div", g.op("Add", _length(g, present, 1), g.const([KEY_BLOCK - 1])),
                                 g.const([KEY_BLOCK])), g.const([0]))
    per_token = g.op("Concat", g.op("Shape", q_nope, end=3), g.const([1]), axis=0)     # [B, H, T, 1]
    per_value = g.op("Concat", g.op("Shape", q_nope, end=3), g.const([m.dv]), axis=0)  # [B, H, T, dv]
    start = [g.op("Expand", g.const(-np.inf, np.float32), per_token),
             g.op("Expand", g.const(0.0, np.float32), per_token), g.op("Expand", g.const(0.0, np.float32), per_value)]
    _, total, o = g.op("Loop", trips, "", *start, outputs=3,   # no condition: every trip runs
                       body=_key_block_body(g, m, prefix, linears, q_nope, q_rope, present, at))
    return g.op("Div", o, total)


def _attend_absorbed(g: GraphBuilder, m: M.MLAMixer, prefix: str, linears: Linears, q: str, present: str,
                     at: str) -> str:
    """q [B, 1, H, dn+dr], one token per sequence at positions at [B, 1], over present [B, L, r+dr] -> o [B, H, 1,
    dv]: q_nope through kv_b's key half (w_uk) scores the latent part of each row, q_rope its shared key; the
    weighted rows' latent part goes out through kv_b's value half (w_uv). Every row at once: the scores [B, H, L]
    are H / (r+dr) of the rows read. The rows are the products' left operand as they lie: transposed, they would be
    copied whole each step."""
    H, dn, dr, r = m.H, m.dn, m.dr, m.r
    kv_b = linears.as_floats(f"{prefix}.kv_b_proj", m.kv_b_proj.weight).reshape(H, dn + m.dv, r)
    w_uk = g.weight(f"{prefix}.kv_b_proj.w_uk", kv_b[:, :dn])                              # [H, dn, r]
    w_uv_t = g.weight(f"{prefix}.kv_b_proj.w_uv_t", kv_b[:, dn:].transpose(0, 2, 1))       # [H, r, dv]
    q_nope, q_rope = g.op("Split", g.op("Reshape", q, g.const([0, H, dn + dr])), g.const([dn, dr]), axis=-1,
                          outputs=2)                                                     # [B, H, dn] / dr
    q_lat = g.op("Transpose", g.op("MatMul", g.op("Transpose", q_nope, perm=[1, 0, 2]), w_uk), perm=[1, 0, 2])
    q_rows = g.op("Transpose", g.op("Concat", q_lat, q_rope, axis=-1), perm=[0, 2, 1])   # [B, r+dr, H]
    scores = g.op("Transpose", g.op("MatMul", present, q_rows), perm=[0, 2, 1])           # [B, H, L]
    keys = g.op("Range", g.const(0), g.op("Squeeze", _length(g, present, 1), g.const([0])), g.const(1))
    visible = g.op("Unsqueeze", g.op("LessOrEqual", keys, at), g.const([1]))              # [B, 1, L]
    scores = g.op("Where", visible, g.op("Mul", scores, g.const(m.scale, np.float32)), g.const(-np.inf, np.float32))
    rows = g.op("MatMul", g.op("Softmax", scores, axis=-1), present)                      # [B, H, r+dr]
    o_lat = g.op("Slice", rows, g.const([0]), g.const([r]), g.const([-1]))                # [B, H, r]
    o = g.op("MatMul", g.op("Transpose", o_lat, perm=[1, 0, 2]), w_uv_t)                 # [H, B, dv]
    return g.op("Unsqueeze", g.op("Transpose", o, perm=[1, 0, 2]), g.const([2]))


def _branch(g: GraphBuilder, name: str, form, *args) -> onnx.GraphProto:
    """An If branch: a subgraph of `g` whose one output is form(branch builder, *args) [B, H, T, dv]."""
    b = g.body()
    out = form(b, *args)
    b.nodes.append(helper.make_node("Identity", [out], [f"{name}_o"]))
    return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(f"{name}_o", FLOAT, [None] * 4)])


def _attend(g: GraphBuilder, m: M.MLAMixer, prefix: str, linears: Linears, q: str, present: str, at: str) -> str:
    """q [B, T, H, dn+dr] of the tokens at positions at [B, T] over present [B, L, r+dr] -> o [B, H, T, dv]:
    absorbed for one token per sequence, else expanded by key blocks (the module docstring says why)."""
    one_token = g.op("Equal", _length(g, q, 1), g.const([1]))
    args = (m, prefix, linears, q, present, at)
    return g.op("If", one_token, then_branch=_branch(g, g.fresh(f"{prefix}.absorbed"), _attend_absorbed, *args),
                else_branch=_branch(g, g.fresh(f"{prefix}.expanded"), _attend_expanded, *args))


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
    o = _attend(g, m, prefix, linears, q, present, at)                                  # [B, H, T, dv]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, H * dv]))
    return linears.module(g, o, f"{prefix}.o_proj", m.o_proj), present
