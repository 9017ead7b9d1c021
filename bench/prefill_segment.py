"""Prefill time by segment length (prompt tokens per model call): the released shapes with random int4 g128 weights
(as `klconvert bench --preset kimi-linear-48b`), one prompt of --tokens, each --segments value in turn, with the
peak GPU memory reserved against the plan (which sizes its workspace for the default segment, PREFILL_SEGMENT).

Checks first, at each segment, that the last token's logits of a 2-key-block prompt equal those at the default
segment (the segment must not change the result beyond bf16 noise), then times.

    python bench/prefill_segment.py [--layers 27] [--tokens 131072] [--segments 2048,4096,8192]
"""
from __future__ import annotations

import argparse

import torch

from klconvert.bench import random_quantized_weights, time_prefill
from klconvert.config import KimiLinearConfig
from klconvert.presets import preset_config
from klconvert.release import NUM_SPECIAL_TOKENS
from klconvert.runtime.engine import DEFAULT_DTYPES, Engine
from klconvert.runtime.memory_plan import PREFILL_SEGMENT
from klconvert.runtime.model import MLA_KEY_BLOCK
from klconvert.script_summary import script_summary


def main() -> int:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--segments", default="2048,4096,8192")
    args = ap.parse_args()
    segments = [int(s) for s in args.segments.split(",")]
    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", args.layers))
    weights = random_quantized_weights(config, 4, "cuda", calm=True)
    engine = Engine(config, weights.read, torch.device("cuda"), DEFAULT_DTYPES["cuda"], args.tokens, 1,
                    packed=weights.packed, kernels="triton", stored_schemes=weights.schemes)
    probe = torch.randint(0, config.vocab_size - NUM_SPECIAL_TOKENS, (1, 2 * MLA_KEY_BLOCK + 1000), device="cuda")
    ref = engine.prefill(probe)
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers, prefill of {args.tokens:,} tokens; plan "
          f"{engine.plan.total / 2**30:.1f} GiB (workspace {engine.plan.workspace / 2**30:.2f} GiB at segment "
          f"{PREFILL_SEGMENT})", flush=True)
    for seg in segments:
        engine.prefill_segment = seg
        got = engine.prefill(probe)
        rel = ((got - ref).norm() / ref.norm()).item()
        if not rel <= 2e-2 or got.argmax() != ref.argmax():
            print(f"segment {seg}: logits differ from segment {PREFILL_SEGMENT} by {rel:.3g}; not timed", flush=True)
            return 1
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds = time_prefill(engine, args.tokens)
        print(f"segment {seg}: {seconds:.2f} s, {args.tokens / seconds:,.0f} tokens/s; peak reserved "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB (check vs segment {PREFILL_SEGMENT}: rel "
              f"{rel:.2e})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
