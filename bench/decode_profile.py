"""Where a decode step's GPU time goes: the released shapes (random int4 g128 weights, lm_head int8, as `klconvert
bench --preset kimi-linear-48b`), one CUDA-graph step profiled by kernel, grouped by kernel name.

Checks first that the graph replay equals the eager step bit for bit (as `klconvert bench` does), then profiles
--steps replays with torch.profiler and prints, per kernel name, launches and microseconds per step and the share of
the step's kernel time, beside the step's wall time per replay (the difference is the gaps between kernels). With PDL
on (the default on Hopper) a kernel's span includes its wait for the one before, so the spans overlap; the second
column, what each launch adds to the step (how far its end moves the step's last end so far, launches in order of
their start), splits the step with PDL on or off. KLCONVERT_PDL=0 gives each kernel's own time.

    python bench/decode_profile.py [--layers 27] [--context 4096] [--batch 1] [--steps 16] [--spread-routing]
                                   [--timeline] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from klconvert.bench import check_graph_matches_eager, fill_state, random_quantized_weights, spread_routing
from klconvert.config import KimiLinearConfig
from klconvert.kernels.pdl import use_pdl
from klconvert.presets import preset_config
from klconvert.runtime.engine import DEFAULT_DTYPES, Engine
from klconvert.script_summary import script_summary


def main() -> int:
    ap = argparse.ArgumentParser(description=script_summary(__file__))
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--spread-routing", action="store_true",
                    help="Route each sequence to its own fixed experts, as `klconvert bench --spread-routing`.")
    ap.add_argument("--timeline", action="store_true",
                    help="Also print the last step launch by launch: start, span and what it adds to the step.")
    ap.add_argument("--json", default=None, help="Also write the table here.")
    args = ap.parse_args()
    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", args.layers))
    weights = random_quantized_weights(config, 4, "cuda")
    device = torch.device("cuda")
    engine = Engine(config, weights.read, device, DEFAULT_DTYPES["cuda"], args.context + args.steps + 64, args.batch,
                    packed=weights.packed, kernels="triton", stored_schemes=weights.schemes)
    fill_state(engine, args.context)
    if args.spread_routing:
        spread_routing(engine, args.batch)
    check_graph_matches_eager(engine, args.batch, args.context)
    step = engine.decoder(args.batch)
    step.positions.fill_(args.context)
    with torch.inference_mode():
        for _ in range(8):
            step.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step.step()
        end.record()
        torch.cuda.synchronize()
        wall_us = start.elapsed_time(end) * 1e3 / args.steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step.step()
            torch.cuda.synchronize()
    launches = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    kernels = defaultdict(lambda: [0, 0.0, 0.0])  # launches, span us, us added to the step
    per_step = len(launches) // args.steps
    if per_step * args.steps != len(launches):
        raise SystemExit(f"{len(launches)} launches over {args.steps} steps: not the same launches every step")
    for i, event in enumerate(launches):
        if i % per_step == 0:   # a step's first launch: the step's span starts with it
            last_end = event.time_range.start
        k = kernels[event.name]
        k[0] += 1
        k[1] += event.device_time
        added = max(0.0, event.time_range.end - last_end)
        k[2] += added
        if args.timeline and i >= len(launches) - per_step:   # the last step, launch by launch
            first = launches[len(launches) - per_step].time_range.start
            print(f"{i % per_step:4d} start {event.time_range.start - first:8.1f} span {event.device_time:7.2f} "
                  f"added {added:7.2f}  {event.name[:80]}")
        last_end = max(last_end, event.time_range.end)
    total = sum(us for _, us, _ in kernels.values()) / args.steps
    span = sum(added for _, _, added in kernels.values()) / args.steps
    pdl = use_pdl(device)
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers, context {args.context}, batch {args.batch}: "
          f"graph replay {wall_us:.1f} us/step; kernel spans {total:.1f} us/step in "
          f"{sum(n for n, _, _ in kernels.values()) / args.steps:.0f} launches, the step's span {span:.1f} us")
    if pdl:
        print("PDL is on: each kernel's span includes its wait for the one before, so spans overlap and their sum "
              "is not a split of the step; the added column is")
    print("| kernel | launches/step | span us/step | added to the step, us | share of the step |\n"
          "|---|---:|---:|---:|---:|")
    table = []
    for name, (n, us, added) in sorted(kernels.items(), key=lambda kv: -kv[1][2]):
        table.append({"kernel": name, "launches": n / args.steps, "us": us / args.steps,
                      "added_us": added / args.steps})
        print(f"| {name[:90]} | {n / args.steps:.0f} | {us / args.steps:.1f} | {added / args.steps:.1f} | "
              f"{added / args.steps / span:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "layers": args.layers, "context": args.context,
                       "batch": args.batch, "spread_routing": args.spread_routing, "pdl": pdl,
                       "graph_us_per_step": wall_us,
                       "kernel_us_per_step": total, "step_span_us": span,
                       "kernels": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
