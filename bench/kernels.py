"""Check each klconvert kernel against its naive twin, then time it and its peers (fla, bitsandbytes, torch) on one GPU.

python bench/kernels.py [--only SECTION ...]: sections fla, kda, kda_prefill, drift, linear, moe, route, mla, int4,
int_prefill (default: all); the results table goes to stdout and $OUT/kernels.json. `--only int4` (a few minutes) sweeps
the int4/int8 launch shapes that matter and the row counts where each int kernel wins, and prints the defaults to set
(CROSSOVER, MOE_CROSSOVER, MOE_DECODE_LAUNCH by token count). `--only int_prefill` does the same at prefill
row counts (64-4096) for the q,k,v and o_proj GEMMs and the MoE layer (int4 sym/asym, int8), with TFLOP/s against
torch bf16 matmuls, and prints GEMM_LAUNCH, CROSSOVER's gemm bound and MOE_PREFILL_LAUNCH. `--only kda_prefill`: one
KDA layer's prefill; `--only route`: the decode router's launch shapes."""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

from klconvert.kernels.fused_moe import (DECODE_MAX_TOKENS, fused_moe, moe_decode_fwd,
                                         moe_grouped_fwd, moe_kernel, prefill_launch, repack_moe_experts)
from klconvert.kernels.int_linear import (FMA_MAX_M, gemm_launch, int_dequant_mm, int_gemm_fwd, int_gemv_fwd,
                                          int_linear, int_mma_fwd, packed_bytes, repack_int_weight, weight_class)
from klconvert.kernels.kda_chunk import kda_chunk, kda_prefill_conv
from klconvert.kernels.kda_decode import kda_decode, kda_layer_step
from klconvert.kernels.mla_decode import mla_decode, mla_decode_splits
from klconvert.kernels.moe_route import moe_router, moe_router_locks
from klconvert.kernels.naive_int_linear import dequantize_int_weight, naive_int_linear
from klconvert.kernels.naive_kda import kda_short_conv, naive_kda_chunk, naive_kda_decode, naive_kda_layer_step
from klconvert.kernels.naive_mla import naive_mla_decode, quantize_mla_cache_rows
from klconvert.kernels.naive_moe import naive_fused_moe
from klconvert.kernels.naive_moe_route import naive_moe_router
from klconvert.script_summary import script_summary

DEV = "cuda"
H, K, V, W = 32, 128, 128, 4  # KDA layer
HIDDEN, INTER, EXPERTS, TOPK = 2304, 1024, 256, 8
MLA_H, MLA_R, MLA_DR, MLA_SCALE = 32, 512, 64, 192 ** -0.5  # MLA layer: heads, latent, shared key, softmax scale
MLA_CONTEXTS = (4096, 131072, 1048576)
PREFILL_TOKENS = (32768, 131072)  # one KDA layer's prefill
CHECK_TOKENS = 4100  # checked against the reference first
LINEAR_SHAPES = {"lm_head": (163840, 2304), "o_proj": (2304, 4096), "kda_qkv": (12288, 2304),
                 "expert_w13": (2048, 2304), "expert_w2": (2304, 1024)}  # [out, in]
ROTATE_BYTES = 400e6  # copies of weights/state rotated per call, so L2 (50-60 MiB) does not serve them
rows, results, failures = [], {}, []


REP_MS = 200  # do_bench's timing window per figure; --only int4 halves it to stay within a few minutes


def median_us(fn):
    return do_bench(fn, warmup=25, rep=REP_MS, return_mode="median") * 1e3


def timed(fn, graph=True):
    """(do_bench median, per-call time inside a CUDA graph of 32 calls) in us; graph=False for code that syncs
    with the host. Small kernels are host-bound under do_bench; a graphed decode step sees the second."""
    return median_us(fn), graph_us(fn) if graph else None


def cycle(items):
    """A picker that returns the next item on each call, round and round."""
    i = [0]

    def pick():
        i[0] = (i[0] + 1) % len(items)
        return items[i[0]]
    return pick


def rotating(make, nbytes):
    """Independent copies totalling at least ROTATE_BYTES, and a picker cycling through them."""
    copies = [make() for _ in range(max(2, math.ceil(ROTATE_BYTES / nbytes)))]
    return copies, cycle(copies)


def graph_us(fn, calls=32):
    """Per-call time of `calls` back-to-back calls captured in one CUDA graph (what a graphed decode step sees)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return median_us(g.replay) / calls


def record(name, times, nbytes, peer=None, **extra):
    """times: (do_bench us, graph us or None); GB/s and peer ratios use the graph time where both have one."""
    us, gus = times
    best = gus if gus is not None else us
    results[name] = dict(us=us, graph_us=gus, GBps=nbytes / (best * 1e-6) / 1e9, bytes=nbytes, peer=peer, **extra)
    rows.append(name)
    print(f"{name}: {us:.1f} us, graph {gus if gus is None else round(gus, 1)} us, {results[name]['GBps']:.0f} GB/s",
          flush=True)


def table():
    lines = ["| what | us (do_bench) | us (CUDA graph) | GB/s | peer: its time / ours |", "|---|---|---|---|---|"]
    for name in rows:
        r = results[name]
        peer = results.get(r["peer"])
        ratio = ""
        if peer:
            both = r["graph_us"] is not None and peer["graph_us"] is not None
            ratio = f"{r['peer']}: {(peer['graph_us'] / r['graph_us']) if both else (peer['us'] / r['us']):.2f}x" \
                + ("" if both else " (do_bench)")
        g = "" if r["graph_us"] is None else f"{r['graph_us']:.1f}"
        lines.append(f"| {name} | {r['us']:.1f} | {g} | {r['GBps']:.0f} | {ratio} |")
    return "\n".join(lines)


def check(name, got, ref, bound):
    err = ((got.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()
    ok = err <= bound  # NaN fails too
    results[f"check {name}"] = dict(rel_rms=err, bound=bound, ok=ok)
    print(f"check {name}: rel. RMS {err:.3g} (bound {bound:g}) {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        failures.append(name)
    return ok


def bench_kda():
    for B in (1, 64):
        for sdt in (torch.float32, torch.bfloat16):
            C = 2 * H * K + H * V
            A_log, dt_bias = torch.randn(H, device=DEV), torch.randn(H * K, device=DEV)
            norm_w = torch.randn(V, device=DEV)
            conv_w = torch.randn(C, W, device=DEV) * 0.5
            f_b = (torch.randn(H * K, K, device=DEV) * K ** -0.5).to(torch.bfloat16)   # the gates' up-projections
            g_b = (torch.randn(H * V, K, device=DEV) * K ** -0.5).to(torch.bfloat16)
            sbytes = B * H * K * V * sdt.itemsize

            def make():
                return dict(x=torch.randn(B, C, device=DEV, dtype=torch.bfloat16),
                            conv=torch.randn(B, C, W - 1, device=DEV, dtype=torch.bfloat16),
                            f_a=torch.randn(B, K, device=DEV, dtype=torch.bfloat16),
                            beta=torch.randn(B, H, device=DEV, dtype=torch.bfloat16),
                            g_a=torch.randn(B, K, device=DEV, dtype=torch.bfloat16),
                            state=torch.randn(B, H, K, V, device=DEV).to(sdt))
            copies, pick = rotating(make, sbytes)
            c0 = copies[0]
            ref = {n: t.clone() for n, t in c0.items()}
            args = lambda c: (c["x"], c["conv"], conv_w, c["f_a"], c["beta"], c["g_a"], c["state"])
            kw = dict(f_b_weight=f_b, g_b_weight=g_b, A_log=A_log, dt_bias=dt_bias, o_norm_weight=norm_w, eps=1e-5)
            o = kda_layer_step(*args(c0), **kw)
            o_ref = naive_kda_layer_step(*args(ref), **kw)
            tag = f"kda_layer_step B={B} {str(sdt)[6:]} state"
            if not (check(tag + " o", o, o_ref, 1e-2) & check(tag + " state", c0["state"], ref["state"], 1e-2)):
                continue
            # state in and out; per row x, the conv tail in and out, f_a, g_a, beta, o; the gates' weights once
            moved = 2 * sbytes + B * (C * 2 + C * (W - 1) * 4 + 2 * K * 2 + H * 2 + H * V * 2) \
                + (f_b.numel() + g_b.numel()) * 2
            for bv, warps in ((32, 4), (32, 8), (64, 8), (64, 16), (128, 16)):
                t = timed(lambda: kda_layer_step(*args(pick()), **kw, block_v=bv, num_warps=warps))
                cfg = f" [block_v {bv}, {warps} warps]"
                record(tag + cfg, t, moved, "fla fused_recurrent_kda B=%d" % B,
                       state_GBps=2 * sbytes / ((t[1] or t[0]) * 1e-6) / 1e9)
            if sdt == torch.float32:  # the core op alone
                q = torch.randn(B, H, K, device=DEV, dtype=torch.bfloat16)
                k, g = torch.randn_like(q), torch.randn_like(q)
                v, beta = torch.randn(B, H, V, device=DEV, dtype=torch.bfloat16), torch.randn(B, H, device=DEV)
                s_ref = c0["state"].clone()
                o = kda_decode(q, k, v, g, beta, c0["state"], A_log=A_log, dt_bias=dt_bias)
                ok = check(f"kda_decode B={B} o", o, naive_kda_decode(q, k, v, g, beta, s_ref, A_log=A_log,
                                                                         dt_bias=dt_bias), 1e-2)
                if ok:
                    for bv in (16, 32, 64):
                        t = timed(lambda: kda_decode(q, k, v, g, beta, pick()["state"], A_log=A_log,
                                                     dt_bias=dt_bias, block_v=bv))
                        record(f"kda_decode B={B} fp32 state, block_v {bv}", t, 2 * sbytes,
                               f"fla fused_recurrent_kda B={B}")
            del copies


def bench_fla():
    try:
        from fla.ops.kda import fused_recurrent_kda
    except Exception as e:  # noqa: BLE001 -- the peer is optional; say why it is missing
        print("fla unavailable:", repr(e)[:200])
        return
    for B in (1, 64):
        q, k, g = (torch.randn(B, 1, H, K, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        v = torch.randn(B, 1, H, V, device=DEV, dtype=torch.bfloat16)
        beta = torch.randn(B, 1, H, device=DEV, dtype=torch.bfloat16)
        A_log, dt_bias = torch.randn(H, device=DEV), torch.randn(H * K, device=DEV)
        copies, pick = rotating(lambda: torch.randn(B, H, K, V, device=DEV), B * H * K * V * 4)
        f = lambda state=None: fused_recurrent_kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias,
                                                   initial_state=pick() if state is None else state,
                                                   output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                   use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
        state = copies[0].clone()
        o, final = f(state.clone())
        o_ref = naive_kda_decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, A_log=A_log, dt_bias=dt_bias)
        tag = f"fla fused_recurrent_kda B={B}"
        if not (check(f"{tag} o", o[:, 0], o_ref, 1e-2) & check(f"{tag} state", final, state, 1e-2)):
            continue
        record(f"fla fused_recurrent_kda B={B}", timed(f), 2 * B * H * K * V * 4)


def bench_kda_prefill():
    """One KDA layer's prefill: kda_chunk (tf32 and exact-fp32 products) and fla's chunk_kda checked against the
    chunked reference over CHECK_TOKENS tokens from a non-zero state, then timed (not the exact-fp32 one) over
    PREFILL_TOKENS with bf16 inputs, and ours with fp32 ones as bind passes them (M tokens/s in the json); then
    the layer between its projections: the short conv (Triton, PyTorch), bind's prefill modules (conv +
    recurrence), the gated norm, and at the first length the PyTorch chunked form."""
    try:
        from fla.ops.kda import chunk_kda
    except Exception as e:  # noqa: BLE001 -- the peer is optional; say why it is missing
        print("fla unavailable:", repr(e)[:200])
        chunk_kda = None
    A_log, dt_bias = torch.randn(H, device=DEV), torch.randn(H * K, device=DEV)

    def inputs(T, dtype):  # q, k, v, g (gate input), beta (logits)
        return [torch.randn(1, T, H, *d, device=DEV, dtype=dtype) for d in ((K,), (K,), (V,), (K,), ())]

    def ours(x, state, **kw):
        return kda_chunk(*x, state, A_log=A_log, dt_bias=dt_bias, **kw), state

    def fla(x, state):
        return chunk_kda(*x, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True,
                         use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    impls = {"kda_chunk": ours, "kda_chunk [ieee fp32 products]": lambda x, s: ours(x, s, precision="ieee")}
    if chunk_kda is not None:
        impls["fla chunk_kda"] = fla
    x, s0 = inputs(CHECK_TOKENS, torch.bfloat16), torch.randn(1, H, K, V, device=DEV)
    ref_state = s0.clone()
    ref = naive_kda_chunk(*x, ref_state, A_log=A_log, dt_bias=dt_bias)
    ok = {}
    for name, fn in impls.items():
        try:
            o, state = fn(x, s0.clone())
        except Exception as e:  # noqa: BLE001 -- say what failed, go on with the others
            print(f"{name}: {e!r}"[:400], flush=True)
            ok[name] = False
            failures.append(name)
            continue
        tag = f"{name} T={CHECK_TOKENS}"
        ok[name] = check(f"{tag} o", o, ref, 1e-2) & check(f"{tag} state", state, ref_state, 1e-2)
    for T in PREFILL_TOKENS:
        for dtype in (torch.bfloat16, torch.float32):
            x = inputs(T, dtype)
            nbytes = T * H * (3 * K + 2 * V + 1) * dtype.itemsize
            for name, fn in impls.items():
                # exact fp32 products: 14x slower (248 ms at 32K), checked only; fla: bind gives it bf16
                if ok[name] and "ieee" not in name and ("fla" not in name or dtype == torch.bfloat16):
                    us = median_us(lambda: fn(x, s0.clone()))
                    record(f"{name} T={T} {str(dtype)[6:]} in", (us, None), nbytes,
                           f"fla chunk_kda T={T} bfloat16 in" if "fla" not in name else None, Mtok_s=T / us)
            if T == PREFILL_TOKENS[0] and dtype == torch.float32 and ok["kda_chunk"]:
                kda_chunk_launches(x, s0, T, nbytes, ours)
            x = None
        bench_kda_prefill_layer(T, first=T == PREFILL_TOKENS[0])
        torch.cuda.empty_cache()


def kda_chunk_launches(x, s0, T, nbytes, ours):
    """kda_chunk's recurrence launch shapes (block_v, num_warps, num_stages) around the default (32, 8, 1)."""
    for bv, warps, stages in ((32, 4, 1), (64, 8, 1), (16, 8, 1)):
        name = f"kda_chunk T={T} float32 in [block_v {bv}, {warps} warps, {stages} stages]"
        kw = dict(block_v=bv, num_warps=warps, num_stages=stages)
        try:
            us = median_us(lambda: ours(x, s0.clone(), **kw))
        except triton.runtime.errors.OutOfResources as e:
            print(f"{name}: {e}", flush=True)
            continue
        record(name, (us, None), nbytes, Mtok_s=T / us)


def bench_kda_prefill_layer(T, first):
    """KDA layer between its projections at the released shapes over T tokens, random weights."""
    from klconvert.config import KimiLinearConfig
    from klconvert.presets import preset_config
    from klconvert.runtime.kernel_modules import TritonKDAChunk, kda_chunk_module
    from klconvert.runtime.model import KDAChunk, KDAMixer

    m = KDAMixer(KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", 1)), 0).to_empty(device=DEV)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    H, K, W = m.H, m.K, m.q_conv1d.weight.shape[-1]
    C, V = 3 * H * K, K
    qkv = torch.randn(1, T, C, device=DEV, dtype=torch.bfloat16)
    g_raw, gate_raw = (torch.randn(1, T, H * K, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    beta_raw = torch.randn(1, T, H, device=DEV, dtype=torch.bfloat16)
    tail, S = torch.zeros(1, C, W - 1, device=DEV, dtype=torch.bfloat16), torch.zeros(1, H, K, V, device=DEV)
    conv = m.conv_weight.reshape(C, W).contiguous()
    tag = f"KDA layer T={T}"
    record(f"{tag}: short conv, kda_prefill_conv", (median_us(lambda: kda_prefill_conv(qkv, tail, conv)), None),
           T * C * 6, f"{tag}: short conv, PyTorch")
    record(f"{tag}: short conv, PyTorch", (median_us(lambda: kda_short_conv(qkv, tail, conv)), None), T * C * 6)
    modules = {type(x).__name__: x for x in (TritonKDAChunk(m), kda_chunk_module(m))}  # + fla's where installed
    for name, module in modules.items():
        us = median_us(lambda: module(m, qkv, g_raw, beta_raw, tail, S))
        record(f"{tag}: {name} (conv + recurrence)", (us, None), T * (C * 6 + H * K * 6), Mtok_s=T / us)
    o = module(m, qkv, g_raw, beta_raw, tail, S)
    us = median_us(lambda: m.gated_norm(o, gate_raw))
    record(f"{tag}: gated norm, PyTorch", (us, None), T * H * V * 8, Mtok_s=T / us)
    if first:  # seconds per call: timed once
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        KDAChunk()(m, qkv, g_raw, beta_raw, tail, S)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) * 1e6
        record(f"{tag}: KDAChunk, PyTorch chunked form", (us, None), T * C * 6, Mtok_s=T / us)


def random_packed(n, k, bits, group=128, symmetric=True):
    """A PackedLinear from random compressed-tensors words (every int32 is a valid code word), with random packed
    zero points unless symmetric."""
    wp = torch.randint(-2**31, 2**31 - 1, (n, k * bits // 32), device=DEV, dtype=torch.int32)
    scale = (torch.rand(n, k // group, device=DEV) * 0.002 + 0.001).to(torch.bfloat16)
    zero = None if symmetric else torch.randint(-2**31, 2**31 - 1, (n * bits // 32, k // group), device=DEV,
                                                 dtype=torch.int32)
    return repack_int_weight(wp, scale, zero, (n, k), bits, group)


def bench_linear():
    for name, (n, k) in LINEAR_SHAPES.items():
        for bits in ((4, 8) if name == "lm_head" else (4,)):
            one = random_packed(n, k, bits)
            copies, pick = rotating(lambda: random_packed(n, k, bits), packed_bytes(one))
            for m in ((1, 16) if name in ("o_proj", "kda_qkv") else (1,)):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                tag = f"int{bits} linear {name} {n}x{k} M={m}"
                if not check(tag, int_linear(x, copies[0]), naive_int_linear(x, copies[0]), 1e-2):
                    continue
                moved = packed_bytes(one) + m * (k + n) * 2
                peer = f"torch bf16 {name} M={m}"
                record(tag, timed(lambda: int_linear(x, pick())), moved, peer)
                if m == 1:
                    for bn, warps, split in ((32, 4, None), (128, 8, None), (16, 4, None), (16, 2, None),
                                             (64, 4, 1), (32, 4, 4), (16, 4, 8)):
                        y = torch.empty(m, n, device=DEV, dtype=x.dtype)
                        t = timed(lambda: int_gemv_fwd(x, pick(), y, block_n=bn, split_k=split, num_warps=warps))
                        record(f"{tag} [block_n {bn}, {warps} warps, split_k {split or 'auto'}]", t, moved, peer)
            del copies
        bench_linear_peers(name, n, k)


def bench_linear_peers(name, n, k):
    for m in ((1, 16) if name in ("o_proj", "kda_qkv") else (1,)):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        copies, pick = rotating(lambda: torch.randn(n, k, device=DEV, dtype=torch.bfloat16), n * k * 2)
        record(f"torch bf16 {name} M={m}", timed(lambda: x @ pick().t()), n * k * 2 + m * (n + k) * 2)
        del copies
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
        except Exception as e:  # noqa: BLE001
            print("bitsandbytes unavailable:", repr(e)[:200])
            continue
        copies, pick = rotating(lambda: bnbf.quantize_4bit(torch.randn(n, k, device=DEV, dtype=torch.bfloat16),
                                                           blocksize=64, quant_type="nf4"), n * k // 2)
        f = lambda q=None: (lambda q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1]))(q or pick())
        want = x.float() @ bnbf.dequantize_4bit(*copies[0]).float().t()   # its own dequantized weight, in fp32
        if not check(f"bnb nf4 {name} M={m}", f(copies[0]), want, 1e-2):
            del copies
            continue
        record(f"bnb nf4 {name} M={m}", timed(f, graph=False), n * k // 2 + n * k // 64 * 4 + m * (n + k) * 2,
               f"int4 linear {name} {n}x{k} M={m}")
        del copies


def random_experts(bits=4, symmetric=True):
    """The model's MoE layer, int g128: 256 routed experts + the shared one, random code words (and zero points)."""
    words = lambda rows, cols: torch.randint(-2**31, 2**31 - 1, (rows, cols), device=DEV, dtype=torch.int32)
    sc = lambda n, k: (torch.rand(n, k // 128, device=DEV) * 0.002 + 0.001).to(torch.bfloat16)

    def ct(n, k):
        zero = {} if symmetric else {"weight_zero_point": words(n * bits // 32, k // 128)}  # packed along n
        return {"weight_packed": words(n, k * bits // 32), "weight_scale": sc(n, k), "weight_shape": (n, k), **zero}
    one = lambda: {"gate": ct(INTER, HIDDEN), "up": ct(INTER, HIDDEN), "down": ct(HIDDEN, INTER)}
    return repack_moe_experts([one() for _ in range(EXPERTS)], shared=one(), bits=bits, group_size=128)


def moe_batch(m, per_expert):
    """m decode tokens for the MoE layer: (x, 32 routings of distinct experts per token, routing weights, the bytes
    a call on the first routing moves, a picker cycling through the routings)."""
    x = torch.randn(m, HIDDEN, device=DEV, dtype=torch.bfloat16)
    routings = [torch.rand(m, EXPERTS, device=DEV).topk(TOPK).indices for _ in range(32)]
    w = torch.rand(m, TOPK, device=DEV)
    moved = (len(set(routings[0].flatten().tolist())) + 1) * per_expert + m * HIDDEN * 4
    return x, routings, w, moved, cycle(routings)


def bench_moe():
    bench_moe_peers()
    experts = random_experts()
    per_expert = sum(packed_bytes(p) for p in experts.expert(0))
    for m in (1, 4, 64, 512):
        x, routings, w, moved, ids = moe_batch(m, per_expert)
        tag = f"fused_moe int4 M={m}"
        if not check(tag, fused_moe(x, routings[0], w, experts), naive_fused_moe(x, routings[0], w, experts),
                     1e-2 if m <= 8 else 2e-2):
            continue
        peer = "torch bf16 expert loop M=1" if m == 1 else None
        graph = moe_kernel(m, 4, x.dtype) != "grouped"  # the grouped path syncs with the host
        record(tag, timed(lambda: fused_moe(x, ids(), w, experts), graph=graph), moved, peer)
        if m == 1:  # the CUDA-core decode kernel's launch shapes (--only int4 sweeps the tensor-core one)
            for bn, warps, split in ((16, 2, (1, 1)), (16, 2, (6, 4)), (16, 2, (3, 2)), (16, 4, (3, 2)),
                                     (32, 4, (6, 4)), (64, 4, (6, 4))):
                y = torch.empty_like(x)
                t = timed(lambda: moe_decode_fwd(x, ids(), w, experts, y, mma=False, block_n=bn, split_k=split,
                                                 num_warps=warps))
                record(f"{tag} [CUDA cores, block_n {bn}, {warps} warps, split_k {split}]", t, moved, peer)


def bench_route():
    """--only route: the decode router (fp32 GEMV over 256 experts + top-8, one launch) at 1 and 16 tokens over its
    launch shapes (block_e, block_d, num_warps), against torch's linear + sigmoid + topk + renormalize (each checked
    against the naive twin first); sets moe_router's defaults."""
    w = torch.randn(EXPERTS, HIDDEN, device=DEV) * HIDDEN ** -0.5
    bias = torch.randn(EXPERTS, device=DEV) * 0.1
    locks = moe_router_locks(16, DEV)
    for m in (1, 16):
        x = torch.randn(m, HIDDEN, device=DEV, dtype=torch.bfloat16)
        ref_ids, ref_wts = naive_moe_router(x, w, bias, TOPK, 2.446)
        ref_order = ref_ids.sort(-1)

        def same_choice(tag, ids, wts):
            order = ids.sort(-1)
            if not torch.equal(order.values, ref_order.values):
                failures.append(tag)
                print(f"check {tag}: FAILED (expert sets differ)", flush=True)
                return False
            return check(tag, wts.gather(1, order.indices), ref_wts.gather(1, ref_order.indices), 1e-5)

        def torch_router():
            scores = torch.sigmoid(x.float() @ w.t())
            ids = (scores + bias).topk(TOPK).indices
            wts = scores.gather(1, ids)
            return ids, wts / wts.sum(-1, keepdim=True) * 2.446
        peer = f"torch router M={m}"
        if same_choice(peer, *torch_router()):
            record(peer, timed(torch_router), w.numel() * 4)
        for block_e, block_d, warps in ((8, 256, 4), (4, 256, 4), (2, 256, 2), (4, 512, 4), (8, 256, 8),
                                        (2, 512, 4), (1, 512, 2), (4, 128, 1)):
            tag = f"moe_router M={m} [block_e {block_e}, block_d {block_d}, {warps} warps]"
            launch = dict(block_e=block_e, block_d=block_d, num_warps=warps)
            if same_choice(tag, *moe_router(x, w, bias, TOPK, 2.446, locks, **launch)):
                record(tag, timed(lambda: moe_router(x, w, bias, TOPK, 2.446, locks, **launch)), w.numel() * 4,
                       peer)


def bench_moe_peers():
    """Per-expert loops for one token (8 routed + shared), the expert ids already on the host (no sync timed)."""
    x = torch.randn(1, HIDDEN, device=DEV, dtype=torch.bfloat16)
    host = [torch.randperm(EXPERTS)[:TOPK].tolist() + [EXPERTS] for _ in range(32)]
    w = torch.rand(TOPK).tolist() + [1.0]
    n = TOPK + 1
    bf16 = [[torch.randn(s, device=DEV, dtype=torch.bfloat16) * 0.02 for s in ((INTER, HIDDEN), (INTER, HIDDEN),
                                                                                 (HIDDEN, INTER))]
            for _ in range(EXPERTS + 1)]
    routes = cycle(host)

    def loop(weights, matmul, route=None, x=x):
        y = torch.zeros_like(x)
        for e, wt in zip(route or routes(), w):
            gate, up, down = weights[e]
            y += wt * matmul(torch.nn.functional.silu(matmul(x, gate)) * matmul(x, up), down)
        return y

    def checked(name, weights, matmul, exact_matmul):   # one route against the same weights in fp32 (the loop
        return check(name, loop(weights, matmul, host[0]),     # sums nine experts in bf16: ~5e-3)
                     loop(weights, exact_matmul, host[0], x.float()), 2e-2)
    bf16_matmul = lambda a, b: a @ b.t()
    if checked("torch bf16 expert loop M=1", bf16, bf16_matmul, lambda a, b: a @ b.float().t()):
        record("torch bf16 expert loop M=1", timed(lambda: loop(bf16, bf16_matmul)), n * 3 * INTER * HIDDEN * 2)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001
        print("bitsandbytes unavailable:", repr(e)[:200])
        return
    nf4 = [[bnbf.quantize_4bit(torch.randn(s, device=DEV, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")
            for s in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))] for _ in range(EXPERTS + 1)]
    nf4_matmul = lambda a, q: bnb.matmul_4bit(a, q[0].t(), quant_state=q[1])
    if not checked("bnb nf4 expert loop M=1", nf4, nf4_matmul, lambda a, q: a @ bnbf.dequantize_4bit(*q).float().t()):
        return
    record("bnb nf4 expert loop M=1", timed(lambda: loop(nf4, nf4_matmul), graph=False), n * 3 * INTER * HIDDEN // 2,
           "fused_moe int4 M=1")

INT4_LINEAR = {"lm_head": (163840, 2304), "kda_qkv": (12288, 2304), "o_proj": (2304, 4096)}  # the --only int4 shapes
INT4_ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts of the crossover sweep


def _fastest(names):
    """The name among `names` (recorded rows) with the least graph time (do_bench where there is no graph time)."""
    best = lambda n: results[n]["graph_us"] if results[n]["graph_us"] is not None else results[n]["us"]
    return min((n for n in names if n in results), key=best, default=None)


def bench_int4_linear(defaults):
    """int_linear's kernels per shape: the M=1 launch sweep, then fma / mma / gemm / torch bf16 over INT4_ROWS."""
    crossover = {}
    for name, (n, k) in INT4_LINEAR.items():
        # int8: the lm_head (the default policy's only int8) and o_proj, a small weight (CROSSOVER[(8, "small")])
        for bits in ((4, 8) if name in ("lm_head", "o_proj") else (4,)):
            one = random_packed(n, k, bits)
            copies, pick = rotating(lambda: random_packed(n, k, bits), packed_bytes(one))
            w_ref = dequantize_int_weight(copies[0])  # the twin's weight [N, K] fp32, for every check below
            bf16, pick16 = rotating(lambda: torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02, n * k * 2)
            rows = INT4_ROWS if bits == 4 else (1, 2, 4, 16)
            winners = {}
            for m in rows:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                ref = x.float() @ w_ref.t()
                moved = packed_bytes(one) + m * (k + n) * 2
                base = f"int{bits} {name} {n}x{k} M={m}"
                peer = f"torch bf16 {name} {n}x{k} M={m}"
                record(peer, timed(lambda: x @ pick16().t()), n * k * 2 + m * (n + k) * 2)
                variants = {}  # label -> fn(packed, y)
                if m <= FMA_MAX_M:
                    variants["fma"] = lambda p, y: int_gemv_fwd(x, p, y)
                if m <= 16:
                    variants["mma"] = lambda p, y: int_mma_fwd(x, p, y)
                variants["gemm"] = lambda p, y: int_mma_fwd(x, p, y, split_k=1)
                if m == 1:  # the launch shapes that matter for decode
                    for bn, warps in ((64, 8), (128, 8)):
                        variants[f"fma [block_n {bn}, {warps} warps]"] = \
                            lambda p, y, bn=bn, warps=warps: int_gemv_fwd(x, p, y, block_n=bn, num_warps=warps)
                    for bn, warps, wa, stages, fast in ((64, 4, True, 3, None), (32, 1, True, 3, None),
                                                        (128, 4, True, 3, None), (128, 8, True, 3, None),
                                                        (64, 4, True, 4, None), (64, 4, False, 3, None),
                                                        (128, 4, False, 3, None), (64, 4, True, 3, False)):
                        if fast is False and bits != 4:
                            continue
                        label = (f"mma [block_n {bn}, {warps} warps, {stages} stages, "
                                 f"{'W' if wa else 'x'} as A{', Triton unpack' if fast is False else ''}]")
                        variants[label] = lambda p, y, bn=bn, warps=warps, wa=wa, stages=stages, fast=fast: int_mma_fwd(
                            x, p, y, block_n=bn, num_warps=warps, weights_as_a=wa, num_stages=stages, fast=fast)
                for label, fn in variants.items():
                    y = torch.empty(m, n, device=DEV, dtype=x.dtype)
                    tag = f"{base} {label}"
                    if check(tag, fn(copies[0], y), ref, 1e-2):
                        record(tag, timed(lambda: fn(pick(), y)), moved, peer)
                winners[m] = _fastest([f"{base} {kind}" for kind in ("fma", "mma", "gemm")])
            fma_max = max([m for m, w in winners.items() if w and w.endswith(" fma")], default=0)
            mma_max = max([m for m, w in winners.items() if w and not w.endswith(" gemm")], default=0)
            key, mine = (bits, weight_class(one)), (fma_max, max(mma_max, fma_max))
            # shapes of one class: each kernel only as far as it wins for all of them
            crossover[key] = tuple(min(a, b) for a, b in zip(crossover.get(key, mine), mine))
            print(f"int{bits} {name}: fastest per M {[(m, (w or '?').rsplit(' ', 1)[-1]) for m, w in winners.items()]}",
                  flush=True)
            del copies, bf16, w_ref
            torch.cuda.empty_cache()
    # "gemm" here is int_mma_fwd without split-K, which int_linear's "mma" kind runs past one row block
    defaults["kernels/int_linear.py CROSSOVER (fma, mma) bounds"] = crossover


# the tensor-core decode launches swept at every token count (block_n, split_k, num_warps), each with and without the
# RAW unpack of gate+up (x's k-tile sums given): MOE_DECODE_LAUNCH's and the ones around them
MOE_DECODE_SWEEP = ((64, (3, 2), 4), (64, (2, 1), 4), (64, (1, 1), 4), (64, (6, 4), 4), (128, (3, 2), 4),
                    (128, (1, 1), 4), (128, (3, 2), 8), (128, (1, 1), 8))
MOE_DECODE_TOKENS = (1, 2, 3, 4, 6, 8, 16)


def bench_int4_moe(defaults):
    """fused_moe's decode kernels over 1-16 tokens: the tensor-core launch sweep at each token count (the table to
    set), the CUDA-core launches at 1 token, and the grouped GEMM they hand over to."""
    experts = random_experts()
    per_expert = sum(packed_bytes(p) for p in experts.expert(0))
    mma = [dict(mma=True, block_n=bn, split_k=sk, num_warps=wp, raw=raw) for bn, sk, wp in MOE_DECODE_SWEEP
           for raw in (False, True)]
    mma.append(dict(mma=True, weights_as_a=False))
    fma = [dict(mma=False), *(dict(mma=False, block_n=bn, split_k=sk, num_warps=wp)
                              for bn, sk, wp in ((32, (6, 4), 4), (16, (3, 2), 2)))]
    best_decode, best_mma, fma_launch = {}, {}, None
    for m in (*MOE_DECODE_TOKENS, 32):
        x, routings, w, moved, ids = moe_batch(m, per_expert)
        sums = x.float().view(m, -1, 128).sum(-1)  # what the fused router writes beside h
        ref = naive_fused_moe(x, routings[0], w, experts)
        tags = {}
        options = ([dict(mma=True)] + mma if m <= DECODE_MAX_TOKENS else []) + (fma if m == 1 else [])
        for opt in options:
            tag = f"fused_moe int4 M={m} " + ("mma" if opt["mma"] else "fma") + " " + \
                ", ".join(f"{k} {v}" for k, v in opt.items() if k != "mma")
            tag = tag.rstrip()
            y = torch.empty_like(x)
            call = dict(opt, x_sums=sums) if opt["mma"] else opt  # the default launch takes RAW where its table says
            if not check(tag, moe_decode_fwd(x, routings[0], w, experts, y, **call), ref, 1e-2):
                continue
            record(tag, timed(lambda: moe_decode_fwd(x, ids(), w, experts, y, **call)), moved)
            tags[tag] = opt
        tag = f"fused_moe int4 M={m} grouped"
        if check(tag, moe_grouped_fwd(x, routings[0], w, experts, torch.empty_like(x)), ref, 2e-2):
            record(tag, timed(lambda: moe_grouped_fwd(x, ids(), w, experts, torch.empty_like(x)), graph=False), moved)
        # decode vs grouped on do_bench (the grouped path cannot be graphed); launches on graph time
        decode = _fastest(list(tags))
        best_decode[m] = "grouped" if decode is None or results[decode]["us"] > results.get(
            tag, {"us": float("inf")})["us"] else decode.split()[3]
        swept = [t for t, o in tags.items() if o["mma"] and "block_n" in o]
        if swept:
            o = tags[_fastest(swept)]
            best_mma[m] = (o["block_n"], o["split_k"], o["num_warps"], o["raw"])
        if tags.get(_fastest([t for t, o in tags.items() if o["mma"]]), {}).get("weights_as_a") is False:
            defaults[f"moe_decode_fwd weights_as_a at {m} tokens"] = False  # x as A beat every weights-as-A shape
        fastest_fma = _fastest([t for t, o in tags.items() if not o["mma"]])
        if fastest_fma:  # 1 token
            fma_launch = tags[fastest_fma]
    fma_max = max([m for m, k in best_decode.items() if k == "fma"], default=0)
    mma_max = max([m for m, k in best_decode.items() if k != "grouped"], default=0)
    defaults["kernels/fused_moe.py MOE_CROSSOVER[4]"] = (fma_max, max(fma_max, mma_max))
    table = tuple((m, launch) for i, (m, launch) in enumerate(best_mma.items())
                  if i + 1 == len(best_mma) or launch != list(best_mma.values())[i + 1])
    defaults["kernels/fused_moe.py MOE_DECODE_LAUNCH['mma'] (each bound: the last swept token count its launch "
             "was fastest at)"] = table
    if fma_launch:
        defaults["kernels/fused_moe.py MOE_DECODE_LAUNCH['fma'] (1 token)"] = "unchanged (the default)" \
            if "block_n" not in fma_launch else (*(fma_launch[k] for k in ("block_n", "split_k", "num_warps")), False)
    print("fused_moe int4: fastest per M", best_decode, flush=True)


def bench_int8_moe(defaults):
    """The int8 fused MoE's decode kernels, CUDA against tensor cores, at 1 and 2 tokens: MOE_CROSSOVER[8]."""
    experts = random_experts(bits=8)
    per_expert = sum(packed_bytes(p) for p in experts.expert(0))
    fma_max = 0
    for m in (1, 2):
        x, routings, w, moved, ids = moe_batch(m, per_expert)
        ref = naive_fused_moe(x, routings[0], w, experts)
        tags = []
        for mma in (False, True):
            tag = f"fused_moe int8 M={m} {'mma' if mma else 'fma'}"
            y = torch.empty_like(x)
            if check(tag, moe_decode_fwd(x, routings[0], w, experts, y, mma=mma), ref, 1e-2):
                record(tag, timed(lambda: moe_decode_fwd(x, ids(), w, experts, y, mma=mma)), moved)
                tags.append(tag)
        if fma_max == m - 1 and (_fastest(tags) or "").endswith(" fma"):
            fma_max = m
    defaults["kernels/fused_moe.py MOE_CROSSOVER[8]"] = (fma_max, DECODE_MAX_TOKENS)


def bench_int4():
    """--only int4: the sweeps that set CROSSOVER, MOE_CROSSOVER and MOE_DECODE_LAUNCH, then the values to set."""
    global REP_MS
    start, defaults, rep, REP_MS = time.time(), {}, REP_MS, 100
    bench_int4_linear(defaults)
    torch.cuda.empty_cache()
    bench_int4_moe(defaults)
    torch.cuda.empty_cache()
    bench_int8_moe(defaults)
    REP_MS = rep
    results["int4 defaults"] = {k: repr(v) for k, v in defaults.items()}
    print(f"\nint4 defaults, measured ({time.time() - start:.0f} s); set them in one edit:")
    for k, v in defaults.items():
        print(f"  {k} = {v}")
    print("  (int_linear decode launch: read the 'M=1 mma [...]' / 'fma [...]' rows per shape in the table below)")


PREFILL_LINEAR = {"kda_qkv": (12288, 2304), "o_proj": (2304, 4096)}  # the --only int_prefill shapes (lm_head-free)
PREFILL_ROWS = (32, 64, 128, 256, 512, 2048, 4096)  # row counts (tokens) of the sweep; the report rows: the last 3
PREFILL_SCHEMES = ((4, True), (4, False), (8, True))  # (bits, symmetric); the launch sweeps run on the first
# (block_m, block_n, num_warps, num_stages) of int_gemm_fwd, the weights as the A operand (block_n is the wgmma's M,
# 64 rows a warpgroup); moe_grouped_fwd's add weights_as_a
GEMM_SWEEP = ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4))
MOE_SWEEP = ((16, 64, 4, 3, False), (16, 64, 4, 3, True), (32, 64, 4, 3, True), (32, 128, 4, 3, False),
             (32, 128, 4, 3, True), (64, 128, 8, 3, False), (64, 128, 8, 3, True), (128, 128, 8, 3, True))


def launch_label(launch):
    label = "block_m {}, block_n {}, {} warps, {} stages".format(*launch[:4])
    return label + ("" if len(launch) == 4 else ", weights as A" if launch[4] else ", x as A")


def try_record(name, fn, ref, bound, flops, nbytes, peer):
    """Check fn() against ref, then time it (do_bench; at these sizes launch overhead is noise) with TFLOP/s; a launch
    shape too large for the SM's shared memory is reported and skipped, any other error fails the run at its end.
    The time, or None."""
    try:
        if not check(name, fn(), ref, bound):
            return None
    except triton.runtime.errors.OutOfResources as e:
        print(f"{name}: skipped ({str(e)[:120]})", flush=True)
        return None
    except Exception as e:  # noqa: BLE001 -- one launch shape failing must not lose the rest of the sweep
        print(f"{name}: FAILED {e!r}"[:300], flush=True)
        failures.append(name)
        return None
    t = median_us(fn)
    record(name, (t, None), nbytes, peer, TFLOPs=flops / (t * 1e-6) / 1e12)
    return t


def launch_table(times, rows):
    """((bound, launch), ...) in the GEMM_LAUNCH form: per row count the fastest launch, merged where it repeats."""
    table = []
    for m in rows:
        best = min((t, launch) for (launch, mm), t in times.items() if mm == m)[1]
        if table and table[-1][1] == best:
            table[-1] = (m, best)
        else:
            table.append((m, best))
    return tuple(table[:-1]) + ((1 << 62, table[-1][1]),)


def linear_bounds(winners):
    """{m: "mma" | "gemm" | "dequant"} -> CROSSOVER's (mma, gemm) bounds: each kernel as far as its unbroken run of
    wins goes (a later kind never hands back to an earlier one)."""
    order, mma_max, gemm_max = ("mma", "gemm", "dequant"), 0, 0
    stage = 0
    for m in sorted(winners):
        stage = max(stage, order.index(winners[m]))
        mma_max, gemm_max = (m if stage == 0 else mma_max), (m if stage <= 1 else gemm_max)
    return mma_max, gemm_max


def bench_prefill_linear(defaults):
    """int_linear at prefill row counts: int_mma_fwd (the decode path's tensor-core kernel, split-K while one row
    block), int_gemm_fwd over GEMM_SWEEP (int4 sym; else its default launch, and once with x as the A operand),
    int_dequant_mm, and torch bf16 on the same shape; CROSSOVER's bounds and GEMM_LAUNCH from the winners."""
    sweep, crossover = {}, {}
    for name, (n, k) in PREFILL_LINEAR.items():
        w16 = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
        for bits, sym in PREFILL_SCHEMES:
            packed = random_packed(n, k, bits, symmetric=sym)
            w_ref = dequantize_int_weight(packed)
            scheme, swept = f"int{bits} g128 {'sym' if sym else 'asym'}", (bits, sym) == PREFILL_SCHEMES[0]
            winners = {}
            for m in PREFILL_ROWS:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                ref = x.float() @ w_ref.t()
                flops, nbytes = 2 * m * n * k, packed_bytes(packed) + m * (k + n) * 2
                base, peer = f"prefill {name} {n}x{k} M={m}", f"torch bf16 {name} {n}x{k} M={m}"
                if peer not in results:  # random bf16 weights: timed, not checked
                    t = median_us(lambda: x @ w16.t())
                    record(peer, (t, None), n * k * 2 + m * (k + n) * 2, None, TFLOPs=flops / t / 1e6)
                y = torch.empty(m, n, device=DEV, dtype=x.dtype)
                times = {"mma": try_record(f"{base} {scheme} int_mma_fwd", lambda: int_mma_fwd(x, packed, y), ref,
                                           1e-2, flops, nbytes, peer),
                         "dequant": try_record(f"{base} {scheme} int_dequant_mm", lambda: int_dequant_mm(x, packed, y),
                                               ref, 1e-2, flops, nbytes, peer)}
                gemm = []
                for launch in (GEMM_SWEEP if swept else (gemm_launch(m),)):
                    bm, bn, warps, stages = launch
                    t = try_record(f"{base} {scheme} int_gemm_fwd [{launch_label(launch)}]",
                                   lambda: int_gemm_fwd(x, packed, y, block_m=bm, block_n=bn, num_warps=warps,
                                                        num_stages=stages), ref, 1e-2, flops, nbytes, peer)
                    if t is not None:
                        gemm.append(t)
                        if swept:
                            sweep[launch, name, m] = t
                times["gemm"] = min(gemm, default=None)
                if swept:
                    try_record(f"{base} {scheme} int_gemm_fwd x as A [{launch_label(gemm_launch(m))}]",
                               lambda: int_gemm_fwd(x, packed, y, weights_as_a=False), ref, 1e-2, flops, nbytes, peer)
                timed_kinds = {kind: t for kind, t in times.items() if t is not None}
                if timed_kinds:
                    winners[m] = min(timed_kinds, key=timed_kinds.get)
            print(f"prefill {name} {scheme}: fastest per M {winners}", flush=True)
            key = (bits, weight_class(packed))
            bounds = linear_bounds(winners)
            crossover[key] = tuple(min(a, b) for a, b in zip(crossover.get(key, bounds), bounds))
            packed = w_ref = None  # free them before the next scheme
        w16 = None
        torch.cuda.empty_cache()
    per_m = {}
    for (launch, _, m), t in sweep.items():  # summed over the shapes
        per_m[launch, m] = per_m.get((launch, m), 0.0) + t
    full = {key: t for key, t in per_m.items() if all((key[0], name, key[1]) in sweep for name in PREFILL_LINEAR)}
    defaults["kernels/int_linear.py GEMM_LAUNCH"] = launch_table(full, PREFILL_ROWS)
    defaults["kernels/int_linear.py CROSSOVER (mma, gemm) bounds over the swept rows (the last row: no bound)"] = \
        crossover


def bench_prefill_moe(defaults):
    """fused_moe's grouped GEMM at prefill (8 of 256 experts + shared) over MOE_SWEEP (int4 sym) or its default
    launch, per PREFILL_ROWS, against torch bf16 matmuls of the same FLOPs; MOE_PREFILL_LAUNCH from the winners."""
    times = {}
    for bits, sym in PREFILL_SCHEMES:
        experts = random_experts(bits, sym)
        scheme = f"int{bits} g128 {'sym' if sym else 'asym'}"
        for m in PREFILL_ROWS:
            x = torch.randn(m, HIDDEN, device=DEV, dtype=torch.bfloat16)
            ids = torch.rand(m, EXPERTS, device=DEV).topk(TOPK).indices
            w = torch.rand(m, TOPK, device=DEV)
            ref = naive_fused_moe(x, ids, w, experts)
            pairs = m * (TOPK + 1)
            flops = pairs * 2 * 3 * INTER * HIDDEN
            nbytes = sum(packed_bytes(p) for p in (experts.gate, experts.up, experts.down)) + m * HIDDEN * 4
            peer = f"torch bf16 matmuls, MoE FLOPs M={m}"
            if peer not in results:  # the pairs through one dense gate+up [2I, D] and down [D, I]
                a, w13 = torch.randn(pairs, HIDDEN, device=DEV, dtype=torch.bfloat16), torch.randn(
                    2 * INTER, HIDDEN, device=DEV, dtype=torch.bfloat16)
                hh, w2 = torch.randn(pairs, INTER, device=DEV, dtype=torch.bfloat16), torch.randn(
                    HIDDEN, INTER, device=DEV, dtype=torch.bfloat16)
                t = median_us(lambda: (a @ w13.t(), hh @ w2.t()))
                record(peer, (t, None), (2 * INTER * HIDDEN + HIDDEN * INTER) * 2, None, TFLOPs=flops / t / 1e6)
            y = torch.empty_like(x)
            for launch in (MOE_SWEEP if (bits, sym) == PREFILL_SCHEMES[0] else (prefill_launch(m),)):
                bm, bn, warps, stages, wa = launch
                t = try_record(f"fused_moe prefill M={m} {scheme} [{launch_label(launch)}]",
                               lambda: moe_grouped_fwd(x, ids, w, experts, y, block_m=bm, block_n=bn,
                                                       num_warps=warps, num_stages=stages, weights_as_a=wa), ref,
                               2e-2, flops, nbytes, peer)
                if t is not None and (bits, sym) == PREFILL_SCHEMES[0]:
                    times[launch, m] = t
        experts = None
        torch.cuda.empty_cache()
    defaults["kernels/fused_moe.py MOE_PREFILL_LAUNCH"] = launch_table(times, PREFILL_ROWS)


def bench_decode_unchanged():
    """The decode paths the prefill work touched (the PTX unpack helper), at the rows BENCHMARKS.md reports."""
    n, k = INT4_LINEAR["kda_qkv"]
    one = random_packed(n, k, 4)
    copies, pick = rotating(lambda: random_packed(n, k, 4), packed_bytes(one))
    for m in (1, 16):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        tag = f"int4 kda_qkv {n}x{k} M={m} int_linear (decode)"
        if check(tag, int_linear(x, copies[0]), naive_int_linear(x, copies[0]), 1e-2):
            record(tag, timed(lambda: int_linear(x, pick())), packed_bytes(one) + m * (k + n) * 2)
    del copies
    experts = random_experts()
    per_expert = sum(packed_bytes(p) for p in experts.expert(0))
    for m in (1, 16):
        x, routings, w, moved, ids = moe_batch(m, per_expert)
        tag = f"fused_moe int4 M={m} (decode)"
        if check(tag, fused_moe(x, routings[0], w, experts), naive_fused_moe(x, routings[0], w, experts), 1e-2):
            record(tag, timed(lambda: fused_moe(x, ids(), w, experts)), moved)


def bench_prefill():
    """--only int_prefill: int_linear and fused_moe at prefill row counts, launch sweeps, the peers, the defaults to
    set."""
    global REP_MS
    start, defaults, rep, REP_MS = time.time(), {}, REP_MS, 100
    bench_prefill_moe(defaults)
    bench_prefill_linear(defaults)
    bench_decode_unchanged()
    REP_MS = rep
    results["prefill defaults"] = {k: repr(v) for k, v in defaults.items()}
    print(f"\nprefill defaults, measured ({time.time() - start:.0f} s):")
    for k, v in defaults.items():
        print(f"  {k} = {v}")


def bf16_state_drift(steps=4096, B=1):
    """Relative RMS of o (last 64 steps) and the state: bf16 state vs fp32 state over `steps` decode steps."""
    A_log, dt_bias = torch.randn(H, device=DEV), torch.randn(H * K, device=DEV)
    s32 = torch.randn(B, H, K, V, device=DEV) * 0.1
    s16 = s32.to(torch.bfloat16)
    o32, o16 = [], []
    for _ in range(steps):
        q, k, g = (torch.randn(B, H, K, device=DEV) for _ in range(3))
        v, beta = torch.randn(B, H, V, device=DEV), torch.randn(B, H, device=DEV)
        o32.append(kda_decode(q, k, v, g, beta, s32, A_log=A_log, dt_bias=dt_bias))
        o16.append(kda_decode(q, k, v, g, beta, s16, A_log=A_log, dt_bias=dt_bias))
    rel = lambda a, b: ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    results["bf16 state drift"] = dict(steps=steps, o_rel_rms=rel(torch.stack(o16[-64:]), torch.stack(o32[-64:])),
                                       state_rel_rms=rel(s16.float(), s32))
    print("bf16 state drift:", results["bf16 state drift"], flush=True)


def mla_peer(q_lat, q_rope, cache, cache_scale, n):
    """Plain PyTorch absorbed decode over the same cache (runtime/model.py's LatentAttention einsums) in bf16, fp32
    softmax; an fp8 cache is dequantized to bf16 first."""
    rows = cache[:, :n].to(torch.bfloat16)
    if cache_scale is not None:
        rows = rows * cache_scale[:, :n, None].to(torch.bfloat16)
    c_lat, k_rope = rows.split([MLA_R, MLA_DR], dim=-1)
    scores = (torch.einsum("bhr,blr->bhl", q_lat, c_lat) + torch.einsum("bhd,bld->bhl", q_rope, k_rope)).float()
    p = (scores * MLA_SCALE).softmax(dim=-1)
    return torch.einsum("bhl,blr->bhr", p.to(torch.bfloat16), c_lat).float()


def bench_mla():
    """mla_decode at batch 1 over 4K / 128K / 1M tokens, bf16 and fp8 caches; launch variants at 1M; the peer."""
    q_lat = torch.randn(1, MLA_H, MLA_R, device=DEV, dtype=torch.bfloat16)
    q_rope = torch.randn(1, MLA_H, MLA_DR, device=DEV, dtype=torch.bfloat16)
    for n in MLA_CONTEXTS:
        lengths = torch.tensor([n], dtype=torch.int32, device=DEV)
        for fp8 in (False, True):
            def make():  # (cache, cache_scale or None)
                rows = torch.randn(1, n, MLA_R + MLA_DR, device=DEV, dtype=torch.bfloat16)
                return quantize_mla_cache_rows(rows) if fp8 else (rows, None)

            def call(copy=None, **launch):  # the next rotating copy, or the given one
                cache, cache_scale = copy or pick()
                return mla_decode(q_lat, q_rope, cache, lengths, MLA_SCALE, cache_scale, **launch)

            nbytes = n * (MLA_R + MLA_DR) * (1 if fp8 else 2) + (n * 4 if fp8 else 0)  # the cache (+ scales) read
            copies, pick = rotating(make, nbytes)
            kind = f"B=1 ctx={n} {'fp8' if fp8 else 'bf16'} cache"
            tag, peer = f"mla_decode {kind}", f"torch absorbed MLA {kind}"
            cache, cache_scale = copies[0]
            ref = naive_mla_decode(q_lat, q_rope, cache, lengths, MLA_SCALE, cache_scale)  # [1, H, R] fp32

            def checked(name, **launch):
                return check(name, call(copies[0], **launch), ref, 5e-3)
            peer_ok = check(peer, mla_peer(q_lat, q_rope, *copies[0], n), ref, 3e-2)
            if checked(tag):
                record(tag, timed(call), nbytes, peer)
                if n == MLA_CONTEXTS[-1]:
                    mla_variants(tag, call, checked, nbytes, peer, fp8)
            if peer_ok:
                record(peer, timed(lambda: mla_peer(q_lat, q_rope, *pick(), n)), nbytes)
            copies = cache = cache_scale = None  # free them before the next context
            torch.cuda.empty_cache()


def mla_variants(tag, call, checked, nbytes, peer, fp8):
    """Launch shapes around the defaults (kernels/mla_decode.py LAUNCHES), the scores with tokens as the M dim (bf16:
    the one spill-free shape for it), and the split count (waves of programs); each checked before it is timed."""
    shapes = [(32, 32, 8, 2), (32, 32, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2), (32, 64, 16, 2),
              (16, 64, 4, 2), (16, 32, 4, 3)]  # (block_h, block_n, num_warps, num_stages)
    variants = {f"block_h {h}, block_n {n}, {w} warps, {st} stages": dict(block_h=h, block_n=n, num_warps=w,
                                                                          num_stages=st) for h, n, w, st in shapes}
    if not fp8:
        variants["scores tokens-as-M, block_n 128, 8 warps, 2 stages"] = dict(block_n=128, num_warps=8, num_stages=2,
                                                                              qk_tokens_as_m=True)
    for waves in (2, 4, 8):
        S = mla_decode_splits(1, MLA_H, MLA_CONTEXTS[-1], DEV, waves=waves)
        variants[f"{waves} waves: {S} splits"] = dict(num_splits=S)
    for what, launch in variants.items():
        name = f"{tag} [{what}]"
        if checked(name, **launch):
            record(name, timed(lambda: call(**launch)), nbytes, peer)


def copy_ceiling():
    a = torch.randn(1 << 29, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    record("device copy (read + write)", (median_us(lambda: b.copy_(a)), None), 2 * a.numel() * 2)


SECTIONS = {"fla": bench_fla, "kda": bench_kda, "kda_prefill": bench_kda_prefill, "drift": bf16_state_drift,
            "linear": bench_linear, "moe": bench_moe, "route": bench_route, "mla": bench_mla, "int4": bench_int4,
            "int_prefill": bench_prefill}


def main():
    parser = argparse.ArgumentParser(description=script_summary(__file__))
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run this section (repeatable)")
    sections = parser.parse_args().only or list(SECTIONS)
    info = dict(card=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip())
    print(info, flush=True)
    results["info"] = info
    copy_ceiling()
    for s in sections:
        SECTIONS[s]()
        torch.cuda.empty_cache()
    print("\n" + table())
    out = os.environ.get("OUT")
    if out:
        json.dump(results, open(os.path.join(out, "kernels.json"), "w"), indent=1)
    if failures:
        print("FAILED checks:", failures)
        sys.exit(1)


if __name__ == "__main__":
    main()
