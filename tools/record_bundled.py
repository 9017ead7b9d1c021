"""Recompute every value tests/test_bundled_model.py checks for the bundled model and rewrite
tests/bundled_recorded.json: file checksums, the greedy continuation of a fixed prompt, the held-out perplexity
bound, the int4 KL bound, and the tensors quantize writes from it with the RESUME_FORMAT they are pinned to. Run it
after dropping newly trained files into klconvert/bundled/, or after raising RESUME_FORMAT:

    python tools/record_bundled.py

Everything runs on CPU in fp32 with the PyTorch kernels (what the tests run), in well under a minute.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import run_tool  # noqa: E402
import bundled_corpus  # noqa: E402

from klconvert.checkpoint.safetensors_header import read_header  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402

RECORDED = Path(__file__).resolve().parent.parent / "tests" / "bundled_recorded.json"
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
NEW_TOKENS = 32
HELD_OUT_TOKENS = 512    # the test split's first tokens: perplexity and KL (CPU, seconds)
PERPLEXITY_SLACK = 1.02  # bound = measured * slack: fp32 differences across CPUs stay far below 2%
KL_SLACK = 1.01          # bound = measured * slack: int4 rounding is deterministic, BLAS order is not -- two CPUs'
                         # values differed by 2e-7 of it, any thread count the same; 1% leaves 50,000 times that
# quantize's options whose output is pinned: min-max ranges, the same bytes on any CPU (a division and a rounding per
# weight, no sum whose order may differ)
PINNED_QUANTIZE_OPTIONS = {"int4-g128-sym": dict(bits=4), "int8-g32-asym": dict(bits=8, group_size=32, symmetric=False)}


def file_checksums(folder: Path = BUNDLED_DIR) -> dict[str, str]:
    """{file name: sha256} of every file of the bundled folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def held_out_text() -> str:
    return bundled_corpus.split()["test"]


def greedy_continuation() -> list[int]:
    """The ids greedy decoding of the bundled model adds to PROMPT (CPU, fp32, PyTorch kernels)."""
    from klconvert.runtime.engine import load   # torch's users imported where used here: --help imports no torch

    tokenizer = Tokenizer.from_folder(BUNDLED_DIR)
    ids = tokenizer.encode(PROMPT)
    engine = load(BUNDLED_DIR, device="cpu", dtype="float32", max_context=len(ids) + NEW_TOKENS, kernels="torch")
    return engine.generate(ids, NEW_TOKENS)[0].tolist()   # to the model's stop tokens, as `run`


def int4_eval(tokens: int = HELD_OUT_TOKENS):
    """klconvert eval of the default int4 g128 quantization against the bundled bf16 folder on the held-out slice."""
    from klconvert.evaluate import evaluate
    from klconvert.quantize import quantize

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int4"
        quantize(BUNDLED_DIR, out, bits=4, device="cpu", progress=False)
        return evaluate(out, BUNDLED_DIR, held_out_text(), max_tokens=tokens, device="cpu", dtype="float32")


def quantized_tensors_sha256() -> dict[str, str]:
    """{PINNED_QUANTIZE_OPTIONS' label: sha256 of the tensors quantize writes from the bundled model (CPU): each
    shard's name, then each tensor's name, dtype, shape and bytes} -- what a rerun resumes an interrupted run with,
    kept."""
    from klconvert.quantize import quantize

    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in PINNED_QUANTIZE_OPTIONS.items():
            out = quantize(BUNDLED_DIR, Path(tmp) / label, device="cpu", progress=False, **options).path
            digest = hashlib.sha256()
            for shard in sorted(out.glob("*.safetensors")):
                header = read_header(shard)
                digest.update(json.dumps(shard.name).encode())
                with open(shard, "rb") as f:
                    for name, entry in sorted(header.tensors.items()):
                        f.seek(header.data_start + entry.begin)
                        digest.update(json.dumps([name, entry.dtype, list(entry.shape)]).encode())
                        digest.update(f.read(entry.nbytes))
            hashes[label] = digest.hexdigest()
    return hashes


def record() -> dict:
    from klconvert.quantize import RESUME_FORMAT

    tokenizer = Tokenizer.from_folder(BUNDLED_DIR)
    continuation = greedy_continuation()
    result = int4_eval()
    values = {
        "files": file_checksums(),
        "prompt": PROMPT,
        "greedy_ids": continuation,
        "greedy_text": tokenizer.decode(continuation),
        "held_out_tokens": HELD_OUT_TOKENS,
        "perplexity": result.reference_perplexity,
        "perplexity_bound": result.reference_perplexity * PERPLEXITY_SLACK,
        "int4_kl_mean": result.kl_mean,
        "int4_kl_bound": result.kl_mean * KL_SLACK,
        "int4_top1": result.top1_agreement,
        "int4_router_overlap": result.routing_overlap,
        "resume_format": RESUME_FORMAT,
        "quantized_tensors_sha256": quantized_tensors_sha256(),
    }
    RECORDED.write_text(json.dumps(values, indent=1) + "\n")
    return values


def main() -> None:
    argparse.ArgumentParser(description=script_summary(__file__)).parse_args()  # --help, and no stray arguments
    v = record()
    print(f"recorded {RECORDED}: {len(v['files'])} files; held-out perplexity {v['perplexity']:.3f} "
          f"(log {math.log(v['perplexity']):.4f}) over {v['held_out_tokens']} tokens; int4 g128 KL "
          f"{v['int4_kl_mean']:.5f}, top-1 {100 * v['int4_top1']:.1f}%; greedy: {v['greedy_text']!r}")


if __name__ == "__main__":
    run_tool(main)
