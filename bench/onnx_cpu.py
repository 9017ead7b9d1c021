"""Greedy decode speed of an ONNX export under onnxruntime on CPU, beside klconvert's own runtime on the folder it
was exported from (`klconvert run` vs `klconvert run --engine onnxruntime`).

Checks first that what it times is right: both engines' prefills of the prompt give the same logits (the export
was made from --model), and onnxruntime's greedy tokens decoded one at a time (state fed back) are the argmax
of a single onnxruntime prefill over the prompt plus those tokens. Then times greedy decode of --new-tokens
after the prompt in both, with --threads threads each, best of --repeats, prefill included.

    python bench/onnx_cpu.py --model QUANTIZED_DIR --onnx EXPORT_DIR [--threads 1] [--new-tokens 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from cpu_timing import best_rates, load_text, machine_load  # noqa: E402
from tool_output import positive_int  # noqa: E402

from klconvert.errors import KLError  # noqa: E402
from klconvert.onnx.session import OnnxEngine  # noqa: E402
from klconvert.runtime.engine import load  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
# RMS(onnxruntime's prompt logits - klconvert's) / RMS(klconvert's) of an export and the folder it came from: klconvert
# rounds dequantized weights to bf16 (under 5e-3, tests/test_onnx_export.py), where the export of the bundled model's
# int4 beside the bundled model itself is 0.09
SAME_MODEL_BOUND = 1e-2


def main() -> int:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--model", required=True, help="The checkpoint folder the export was made from.")
    ap.add_argument("--onnx", required=True, help="The folder `klconvert export-onnx` wrote.")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--new-tokens", type=positive_int, default=200)
    ap.add_argument("--repeats", type=positive_int, default=3)
    args = ap.parse_args()
    try:
        return timed(args)
    except KLError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")


def refuse_another_model(args: argparse.Namespace, onnx_engine: OnnxEngine, engine, ids: list[int]) -> None:
    """KLError unless the prompt's prefill gives the same logits in both engines: the export records no checkpoint it
    came from, and an export of another model was timed beside --model as if one model's."""
    exported, own = onnx_engine.forward([ids])[0].double(), engine.forward(torch.tensor([ids]))[0].double()
    if exported.shape != own.shape:
        differs = f"its logits are {list(exported.shape)} over the prompt, --model {args.model}'s {list(own.shape)}"
    else:
        error = ((exported - own).pow(2).mean().sqrt() / own.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        if error <= SAME_MODEL_BOUND:
            return
        differs = f"its logits over the prompt differ from --model {args.model}'s by {error:.3g} (relative RMS)"
    raise KLError(f"--onnx {args.onnx}: {differs}: it was not exported from that folder; give the folder it was "
                  "exported from as --model, or export this one (klconvert export-onnx)")


def timed(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    ids = Tokenizer.from_folder(args.model).encode(PROMPT)
    onnx_engine = OnnxEngine(args.onnx, threads=args.threads)
    engine = load(args.model, device="cpu", max_context=len(ids) + args.new_tokens, kernels="torch")
    refuse_another_model(args, onnx_engine, engine, ids)

    no_stop = frozenset()   # every one of --new-tokens decoded (and timed), past an end of turn
    new = onnx_engine.generate([ids], args.new_tokens, stop_ids=no_stop)[0].tolist()
    forced = onnx_engine.forward([ids + new[:-1]])[0, len(ids) - 1:].argmax(-1).tolist()
    if new != forced:
        print("FAILED: onnxruntime's decode disagrees with its prefill", file=sys.stderr)
        return 1
    print(f"check: {len(new)} decoded tokens equal the prefill argmax", flush=True)

    onnx_run = lambda: onnx_engine.generate([ids], args.new_tokens, stop_ids=no_stop)
    klconvert_run = lambda: engine.generate(ids, args.new_tokens, stop_ids=no_stop)
    machine = machine_load()
    res = {"model": args.model, "threads": args.threads, "new_tokens": args.new_tokens,
           "onnxruntime_tokens_per_s": round(best_rates(onnx_run, args.repeats)[0], 1),
           "klconvert_tokens_per_s": round(best_rates(klconvert_run, args.repeats)[0], 1), **machine}
    print(f"greedy decode, {args.threads} threads, fp32: onnxruntime {res['onnxruntime_tokens_per_s']} tokens/s, "
          f"klconvert {res['klconvert_tokens_per_s']} tokens/s (prefill included; {load_text(machine)})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
