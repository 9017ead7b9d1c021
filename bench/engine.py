"""End-to-end decode on the GPU at real layer shapes: klconvert's reference engine vs transformers, same run.

Builds the released 48B config cut to --layers layers (3 KDA + 1 MLA for 4), with random bf16 weights made on
the GPU, checks that the decode path agrees with the prefill path, then times greedy decode after a
--prompt-tokens prompt. The peer is transformers' KimiLinearForCausalLM of the same config (as
../shared/bench/anchors.py measures it). Writes JSON to $OUT/engine.json when OUT is set.

    python bench/engine.py --layers 4 --prompt-tokens 512 --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib

import torch

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.runtime.engine import Engine
from klconvert.synth.presets import preset_config


def random_reader(config: KimiLinearConfig, device: str, seed: int = 0):
    """A `read(name)` that makes each tensor on the GPU, scaled as `klconvert synth` scales them."""
    specs = expected_tensors(config)

    def read(name: str) -> torch.Tensor:
        spec = specs[name]
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("A_log"):
            return torch.empty(spec.shape, device=device).uniform_(1.0, 16.0, generator=g).log()
        if name.endswith("dt_bias"):
            dt = torch.empty(spec.shape, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=g).exp()
            return dt + torch.log(-torch.expm1(-dt))
        if name.endswith("e_score_correction_bias"):
            return torch.empty(spec.shape, device=device).uniform_(-0.2, 0.2, generator=g)
        if spec.category == "norm":
            return 1 + 0.1 * torch.randn(spec.shape, device=device, generator=g)
        std = 1.0 if name.endswith("embed_tokens.weight") else 1 / math.sqrt(math.prod(spec.shape[1:]))
        return (torch.randn(spec.shape, device=device, generator=g, dtype=torch.bfloat16) * std)

    return read


def check_decode_matches_prefill(engine: Engine, ids: torch.Tensor, steps: int = 8) -> float:
    """Relative error of decode-path logits against prefill logits over the last `steps` tokens."""
    full = engine.forward(ids)
    T = ids.shape[1] - steps
    engine.forward(ids[:, :T])
    dec = torch.stack([engine.decode_step(ids[:, t:t + 1], t) for t in range(T, ids.shape[1])], dim=1)
    ref = full[:, T:]  # decode_step(token t) gives the logits after token t, as prefill row t does
    return ((dec - ref).norm() / ref.norm()).item()


def time_ours(engine: Engine, ids: torch.Tensor, new_tokens: int) -> float:
    engine.generate(ids, 8)  # warm-up
    engine.generate(ids, new_tokens)
    s = engine.stats
    return s.decode_seconds / (s.new_tokens - 1) * 1e3


def time_transformers(config: dict, ids: torch.Tensor, new_tokens: int) -> float | None:
    try:
        from transformers import KimiLinearConfig as HFConfig, KimiLinearForCausalLM
    except ImportError:
        return None
    with torch.device(ids.device):
        model = KimiLinearForCausalLM(HFConfig(**config)).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / new_tokens * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/engine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    raw = preset_config("kimi-linear-48b", args.layers)
    config = KimiLinearConfig.from_dict(raw)
    context = args.prompt_tokens + args.new_tokens + 16
    engine = Engine(config, random_reader(config, "cuda"), torch.device("cuda"), torch.bfloat16, context, 1)
    ids = torch.randint(0, 163584, (1, args.prompt_tokens), device="cuda")
    err = check_decode_matches_prefill(engine, ids)
    print(f"check: decode vs prefill logits, rel err {err:.2e} (bf16)", flush=True)
    if not err < 5e-2:
        print("FAILED: the decode path disagrees with the prefill path", file=sys.stderr)
        return 1
    ours = time_ours(engine, ids, args.new_tokens)
    print(f"klconvert reference engine, {args.layers} layers bf16: {ours:.2f} ms/token", flush=True)
    del engine
    torch.cuda.empty_cache()
    peer = time_transformers(raw, ids, args.new_tokens)
    if peer is not None:
        print(f"transformers KimiLinearForCausalLM, same config: {peer:.2f} ms/token; ratio {peer / ours:.2f}x",
              flush=True)
    res = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt_tokens": args.prompt_tokens,
           "decode_vs_prefill_rel_err": err, "ours_ms_per_token": ours, "transformers_ms_per_token": peer}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
