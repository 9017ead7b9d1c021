"""A KDA layer as ONNX: input projections, the causal short conv over [conv tail, tokens], l2norm, the gate, the
delta rule as a Scan over the tokens (the recurrent state carried), the gated output norm, o_proj.
runtime/model.py KDAMixer.forward is the math it restates; runtime/kda.py kda_step the Scan body."""
from __future__ import annotations

import numpy as np
from onnx import helper

from klconvert.kernels.naive_kda import L2NORM_EPS, kda_q_scale
from klconvert.onnx.graph import FLOAT, GraphBuilder
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.runtime import model as M



def _l2norm(g: GraphBuilder, x: str) -> str:
    ss = g.op("ReduceSum", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    return g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ss, g.const(L2NORM_EPS, np.float32)))))


def delta_rule_body(g: GraphBuilder) -> object:
    """One token of the delta rule, S [B, H, K, V]; q, k, g [B, H, K]; v [B, H, V]; beta [B, H]:
    S = exp(g) S;  u = beta (v - S^T k);  S += k u^T;  o = S^T q."""
    b = g.body()
    names = ["S", "q_t", "k_t", "v_t", "g_t", "beta_t"]
    last = b.const([-1])
    s = b.op("Mul", "S", b.op("Unsqueeze", b.op("Exp", "g_t"), last))
    k_col = b.op("Unsqueeze", "k_t", last)                                            # [B, H, K, 1]
    s_k = b.op("ReduceSum", b.op("Mul", s, k_col), b.const([2]), keepdims=0)          # [B, H, V]
    u = b.op("Mul", b.op("Unsqueeze", "beta_t", last), b.op("Sub", "v_t", s_k))
    s = b.op("Add", s, b.op("Mul", k_col, b.op("Unsqueeze", u, b.const([-2]))))
    o = b.op("ReduceSum", b.op("Mul", s, b.op("Unsqueeze", "q_t", last)), b.const([2]), keepdims=0)
    b.nodes.append(helper.make_node("Identity", [s], ["S_out"]))
    b.nodes.append(helper.make_node("Identity", [o], ["o_t"]))
    ranks = {"S": 4, "q_t": 3, "k_t": 3, "v_t": 3, "g_t": 3, "beta_t": 2}
    inputs = [helper.make_tensor_value_info(n, FLOAT, [None] * ranks[n]) for n in names]
    outputs = [helper.make_tensor_value_info("S_out", FLOAT, [None] * 4),
               helper.make_tensor_value_info("o_t", FLOAT, [None] * 3)]
    return helper.make_graph(b.nodes, "kda_delta_rule", inputs, outputs)


def kda_layer(g: GraphBuilder, x: str, m: M.KDAMixer, prefix: str, linears: Linears, past_state: str,
              past_tail: str) -> tuple[str, str, str]:
    """x [B, T, D] normed; past_state [B, H, K, V], past_tail [B, 3HK, W-1] -> (out [B, T, D], state, tail)."""
    H, K = m.H, m.K
    W = m.q_conv1d.weight.shape[-1]
    proj = {n: linears.module(g, x, f"{prefix}.in_proj.{n}", getattr(m.in_proj, n)) for n in m.in_proj.order}
    qkv = g.op("Concat", proj["q_proj"], proj["k_proj"], proj["v_proj"], axis=-1)        # [B, T, 3HK]
    xt = g.op("Concat", past_tail, g.op("Transpose", qkv, perm=[0, 2, 1]), axis=2)      # [B, 3HK, W-1+T]
    tail = g.op("Slice", xt, g.const([-(W - 1)]), g.const([np.iinfo(np.int64).max]), g.const([2]))
    conv = g.op("Conv", xt, g.weight(f"{prefix}.conv_weight", as_numpy(m.conv_weight)), group=3 * H * K)
    qkv = g.op("Transpose", g.silu(conv), perm=[0, 2, 1])                               # [B, T, 3HK]
    q, k, v = (g.op("Reshape", t, g.const([0, 0, H, K])) for t in g.op("Split", qkv, axis=2, num_outputs=3, outputs=3))
    q = g.op("Mul", _l2norm(g, q), g.const(kda_q_scale(K), np.float32))
    k = _l2norm(g, k)
    g_raw = linears.module(g, proj["f_a_proj"], f"{prefix}.f_b_proj", m.f_b_proj)
    g_raw = g.op("Add", g_raw, g.weight(f"{prefix}.dt_bias", as_numpy(m.dt_bias)))
    neg_a = g.weight(f"{prefix}.neg_exp_A", -np.exp(as_numpy(m.A_log).reshape(H, 1)))
    decay = g.op("Mul", g.op("Softplus", g.op("Reshape", g_raw, g.const([0, 0, H, K]))), neg_a)   # [B, T, H, K]
    beta = g.op("Sigmoid", proj["b_proj"])                                              # [B, T, H]
    state, o = g.op("Scan", past_state, q, k, v, decay, beta, outputs=2, body=delta_rule_body(g),
                    num_scan_inputs=5, scan_input_axes=[1] * 5, scan_output_axes=[1])   # o [B, T, H, V]
    gate = g.op("Reshape", linears.module(g, proj["g_a_proj"], f"{prefix}.g_b_proj", m.g_b_proj),
                g.const([0, 0, H, K]))
    normed = g.rms_norm(o, g.weight(f"{prefix}.o_norm.weight", as_numpy(m.o_norm.weight)), m.eps)
    gated = g.op("Reshape", g.op("Mul", normed, g.op("Sigmoid", gate)), g.const([0, 0, H * K]))
    return linears.module(g, gated, f"{prefix}.o_proj", m.o_proj), state, tail
