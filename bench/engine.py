"""End-to-end decode on the GPU at real layer shapes: klconvert's engine (PyTorch and Triton paths) vs transformers.

Builds the released 48B config cut to --layers layers (3 KDA + 1 MLA for 4) with random weights made on the
GPU, quantized int4 g128 (lm_head int8) by the default policy. Checks first that the decode path agrees with
the prefill path and that the Triton path (int kernels, fused KDA step, fused MoE) agrees with the PyTorch
reference on the same dequantized weights; then times greedy decode after a --prompt-tokens prompt for both,
and for transformers' KimiLinearForCausalLM of the same config in bf16 (as ../shared/bench/anchors.py
measures it). Writes JSON to $OUT/engine.json when OUT is set.

    python bench/engine.py --layers 4 --prompt-tokens 512 --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.quant import compress_weight, decompress_weight, policy_from_options
from klconvert.runtime.engine import Engine
from klconvert.synth.checkpoint import synth_values
from klconvert.presets import preset_config


RESIDUAL_OUTPUTS = ("o_proj.weight", "w2.weight", "down_proj.weight")


def random_reader(config: KimiLinearConfig, device: str, seed: int = 0, calm: bool = False):
    """A `read(name)` that makes each tensor on the GPU with `klconvert synth`'s values.

    Random routers have near ties, so bf16 rounding differences between two correct paths flip expert choices
    and move the logits by ~10%. `calm` pins each layer's experts with a wide margin and scales the residual
    branches by 1/4 (as tests/calm_checkpoint.py does), so a comparison measures the paths, not that chaos. It
    is used for the checks only: pinned experts would sit in L2 and flatter the timings.
    """
    specs = expected_tensors(config)
    k = config.num_experts_per_token

    def read(name: str) -> torch.Tensor:
        spec = specs[name]
        if calm and name.endswith("e_score_correction_bias"):
            pinned = (torch.arange(k) + k * int(name.split(".")[2])) % spec.shape[0]
            return torch.zeros(spec.shape, device=device).index_fill_(0, pinned.to(device), 10.0)
        value = synth_values(spec, seed, device)
        return value * 0.25 if calm and name.endswith(RESIDUAL_OUTPUTS) else value

    return read


def quantized_readers(config: KimiLinearConfig, read):
    """(read, packed) as a quantized checkpoint gives them: packed(name) the int parts of each weight the default
    int4 policy quantizes, read(name) that weight dequantized (so both paths see the same values)."""
    specs = expected_tensors(config)
    policy = policy_from_options(4, 128).check_against([(n, s.shape) for n, s in specs.items()])
    cache: dict[str, tuple] = {}

    def packed(name: str):
        scheme = policy.scheme_for(name, specs[name].shape)
        if scheme is None:
            return None
        if name not in cache:
            parts = compress_weight(name.removesuffix(".weight"), read(name), scheme)
            cache[name] = ({k.rsplit(".", 1)[1]: v for k, v in parts.items()}, scheme)
        return cache[name]

    def read_dequantized(name: str) -> torch.Tensor:
        found = packed(name)
        return read(name) if found is None else decompress_weight(*found)

    return read_dequantized, packed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_decode_matches_prefill(engine: Engine, ids: torch.Tensor, steps: int = 8) -> float:
    """Relative error of decode-path logits against prefill logits over the last `steps` tokens."""
    full = engine.forward(ids)
    T = ids.shape[1] - steps
    engine.forward(ids[:, :T])
    dec = torch.stack([engine.decode_step(ids[:, t:t + 1], t) for t in range(T, ids.shape[1])], dim=1)
    ref = full[:, T:]  # decode_step(token t) gives the logits after token t, as prefill row t does
    return rel(dec, ref)


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
    dev = torch.device("cuda")
    ids = torch.randint(0, 163584, (1, args.prompt_tokens), device="cuda")
    res = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt_tokens": args.prompt_tokens}
    calm = quantized_readers(config, random_reader(config, "cuda", calm=True))
    timed = quantized_readers(config, random_reader(config, "cuda"))
    logits = {}
    for kernels in ("torch", "triton"):
        engine = Engine(config, calm[0], dev, torch.bfloat16, context, 1, packed=calm[1], kernels=kernels)
        err = check_decode_matches_prefill(engine, ids[:, :72])
        logits[kernels] = engine.forward(ids[:, :64])
        print(f"check [{kernels}]: decode vs prefill logits, rel err {err:.2e} (bf16)", flush=True)
        if not err < 5e-2:
            print(f"FAILED: the {kernels} decode path disagrees with its prefill path", file=sys.stderr)
            return 1
        res[f"{kernels}_decode_vs_prefill_rel_err"] = err
        del engine
        engine = Engine(config, timed[0], dev, torch.bfloat16, context, 1, packed=timed[1], kernels=kernels)
        res[f"{kernels}_ms_per_token"] = time_ours(engine, ids, args.new_tokens)
        print(f"klconvert engine [{kernels}], {args.layers} layers, int4 g128: "
              f"{res[f'{kernels}_ms_per_token']:.2f} ms/token", flush=True)
        del engine
        torch.cuda.empty_cache()
    res["triton_vs_torch_rel_err"] = rel(logits["triton"], logits["torch"])
    res["triton_vs_torch_top1"] = (logits["triton"].argmax(-1) == logits["torch"].argmax(-1)).float().mean().item()
    print(f"check: triton vs torch prefill logits rel err {res['triton_vs_torch_rel_err']:.2e}, top-1 agreement "
          f"{res['triton_vs_torch_top1']:.3f}", flush=True)
    if not res["triton_vs_torch_rel_err"] < 5e-2:
        print("FAILED: the Triton path disagrees with the PyTorch path", file=sys.stderr)
        return 1
    res["transformers_ms_per_token"] = peer = time_transformers(raw, ids, args.new_tokens)
    if peer is not None:
        print(f"transformers KimiLinearForCausalLM bf16, same config: {peer:.2f} ms/token; torch path "
              f"{peer / res['torch_ms_per_token']:.2f}x, triton path {peer / res['triton_ms_per_token']:.2f}x faster",
              flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
