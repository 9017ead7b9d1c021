"""`klconvert synth`: write a random-weight Kimi Linear checkpoint in exactly the released format, streaming."""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from klconvert.checkpoint.folder_files import CONFIG_FILE, INDEX_FILE
from klconvert.checkpoint.name_map import (TRANSFORMERS_LAYOUT, TensorSpec, canonical_pieces, expected_tensors,
                                          filled_names, sliced_shape, template_fields)
from klconvert.checkpoint.safetensors_writer import (PlannedTensor, index_json, shard_names, split_into_shards,
                                                     write_shard)
from klconvert.config import KimiLinearConfig
from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.size_bounds import HEADER_BYTES_PER_TENSOR
from klconvert.disk_space import free_disk_bytes
from klconvert.errors import KLError, refuse_non_bool
from klconvert.generation_config import GENERATION_CONFIG_FILE
from klconvert.presets import preset_config
from klconvert.release import FP32_TENSORS, NUM_SPECIAL_TOKENS, RELEASED_SHARD_BYTES
from klconvert.synth.tokenizer_files import write_tokenizer_files
from klconvert.units import size_texts
from klconvert.user_paths import given_path
from klconvert.whole_folder import Replaceable, refuse_taken, whole_folder

DEFAULT_SHARD_BYTES = {"tiny": 4 << 20, "kimi-linear-48b": RELEASED_SHARD_BYTES}
LAYOUTS = ("released", "transformers")  # synth's tensor layouts (--layout's choices): the release's, the port's
# --force replaces a folder klconvert wrote (an earlier synth, a quantize output, an export) and nothing else, as
# quantize's does: a synth of a klconvert before the output record wrote a download's files, never told from one
KLCONVERT_OUTPUT = Replaceable(None, None, any_klconvert_output=True)


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


def tensor_generator(name: str, seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The random stream of one named tensor under `seed`: the same values whatever order tensors are made in."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def synth_values(spec: TensorSpec, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Deterministic random values for one canonical tensor, in its stored dtype, scaled so activations stay O(1).

    Made on `device` (klconvert bench makes real-size weights on the GPU this way)."""
    g = tensor_generator(spec.name, seed, device)
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


def _transformers_names(expected: dict[str, TensorSpec], c: KimiLinearConfig) -> dict[str, list[tuple[str, tuple]]]:
    """{transformers-layout name: the canonical tensors it holds, each with its index into it}, in file order,
    inverted from name_map.TRANSFORMERS_LAYOUT: a canonical name's source is the name a rule's piece makes it
    from, checked by mapping that source forward again."""
    rules = [(pattern, pieces) for pattern, pieces in TRANSFORMERS_LAYOUT]
    forward: dict[str, list[tuple[str, tuple]]] = {}
    sources: dict[str, str] = {}  # canonical -> source
    for name in expected:
        if name in sources:
            continue
        source = name
        for pattern, pieces in rules:
            for piece in pieces:
                groups = template_fields(piece.canonical, name)
                for candidate in filled_names(pattern, groups) if groups is not None else ():
                    held = forward.setdefault(candidate, canonical_pieces(candidate, c))
                    if any(canonical == name for canonical, _ in held):
                        source = candidate
                        break
                if source != name:
                    break
            if source != name:
                break
        for canonical, _ in forward.get(source, [(name, ())]):
            sources[canonical] = source
    out: dict[str, list[tuple[str, tuple]]] = {}
    for name, source in sources.items():
        out.setdefault(source, forward.get(source, [(name, ())]))
    return out


def _transformers_layout(expected: dict[str, TensorSpec], c: KimiLinearConfig, seed: int) -> list[PlannedTensor]:
    """The native transformers port's layout, holding exactly the values of the released layout: each of its
    tensors is put together from the canonical tensors name_map says it splits into."""
    out: list[PlannedTensor] = []
    for source, pieces in _transformers_names(expected, c).items():
        first = expected[pieces[0][0]]
        if pieces == [(first.name, ())]:
            out.append(PlannedTensor(source, _dtype(first.name), first.shape, lambda s=first: synth_values(s, seed)))
            continue
        lead = [0] * len(pieces[0][1])
        for _, index in pieces:
            for d, ix in enumerate(index):
                lead[d] = max(lead[d], ix + 1 if isinstance(ix, int) else ix.stop)
        sliced = sum(isinstance(ix, slice) for ix in pieces[0][1])
        shape = (*lead, *first.shape[sliced:])
        if any(sliced_shape(shape, index) != expected[name].shape for name, index in pieces):
            raise KLError(f"name_map's transformers rule for {source} does not tile {shape}; fix the table")

        def build(pieces=pieces, shape=shape, dtype=_dtype(first.name)):
            t = torch.empty(shape, dtype=dtype, device="cpu")
            for name, index in pieces:
                t[index] = synth_values(expected[name], seed)
            return t
        out.append(PlannedTensor(source, _dtype(first.name), shape, build))
    return out


def synth(preset: str, out: str | Path, layers: int | None = None, seed: int = 0, layout: str = "released",
          progress: bool = True, force: bool = False) -> SynthResult:
    """Write a random-weight checkpoint folder for `preset` at `out` (new, or an empty folder; with `force`, one
    klconvert wrote, replaced only once the new one is whole), whole or not at all."""
    refuse_non_bool(progress, "progress")
    refuse_non_bool(force, "force", "--force")
    out = given_path(out, "out")
    refuse_taken(out, force, KLCONVERT_OUTPUT)
    if layout not in LAYOUTS:
        raise KLError(f"unknown layout {layout!r}; choose {' or '.join(map(repr, LAYOUTS))}")
    config = preset_config(preset, layers)
    c = KimiLinearConfig.from_dict(config, where=f"preset {preset}")
    expected = expected_tensors(c)
    planned = (_released_layout(expected, seed) if layout == "released"
               else _transformers_layout(expected, c, seed))
    shards = split_into_shards(planned, DEFAULT_SHARD_BYTES[preset])
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in planned)

    with whole_folder(out, force, KLCONVERT_OUTPUT) as folder:
        write_atomically(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        write_tokenizer_files(folder, num_ranks=c.vocab_size - NUM_SPECIAL_TOKENS, num_specials=NUM_SPECIAL_TOKENS)
        write_atomically(folder / INDEX_FILE, (index_json(shards, names) + "\n").encode())
        write_atomically(folder / GENERATION_CONFIG_FILE, (json.dumps(
            {"bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids) or None,
             "pad_token_id": c.pad_token_id, "max_length": c.model_max_length}, indent=2) + "\n").encode())
        need = total + len(planned) * HEADER_BYTES_PER_TENSOR   # the small files are written by now
        free = free_disk_bytes(folder)
        if free < need:
            free_text, need_text = size_texts(free, need)
            raise KLError(f"{out.parent}: {free_text} free but the shards need up to {need_text}; free some space or "
                          "use --layers to write fewer layers")
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=None if progress else True)
        try:   # None: on a terminal only
            for shard, name in zip(shards, names):
                write_shard(folder / name, shard, on_tensor=lambda t: bar.update(t.nbytes))
        except BaseException:
            bar.leave = False   # a failed run ends with its error line, not a half-full bar
            raise
        finally:
            bar.close()
    return SynthResult(out, len(planned), total, len(shards))
