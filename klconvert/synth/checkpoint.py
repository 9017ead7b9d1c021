"""`klconvert synth`: write a random-weight Kimi Linear checkpoint in exactly the released format, streaming."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from klconvert.checkpoint.name_map import TensorSpec, expected_tensors
from klconvert.checkpoint.safetensors_writer import (PlannedTensor, index_json, shard_names, split_into_shards,
                                                     write_shard)
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.presets import preset_config
from klconvert.release import FP32_TENSORS, NUM_SPECIAL_TOKENS
from klconvert.synth.tokenizer_files import write_tokenizer_files

DEFAULT_SHARD_BYTES = {"tiny": 4 << 20, "kimi-linear-48b": 5 * 10**9}


@dataclass(frozen=True)
class SynthResult:
    path: Path
    tensors: int
    bytes: int
    shards: int


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_TENSORS) else torch.bfloat16


def _normal(shape: tuple[int, ...], g: torch.Generator, mean: float, std: float, dtype: torch.dtype) -> torch.Tensor:
    """N(mean, std^2) values made 16M at a time, so a large tensor never exists in fp32 as a whole."""
    out = torch.empty(shape, dtype=dtype, device=g.device)
    flat = out.view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        n = min(step, flat.numel() - i)
        flat[i:i + n] = (torch.randn(n, generator=g, device=g.device) * std + mean).to(dtype)
    return out


def synth_values(spec: TensorSpec, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Deterministic random values for one canonical tensor, in its stored dtype, scaled so activations stay O(1).

    Made on `device` (bench/engine.py makes real-size weights on the GPU this way)."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    name, shape, dtype = spec.name, spec.shape, _dtype(spec.name)
    if name.endswith("A_log"):
        return torch.empty(shape, device=device).uniform_(1.0, 16.0, generator=g).log()
    if name.endswith("dt_bias"):
        dt = torch.empty(shape, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=g).exp()
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus, as fla initialises it
    if name.endswith("e_score_correction_bias"):
        return torch.empty(shape, device=device).uniform_(-0.2, 0.2, generator=g)
    if spec.category == "norm":
        return _normal(shape, g, 1.0, 0.1, dtype)
    if name.endswith("embed_tokens.weight"):
        return _normal(shape, g, 0.0, 1.0, dtype)
    return _normal(shape, g, 0.0, 1.0 / math.sqrt(math.prod(shape[1:])), dtype)


def _released_layout(expected: dict[str, TensorSpec], seed: int) -> list[PlannedTensor]:
    return [PlannedTensor(s.name, _dtype(s.name), s.shape, lambda s=s: synth_values(s, seed))
            for s in expected.values()]


def _transformers_layout(expected: dict[str, TensorSpec], c: KimiLinearConfig, seed: int) -> list[PlannedTensor]:
    """The native transformers port's layout, holding exactly the values of the released layout."""
    def make(*names: str, dim: int = 0, stack: bool = False):
        def build():
            parts = [synth_values(expected[n], seed) for n in names]
            return torch.stack(parts) if stack else torch.cat(parts, dim=dim)
        return build

    out: list[PlannedTensor] = []
    for spec in expected.values():
        name = spec.name
        attn = name.rsplit(".self_attn.", 1)
        if len(attn) == 2 and attn[1] in ("f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias"):
            out.append(PlannedTensor(f"{attn[0]}.self_attn.forget_gate.{attn[1]}", _dtype(name), spec.shape,
                                     make(name)))
        elif name.endswith("self_attn.q_conv1d.weight"):
            base = name[: -len("q_conv1d.weight")]
            parts = [base + p + "_conv1d.weight" for p in "qkv"]
            out.append(PlannedTensor(base + "conv1d.weight", torch.bfloat16,
                                     (3 * c.kda_dim, 1, c.conv_kernel_size), make(*parts)))
        elif name.endswith(("k_conv1d.weight", "v_conv1d.weight")):
            continue
        elif ".block_sparse_moe.experts.0.w1.weight" in name:
            layer = name.split(".block_sparse_moe.")[0]
            w1 = [f"{layer}.block_sparse_moe.experts.{e}.w1.weight" for e in range(c.num_experts)]
            w3 = [f"{layer}.block_sparse_moe.experts.{e}.w3.weight" for e in range(c.num_experts)]
            w2 = [f"{layer}.block_sparse_moe.experts.{e}.w2.weight" for e in range(c.num_experts)]
            i, d, n = c.moe_intermediate_size, c.hidden_size, c.num_experts
            out.append(PlannedTensor(f"{layer}.mlp.experts.gate_up_proj", torch.bfloat16, (n, 2 * i, d),
                                     lambda a=w1, b=w3: torch.cat([make(*a, stack=True)(),
                                                                   make(*b, stack=True)()], dim=1)))
            out.append(PlannedTensor(f"{layer}.mlp.experts.down_proj", torch.bfloat16, (n, d, i),
                                     make(*w2, stack=True)))
        elif ".block_sparse_moe.experts." in name:
            continue
        elif ".block_sparse_moe." in name:
            out.append(PlannedTensor(name.replace(".block_sparse_moe.", ".mlp."), _dtype(name), spec.shape,
                                     make(name)))
        else:
            out.append(PlannedTensor(name, _dtype(name), spec.shape, make(name)))
    return out


def synth(preset: str, out: str | Path, layers: int | None = None, seed: int = 0, layout: str = "released",
          max_shard_bytes: int | None = None, progress: bool = True) -> SynthResult:
    """Write a random-weight checkpoint folder for `preset` at `out` (which must not exist yet)."""
    out = Path(out)
    if out.exists():
        raise KLError(f"{out}: already exists; choose a new --out folder or delete it first")
    if layout not in ("released", "transformers"):
        raise KLError(f"unknown layout {layout!r}; choose 'released' or 'transformers'")
    config = preset_config(preset, layers)
    c = KimiLinearConfig.from_dict(config, where=f"preset {preset}")
    expected = expected_tensors(c)
    planned = (_released_layout(expected, seed) if layout == "released"
               else _transformers_layout(expected, c, seed))
    shards = split_into_shards(planned, max_shard_bytes or DEFAULT_SHARD_BYTES[preset])
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in planned)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        free = shutil.disk_usage(tmp).free
        if free < total:
            raise KLError(f"{out.parent}: {free / 1e9:.1f} GB free but the checkpoint needs {total / 1e9:.1f} GB; "
                          "free some space or use --layers to write fewer layers")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer_files(tmp, num_ranks=c.vocab_size - NUM_SPECIAL_TOKENS, num_specials=NUM_SPECIAL_TOKENS,
                              seed=seed)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)
        for shard, name in zip(shards, names):
            write_shard(tmp / name, shard, on_tensor=lambda t: bar.update(t.nbytes))
        bar.close()
        (tmp / "model.safetensors.index.json").write_text(index_json(shards, names) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids) or None,
             "pad_token_id": c.pad_token_id, "max_length": c.model_max_length}, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthResult(out, len(planned), total, len(shards))
