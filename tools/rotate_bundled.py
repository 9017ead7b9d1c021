"""The bundled model with its residual stream rotated: QuaRot's rotation (SpinQuant's R1), an orthogonal Q fused into
the weights -- the same function in another basis, which a quantizer then sees with any outlier channel spread over
all of them. A study for the quality table's rotated rows:

    python tools/rotate_bundled.py rot [--rotation random-hadamard|identity] [--model DIR]
    klconvert quantize rot rot-q4 --bits 4
    python tools/quality_table.py --only "int4 g128 sym (default)" --folder "int4, rotated=rot-q4"

(or tools/gptq_bundled.py on rot's recipe with `--model rot`). Q is compressed-tensors' Hadamard matrix, as
llm-compressor's SpinQuantModifier builds it; which weights read and write the residual stream is Kimi Linear's
and this file's (the modifier ships Llama's mappings, and it centres the embeddings, which changes an RMSNorm
model's function). Each RMSNorm on the residual stream is folded into the projections reading it (its weight
becomes 1, so it commutes with Q), every reader W becomes W Q, every writer (the embedding, each o_proj and down
projection) Q^T W; the norms inside the layers (KDA's gated output norm, MLA's latent norm) and all after them see
what they saw. The folder keeps the release's format, shards and dtype; it loads wherever the original does.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import bf16_checkpoint, refuse_other_layout, run_tool  # noqa: E402

from typing import TYPE_CHECKING  # noqa: E402

from klconvert.checkpoint.folder_files import CONFIG_FILE, INDEX_FILE  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.convert.output_folder import refuse_out_over_source  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import TOKENIZER_FILES  # noqa: E402
from klconvert.whole_folder import refuse_taken, whole_folder  # noqa: E402

if TYPE_CHECKING:   # torch, compressed-tensors and safetensors are imported where used: --help and a refusal of the
    # arguments import no torch (~2 s of CPU)
    import torch

ROTATIONS = ("hadamard", "random-hadamard", "identity")


def rotation(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """An orthogonal n x n matrix in fp64: compressed-tensors' Sylvester Hadamard (n a power of two), with random
    column signs for random-hadamard, scaled by 1/sqrt(n); identity folds the norms alone (the control)."""
    import torch
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix, random_hadamard_matrix

    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    if kind == "hadamard":
        h = deterministic_hadamard_matrix(n, torch.float64)
    elif kind == "random-hadamard":
        h = random_hadamard_matrix(n, torch.float64, gen=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"rotation {kind!r}: one of {', '.join(ROTATIONS)}")
    return h / n ** 0.5


def rotation_of(model: Path, n: int, kind: str) -> torch.Tensor:
    """rotation(n, kind) for `model`'s residual stream, or a KLError naming the rotations that have a matrix of its
    size: hadamard none of a size not a power of two (the release's 2304 is not), random-hadamard none of a size
    without a known Hadamard factor (compressed-tensors' ValueError, once after every tensor was loaded)."""
    try:
        return rotation(n, kind)
    except ValueError as e:
        error = e
    takes = []
    for other in ROTATIONS:
        try:
            rotation(n, other)
            takes.append(f"--rotation {other}")
        except ValueError:
            continue
    raise KLError(f"{model}: --rotation {kind} has no {n} x {n} matrix for its hidden_size ({error}); use "
                  f"{' or '.join(takes)}")


def residual_roles(config: KimiLinearConfig) -> tuple[dict[str, list[str]], list[str]]:
    """({norm on the residual stream: the weights reading its output}, [weights writing the residual stream]), by
    the release's tensor names (without the trailing .weight)."""
    readers, writers = {"model.norm": ["lm_head"]}, ["model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        at = f"model.layers.{i}"
        if config.is_kda(i):
            attn = ["q_proj", "k_proj", "v_proj", "f_a_proj", "b_proj", "g_a_proj"]
        else:
            attn = ["q_proj", "kv_a_proj_with_mqa"]   # Kimi Linear's MLA has no low-rank query (config.py)
        readers[f"{at}.input_layernorm"] = [f"{at}.self_attn.{p}" for p in attn]
        writers.append(f"{at}.self_attn.o_proj")
        if config.is_moe(i):
            moe = f"{at}.block_sparse_moe"
            experts = [f"{moe}.experts.{e}" for e in range(config.num_experts)]
            shared = [f"{moe}.shared_experts"] if config.num_shared_experts else []
            readers[f"{at}.post_attention_layernorm"] = [f"{moe}.gate"] + [
                f"{e}.{w}" for e in experts for w in ("w1", "w3")] + [f"{s}.{p}" for s in shared
                                                                      for p in ("gate_proj", "up_proj")]
            writers += [f"{e}.w2" for e in experts] + [f"{s}.down_proj" for s in shared]
        else:
            readers[f"{at}.post_attention_layernorm"] = [f"{at}.mlp.gate_proj", f"{at}.mlp.up_proj"]
            writers.append(f"{at}.mlp.down_proj")
    return readers, writers


def rotate(model: Path, out: Path, kind: str = "hadamard", dtype: torch.dtype | None = None) -> None:
    """Write `model` (a bf16 Kimi Linear folder in the release's format) rotated into `out`, each tensor in its own
    dtype (or `dtype`), in the same shards, as a new folder written whole or not at all (it once wrote over its own
    input when `out` was `model`). The folder is checked first as klconvert checks any download (shard names, sizes,
    the tensors the config implies), and refused where it is quantized or names the tensors it rotates otherwise."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    refuse_out_over_source(model, out, "rotated model")
    refuse_taken(out)
    checkpoint = bf16_checkpoint(model)
    config = checkpoint.config
    readers, writers = residual_roles(config)
    refuse_other_layout(checkpoint, (f"{n}.weight" for n in [*readers, *chain(*readers.values()), *writers]))
    if config.tie_word_embeddings:
        raise KLError(f"{model}: tied embeddings; the rotation folds the final norm into lm_head alone")
    q = rotation_of(model, config.hidden_size, kind)   # before the weights are read
    weight_map = {name: shard for shard, header in checkpoint.headers.items() for name in header.tensors}
    tensors = {}
    for shard in checkpoint.headers:
        with safe_open(model / shard, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    w = lambda name: tensors[f"{name}.weight"].double()
    rotated = {}
    for norm, names in readers.items():
        gamma = w(norm)
        rotated |= {f"{n}.weight": (w(n) * gamma) @ q for n in names}
        rotated[f"{norm}.weight"] = torch.ones_like(gamma)
    rotated |= {f"{n}.weight": q.T @ w(n) for n in writers if n != "model.embed_tokens"}
    rotated["model.embed_tokens.weight"] = w("model.embed_tokens") @ q
    with whole_folder(out) as folder:
        total = 0
        for shard in checkpoint.headers:
            part = {name: rotated.get(name, t).to(dtype or t.dtype).contiguous()
                    for name, t in tensors.items() if weight_map[name] == shard}
            save_file(part, folder / shard, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
        if (model / INDEX_FILE).exists():
            (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2))
        for name in (CONFIG_FILE, *TOKENIZER_FILES):
            if (model / name).is_file():
                shutil.copy(model / name, folder / name)


def main() -> None:
    p = argparse.ArgumentParser(description=script_summary(__file__))
    p.add_argument("out", type=Path, help="Output folder (the release's format).")
    p.add_argument("--model", type=Path, default=BUNDLED_DIR,
                   help="The bf16 model folder (default: the bundled one), held in memory whole (fp64 where rotated).")
    p.add_argument("--rotation", choices=ROTATIONS, default="hadamard",
                   help="identity: the norms folded into their readers alone, the control [default: hadamard].")
    a = p.parse_args()
    try:
        rotate(a.model, a.out, a.rotation)
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"{a.model} rotated ({a.rotation}) -> {a.out}")


if __name__ == "__main__":
    run_tool(main)
