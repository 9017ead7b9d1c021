"""Greedy decode speed of a model on CPU (default: the bundled `tiny`), as `klconvert run` generates.

Checks first that what it times is right: the greedy tokens decoded one at a time are the argmax of a single
prefill over the prompt plus those tokens (teacher forcing), so the decode path agrees with the prefill path.
Then times greedy decode of --new-tokens after the prompt with --threads torch threads, best of --repeats, and
prints tokens/s by the wall clock and, since other work on a shared machine slows the wall clock, by this
process's CPU time as well (with one thread that is what an idle core gives), with the load average.

    python bench/decode_cpu.py [--model tiny] [--threads 2] [--new-tokens 200] [--repeats 3]
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
from klconvert.models import resolve_model  # noqa: E402
from klconvert.runtime.engine import load  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--model", default="tiny", help="Checkpoint folder, or tiny (the bundled model).")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--new-tokens", type=positive_int, default=200)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    try:
        return timed(args)
    except KLError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")


def timed(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    ids = Tokenizer.from_folder(folder).encode(PROMPT)
    engine = load(folder, device="cpu", dtype=args.dtype, max_context=len(ids) + args.new_tokens, kernels="torch")

    new = engine.generate(ids, args.new_tokens, stop_ids=frozenset())[0].tolist()   # all of them, timed
    forced = engine.forward(torch.tensor([ids + new[:-1]]))[0, len(ids) - 1:].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(new, forced)) / len(new)
    print(f"check: decode tokens vs prefill argmax, {100 * agree:.1f}% agree over {len(new)} tokens", flush=True)
    if agree < 0.95:
        print("FAILED: the decode path disagrees with the prefill path", file=sys.stderr)
        return 1

    best, best_cpu = best_rates(lambda: engine.generate(ids, args.new_tokens, stop_ids=frozenset()), args.repeats)
    machine = machine_load()
    res = {"model": str(folder), "threads": args.threads, "dtype": args.dtype, "new_tokens": args.new_tokens,
           "tokens_per_s": round(best, 1), "tokens_per_cpu_s": round(best_cpu, 1), **machine}
    print(f"greedy decode, {args.threads} threads, {args.dtype}: {best:.1f} tokens/s wall clock, {best_cpu:.1f} "
          f"tokens per CPU-second (prefill included; {load_text(machine)})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
