"""Compiles every decode kernel as it launches with PDL on an H100/H200 (sm_90) -- no GPU needed: the wrappers run on
CPU tensors with PDL forced on, each launch is compiled instead of run -- and prints, per kernel, where in its PTX
the first global memory access, the wait (griddepcontrol.wait) and the let-go (griddepcontrol.launch_dependents)
are, as JSON. Run by tests/kernels/test_pdl.py in a process without Triton's interpreter.

    python tests/kernels/pdl_ptx.py
"""
from __future__ import annotations

import json
import re

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from klconvert.kernels import fused_moe, int_linear, kda_decode, mla_cache, mla_decode, moe_route, rms_norm

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}
MEMORY = re.compile(r"\b(ld\.global|st\.global|atom\.|red\.|cp\.async|cp\.reduce)")
L2_LOAD = re.compile(r"\bld\.global\.cg\b")  # a load past L1 (what a kernel two launches back wrote)
OPTIONS = ("num_warps", "num_stages", "launch_pdl")
found: dict[str, dict] = {}


def compile_launch(fn: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: compiles the launch for TARGET and records its PTX landmarks."""
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    signature, constexprs = {}, {}
    for p in fn.params:
        value = bound[p.name]
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            signature[p.name] = "fp32"
    options = {k: v for k, v in kwargs.items() if k in OPTIONS}
    ptx = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options).asm["ptx"]
    lines = ptx.splitlines()

    def first(pattern):
        return next((i for i, line in enumerate(lines) if re.search(pattern, line)), None)

    variant = ", ".join(f"{k}={v}" for k, v in constexprs.items()
                        if k in ("GATED", "MMA", "FP8", "DENSE", "PREFETCH", "AFTER", "RAW"))
    key = f"{fn.fn.__name__}[{variant}]"
    memory = [i for i, line in enumerate(lines) if MEMORY.search(line)]
    found[key] = {"launch_pdl": bool(kwargs.get("launch_pdl")), "first_memory_op": first(MEMORY),
                  "first_memory_op_past_l2_loads": next((i for i in memory if not L2_LOAD.search(lines[i])), None),
                  "wait": first(r"griddepcontrol\.wait"),
                  "launch_dependents": first(r"griddepcontrol\.launch_dependents"),
                  "prefetches": sum("prefetch.global.L2" in line for line in lines)}


def compressed(n: int, k: int, bits: int, asym: bool) -> dict:
    """A random [n, k] linear as compressed-tensors stores it (pack-quantized, groups of 128)."""
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int64)
    words = (codes.view(n, k * bits // 32, 32 // bits) << torch.arange(0, 32, bits)).sum(-1)
    out = {"weight_packed": torch.where(words >= 2**31, words - 2**32, words).to(torch.int32),
           "weight_scale": torch.rand(n, k // 128, dtype=torch.bfloat16), "weight_shape": torch.tensor([n, k])}
    if asym:
        out["weight_zero_point"] = (torch.randint(0, 2**bits, (n, k // 128)) - 2**(bits - 1)).to(torch.int8)
    return out


def launch_every_decode_kernel() -> None:
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    for bits, asym in ((4, False), (8, True)):
        t = compressed(128, 256, bits, asym)
        p = int_linear.repack_int_weight(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"),
                                         t["weight_shape"], bits, 128)
        int_linear.int_mma_fwd(x, p, torch.empty(1, 128, dtype=torch.bfloat16))
        if bits == 8:  # PDL without the prefetch, as a weight larger than half the L2 runs (pdl.prefetch_fits)
            int_linear.int_mma_fwd(x, p, torch.empty(1, 128, dtype=torch.bfloat16), prefetch=False)
        if bits == 4:  # with a dense tail (a projection group's unquantized members)
            int_linear.int_mma_fwd(x, p, torch.empty(1, 128 + 40, dtype=torch.bfloat16),
                                   dense=torch.randn(40, 256, dtype=torch.bfloat16),
                                   locks=int_linear.dense_locks(p, 40))
        int_linear.int_gemv_fwd(x, p, torch.empty(1, 128, dtype=torch.bfloat16))
    expert = {"gate": compressed(128, 256, 4, False), "up": compressed(128, 256, 4, False),
              "down": compressed(256, 128, 4, False)}
    experts = fused_moe.repack_moe_experts([expert] * 3, shared=expert, bits=4, group_size=128)
    ids, weights = torch.tensor([[0, 2]]), torch.rand(1, 2)
    fused_moe.moe_decode_fwd(x, ids, weights, experts, torch.empty_like(x), mma=True)
    fused_moe.moe_decode_fwd(x, ids, weights, experts, torch.empty_like(x), mma=True,
                             after=torch.zeros(1000, dtype=torch.int32))  # a later launch's weight too
    fused_moe.moe_decode_fwd(x.float(), ids, weights, experts, torch.empty(1, 256), mma=False)
    fused_moe.moe_decode_fwd(x, ids, weights, experts, torch.empty_like(x), mma=True,
                             x_sums=torch.zeros(1, 2), raw=True)  # gate+up's RAW unpack
    fits, fused_moe.prefetch_fits = fused_moe.prefetch_fits, lambda device, nbytes: False
    fused_moe.moe_decode_fwd(x, ids, weights, experts, torch.empty_like(x), mma=True)  # as 16 tokens' experts run
    fused_moe.prefetch_fits = fits
    moe_route.moe_router(x, torch.randn(64, 256), torch.randn(64), 4, 2.5, moe_route.moe_router_locks(16, "cpu"))
    rms_norm.add_rms_norm(x, x.clone(), torch.ones(256), 1e-6)
    H, K = 2, 64
    C = 3 * H * K
    kda_decode.kda_layer_step(torch.randn(1, C), torch.randn(1, C, 3), torch.randn(C, 4), torch.randn(1, K),
                              torch.randn(1, H), torch.randn(1, K), torch.zeros(1, H, K, K),
                              f_b_weight=torch.randn(H * K, K), g_b_weight=torch.randn(H * K, K),
                              A_log=torch.randn(H), dt_bias=torch.randn(H * K), o_norm_weight=torch.ones(K), eps=1e-6)
    q_lat, q_rope = torch.randn(1, 16, 128, dtype=torch.bfloat16), torch.randn(1, 16, 64, dtype=torch.bfloat16)
    for dtype, scale in ((torch.bfloat16, None), (torch.float8_e4m3fn, torch.ones(1, 512))):
        cache = torch.zeros(1, 512, 192, dtype=dtype)
        mla_decode.mla_decode(q_lat, q_rope, cache, torch.tensor([500], dtype=torch.int32), 0.1, scale)
        mla_cache.mla_write_rows(torch.randn(1, 192, dtype=torch.bfloat16), torch.ones(128), 1e-6,
                                 torch.tensor([7]), cache, scale)


def main() -> None:
    for module in (int_linear, fused_moe, kda_decode, mla_cache, mla_decode, moe_route, rms_norm):
        module.use_pdl = lambda device: True
    int_linear.prefetch_fits = fused_moe.prefetch_fits = kda_decode.prefetch_fits = \
        lambda device, nbytes: True  # these launches' small weights and states fit any L2
    int_linear.fast_unpack = fused_moe.fast_unpack = lambda bits, device: bits == 4  # the PTX unpack, as on CUDA
    JITFunction.run = compile_launch
    launch_every_decode_kernel()
    print(json.dumps(found))


if __name__ == "__main__":
    main()
