"""Convert real-shape synthetic checkpoints (--layers 2 and 4 by default) and report input MB/s and peak RSS.

Each size is synthesized with `klconvert synth --preset kimi-linear-48b --layers N`, converted with
`klconvert quantize --bits B` under `/usr/bin/time -v` (os.wait4 where that is missing), then deleted.
Peak RSS should stay flat as layers are added: the converter holds one module at a time.
Writes JSON to $OUT/convert.json when OUT is set.

    python bench/convert.py                      # CPU: layers 2 and 4, int4
    python bench/convert.py --device cuda        # quantize on the GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from klconvert.script_summary import script_summary

LAYER_BYTES = 3.75e9  # one MoE layer of the real model in bf16 (256 experts x 3 x 1024 x 2304 x 2 bytes + attention)
FIXED_BYTES = 1.7e9   # embedding, lm_head and the dense layer 0
TIME = "/usr/bin/time"
KLCONVERT = [sys.executable, "-m", "klconvert"]


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr) of one command."""
    started = time.monotonic()
    if os.path.exists(TIME):
        proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak, code, err = int(rss.group(1)) * 1024 if rss else 0, proc.returncode, proc.stderr
    else:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        peak, code = usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{err[-3000:]}")
    return time.monotonic() - started, peak, err


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def convert_one(layers: int, bits: int, device: str, workdir: Path) -> dict:
    need = FIXED_BYTES + layers * LAYER_BYTES * (1 + bits / 16 + 0.05)
    free = shutil.disk_usage(workdir).free
    if free < need * 1.1:
        raise SystemExit(f"{workdir}: {free / 1e9:.1f} GB free, --layers {layers} needs about {need / 1e9:.1f} GB")
    src, out = workdir / f"synth-{layers}", workdir / f"synth-{layers}-w{bits}a16"
    try:
        synth_s, _, _ = run_measured([*KLCONVERT, "synth", "--preset", "kimi-linear-48b", "--layers", str(layers),
                                      "--out", str(src)])
        subprocess.run(["sync"], check=True)
        cmd = [*KLCONVERT, "quantize", str(src), str(out), "--bits", str(bits), "--device", device]
        wall, peak, err = run_measured(cmd)
        summary = next(line for line in reversed(err.splitlines()) if line.startswith("quantized "))
        convert_s = float(re.search(r"\| ([\d.]+) s, ", summary).group(1))
        size_in, size_out = folder_bytes(src), folder_bytes(out)
        return {"layers": layers, "bits": bits, "device": device, "input_gb": size_in / 1e9,
                "output_gb": size_out / 1e9, "synth_s": synth_s, "convert_s": convert_s, "wall_s": wall,
                "input_mb_s": size_in / 1e6 / convert_s, "input_mb_s_wall": size_in / 1e6 / wall,
                "peak_rss_gb": peak / 1e9, "command": " ".join(["/usr/bin/time -v", "klconvert", *cmd[3:]]),
                "summary": summary}
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=script_summary(__file__))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoints go [default: a temp dir].")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="klconvert-bench-", dir=args.workdir))
    try:
        rows = [convert_one(n, args.bits, args.device, workdir) for n in args.layers]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": device_name(args.device), "rows": rows}
    print(f"{report['date']}  {report['machine']}")
    print("| layers | input GB | output GB | convert s | input MB/s | wall s | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['input_gb']:.2f} | {r['output_gb']:.2f} | {r['convert_s']:.1f} | "
              f"{r['input_mb_s']:.0f} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    for r in rows:
        print(r["command"], "\n  ", r["summary"])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "convert.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
