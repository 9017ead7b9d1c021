"""Greedy decode speed of an ONNX export under onnxruntime on CPU, beside klconvert's own runtime on the folder it
was exported from (`klconvert run` vs `klconvert run --engine onnxruntime`).

Checks first that what it times is right: onnxruntime's greedy tokens decoded one at a time (state fed back) are the
argmax of a single onnxruntime prefill over the prompt plus those tokens. Then times greedy decode of --new-tokens
after the prompt in both, with --threads threads each, best of --repeats, prefill included.

    python bench/onnx_cpu.py --model QUANTIZED_DIR --onnx EXPORT_DIR [--threads 1] [--new-tokens 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from cpu_timing import best_rates, load_text, machine_load
from klconvert.onnx.session import OnnxEngine
from klconvert.runtime.engine import load
from klconvert.script_summary import script_summary
from klconvert.tokenizer import Tokenizer

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--model", required=True, help="The checkpoint folder the export was made from.")
    ap.add_argument("--onnx", required=True, help="The folder `klconvert export-onnx` wrote.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = Tokenizer.from_folder(args.model).encode(PROMPT)
    onnx_engine = OnnxEngine(args.onnx, threads=args.threads)
    engine = load(args.model, device="cpu", max_context=len(ids) + args.new_tokens, kernels="torch")

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
