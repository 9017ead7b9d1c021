"""MLA prefill attention alone at the released shapes (H 32, kv_lora_rank 512, rope 64, nope 128, v 128), one layer,
a whole prompt run segment by segment as the engine runs it: the blockwise form (runtime/model.py PrefillAttention)
with each SDPA kernel that returns a log-sum-exp, the absorbed form, and the whole-context form it replaced.

Checked before it is timed: every variant, run as it is timed (its attention module, its SDPA kernel, its cache dtype),
against the whole-context form in fp32 at a segment that starts past three key blocks; one past CHECK_BOUND ends the
run (exit 1) before anything is timed, one whose kernel will not run here is left out. Figures: seconds per prompt,
TFLOP/s of the causal attention (H (dk + dv) L^2 / 2 multiply-adds, two FLOP each), and the peak memory allocated
beyond the inputs (q for the whole prompt and the cache).

    python bench/mla_prefill.py --contexts 32768,131072 --json bench/results/h200-mla-prefill.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from klconvert.config import KimiLinearConfig
from klconvert.presets import preset_config
from klconvert.runtime import model as M
from klconvert.runtime.kernel_modules import TritonPrefillAttention
from klconvert.runtime.memory_plan import PREFILL_SEGMENT
from klconvert.runtime.state import cache_rows
from klconvert.script_summary import script_summary


CHECK_BOUND = {"bf16": 2e-2, "fp8": 1e-1}  # relative error against fp32; fp8: e4m3 rounds each value by up to 6%


def mixer(device) -> M.MLAMixer:
    """One MLA layer at the released shapes; only kv_b_proj matters here (random, O(1) outputs)."""
    c = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
    m = M.MLAMixer(c, 0)
    w = torch.randn(m.H * (m.dn + m.dv), m.r, device=device) / m.r ** 0.5
    m.kv_b_proj.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    return m


def whole_context(m: M.MLAMixer, q, cache, cache_scale, start: int) -> torch.Tensor:
    """The form PrefillAttention replaced: every cached row up to the segment's end expanded at once, one masked
    SDPA (its workspace grows with the context)."""
    T = q.shape[1]
    k, v = M.PrefillAttention.expand(m, cache_rows(cache[:, :start + T], None if cache_scale is None else
                                                   cache_scale[:, :start + T], q.dtype))
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=m.scale).transpose(1, 2)


def flash_padded(q, k, v, causal, scale):
    """FlashAttention-2 through SDPA's flash op: it needs Dv == Dk, so v is zero-padded 128 -> 192."""
    Dv = v.shape[-1]
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, F.pad(v, (0, q.shape[-1] - Dv)), 0.0, causal,
                                                             False, scale=scale)
    return out[0][..., :Dv], out[1]


def efficient(q, k, v, causal, scale):
    """The memory-efficient (CUTLASS) kernel: takes Dv != Dk; pads its lse to a multiple of 32 queries."""
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out[0], out[1][..., :q.shape[2]]


def cudnn(q, k, v, causal, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1].reshape(q.shape[:3])


class Absorbed(torch.nn.Module):
    """The absorbed form at prefill: queries into the latent (q_nope W_uk), MQA over the cached 576-value rows
    (values: their 512 latents), key blocks merged by log-sum-exp, the output through W_uv."""

    def __init__(self, key_block: int):
        super().__init__()
        self.key_block = key_block

    def forward(self, m, q, cache, cache_scale, start):
        B, T, H, _ = q.shape
        w_uk, w_uv = m.kv_b_proj.weight.view(H, m.dn + m.dv, m.r).split([m.dn, m.dv], dim=1)
        q_nope, q_rope = q.split([m.dn, m.dr], dim=-1)
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)
        qa = torch.cat([q_lat, q_rope.transpose(1, 2)], dim=-1)              # [B, H, T, r+dr]
        o = lse = None
        blocks = [(a, min(a + self.key_block, start), False) for a in range(0, start, self.key_block)]
        for a, b, causal in blocks + [(start, start + T, True)]:
            rows = cache_rows(cache[:, a:b], None if cache_scale is None else cache_scale[:, a:b], q.dtype)
            k = rows[:, None].expand(B, H, b - a, rows.shape[-1])
            o, lse = M.merge_partials(o, lse, *M.attention_with_lse(qa, k, k[..., :m.r], causal, m.scale))
        return torch.einsum("bhtr,hvr->bthv", o.to(q.dtype), w_uv)


def run_prompt(attention, m, q, cache, cache_scale, segment: int) -> None:
    for start in range(0, q.shape[1], segment):
        attention(m, q[:, start:start + segment], cache, cache_scale, start)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(m, device, variants: dict) -> dict:
    """{variant: its relative error against whole-context fp32, or why it did not run}, each run as it is timed on a
    256-query segment at start 135168, past two key blocks of the widest (65536: 65536 + 65536 + 4096, then the
    causal one), so every variant's merge runs."""
    g = torch.Generator(device=device).manual_seed(0)
    start, T = 2 * 65536 + 4096, 256
    q = torch.randn(1, T, m.H, m.dn + m.dr, device=device, generator=g)
    cache = torch.randn(1, start + T, m.r + m.dr, device=device, generator=g)
    m32 = mixer(device)
    m32.kv_b_proj.weight = torch.nn.Parameter(m.kv_b_proj.weight.float(), requires_grad=False)
    ref = whole_context(m32, q, cache, None, start)
    model_lse, found = M.attention_with_lse, {}
    for name, (attention, _, lse_fn) in variants.items():
        c, s = fp8_cache(cache) if "fp8" in name else (cache.bfloat16(), None)
        M.attention_with_lse = lse_fn or model_lse
        try:
            found[name] = rel(attention(m, q.bfloat16(), c, s, start), ref)
        except (RuntimeError, NotImplementedError) as e:
            found[name] = "did not run: " + " ".join(str(e).split())[:200]
        finally:
            M.attention_with_lse = model_lse
    return found


def fp8_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as e4m3 values with a row scale of 1 (the random rows are O(1))."""
    return cache.to(torch.float8_e4m3fn), torch.ones(cache.shape[:2], device=cache.device)


def timed(fn, reps: int) -> float:
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--variants", default="", help="comma-separated substrings: time only the variants named so")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    m = mixer(device)
    variants = {  # name: (attention module, segment, attention_with_lse in place of the model's, or None)
        f"blockwise model's kernel S{PREFILL_SEGMENT} kb{M.MLA_KEY_BLOCK}": (M.PrefillAttention(), PREFILL_SEGMENT,
                                                                             None),
        "blockwise cudnn S8192 kb8192 triton merge": (TritonPrefillAttention(8192), 8192, cudnn),
        "blockwise cudnn S8192 kb32768 triton merge": (TritonPrefillAttention(32768), 8192, cudnn),
        "blockwise cudnn S8192 kb65536 triton merge": (TritonPrefillAttention(65536), 8192, cudnn),
        "blockwise cudnn S16384 kb32768 triton merge": (TritonPrefillAttention(32768), 16384, cudnn),
        "blockwise cudnn S16384 kb65536 triton merge": (TritonPrefillAttention(65536), 16384, cudnn),
        "blockwise cudnn S16384 kb32768 torch merge": (M.PrefillAttention(32768), 16384, cudnn),
        "blockwise cudnn S2048 kb8192": (M.PrefillAttention(8192), 2048, cudnn),
        "blockwise cudnn S4096 kb8192": (M.PrefillAttention(8192), 4096, cudnn),
        "blockwise cudnn S8192 kb16384": (M.PrefillAttention(16384), 8192, cudnn),
        "blockwise cudnn S2048 kb8192 fp8 cache": (M.PrefillAttention(8192), 2048, cudnn),
        "blockwise flash (v padded) S2048 kb8192": (M.PrefillAttention(8192), 2048, flash_padded),
        "blockwise efficient S2048 kb8192": (M.PrefillAttention(8192), 2048, efficient),
        "blockwise efficient S8192 kb16384": (M.PrefillAttention(16384), 8192, efficient),
        "absorbed cudnn-or-efficient S2048 kb8192": (Absorbed(8192), 2048, None),
        "whole-context (before) S2048": (whole_context, 2048, None),
    }
    wanted = [w for w in args.variants.split(",") if w]
    variants = {k: v for k, v in variants.items() if not wanted or any(w in k for w in wanted)}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "check": check(m, device, variants),
              "rows": []}
    print(json.dumps(result["check"]))
    for name, error in result["check"].items():
        bound = CHECK_BOUND["fp8" if "fp8" in name else "bf16"]
        if isinstance(error, float) and not error <= bound:   # NaN fails too
            raise SystemExit(f"mla_prefill: {name} is {error:.3g} from whole-context fp32, past {bound}; nothing "
                             "was timed")
    variants = {k: v for k, v in variants.items() if isinstance(result["check"][k], float)}
    model_lse = M.attention_with_lse
    for L in [int(x) for x in args.contexts.split(",")]:
        g = torch.Generator(device=device).manual_seed(1)
        q = torch.randn(1, L, m.H, m.dn + m.dr, device=device, generator=g, dtype=torch.bfloat16)
        cache = torch.randn(1, L, m.r + m.dr, device=device, generator=g, dtype=torch.bfloat16)
        fp8 = fp8_cache(cache)
        flop = 2 * m.H * (m.dn + m.dr + m.dv) * L * L / 2
        for name, (attention, segment, lse_fn) in variants.items():
            M.attention_with_lse = lse_fn or model_lse
            c, s = fp8 if "fp8" in name else (cache, None)
            try:
                run_prompt(attention, m, q[:, :min(L, 2 * segment)], c, s, segment)  # warm-up
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                seconds = timed(lambda: run_prompt(attention, m, q, c, s, segment), 2 if L <= 32768 else 1)
                row = {"context": L, "variant": name, "seconds": seconds, "tflops": flop / seconds / 1e12,
                       "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
            except (RuntimeError, NotImplementedError) as e:
                row = {"context": L, "variant": name, "error": " ".join(str(e).split())[:300]}
            finally:
                M.attention_with_lse = model_lse
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
