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
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from tool_output import positive_int  # noqa: E402

from klconvert.entry import Interrupted, signal_of, signal_status  # noqa: E402
from klconvert.presets import PRESETS  # noqa: E402
from klconvert.quant.group_rules import SUPPORTED_BITS  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402

PRESET = "kimi-linear-48b"
LAYER_BYTES = 3.75e9  # one MoE layer of the real model in bf16 (256 experts x 3 x 1024 x 2304 x 2 bytes + attention)
FIXED_BYTES = 1.7e9   # embedding, lm_head and the dense layer 0
TIME = "/usr/bin/time"
KLCONVERT = [sys.executable, "-m", "klconvert"]


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr) of one command, under `time -v` where there is one. It runs in a process
    group of its own, stopped whole if this one is interrupted: killing `time` alone left the command converting."""
    started = time.monotonic()
    timed = os.path.exists(TIME)
    child = subprocess.Popen([TIME, "-v", *cmd] if timed else cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        err = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):   # gone already, where the interrupt came once it had ended
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    code = os.waitstatus_to_exitcode(status)
    if timed:
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
        peak = int(rss.group(1)) * 1024 if rss else 0
    else:
        peak = usage.ru_maxrss * 1024
    if code != 0:   # its own last line, not the figures `time -v` prints after it
        said = re.split(r"^\s*Command (?:exited with non-zero status|being timed)", err, maxsplit=1, flags=re.M)[0]
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {(said.strip().splitlines() or ['no message'])[-1]}")
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
        synth_s, _, _ = run_measured([*KLCONVERT, "synth", "--preset", PRESET, "--layers", str(layers),
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


def _raise_interrupted(signum: int, _frame) -> None:
    """SIGTERM's handler: raised as Ctrl-C is, so that `kill` and `timeout` remove the checkpoints too."""
    raise Interrupted(signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=script_summary(__file__))
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[2, 4])
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoints go [default: a temp dir].")
    args = parser.parse_args()
    # checked before any synth, each writing gigabytes (--layers 0 was synth's refusal, with `time -v`'s figures)
    most = PRESETS[PRESET]["num_hidden_layers"]
    if max(args.layers) > most:
        parser.error(f"--layers {max(args.layers)}: preset {PRESET} has only {most} layers")
    if args.workdir is not None and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir}: {'not a folder' if args.workdir.exists() else 'no such folder'}")
    try:
        workdir = Path(tempfile.mkdtemp(prefix="klconvert-bench-", dir=args.workdir))
    except OSError as e:
        parser.error(f"--workdir {args.workdir or tempfile.gettempdir()}: cannot make a folder in it ({e.strerror})")
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        rows = [convert_one(n, args.bits, args.device, workdir) for n in args.layers]
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM raised as one: subprocess.run stops the command it ran
        parser.exit(signal_status(signal_of(e)), f"{parser.prog}: interrupted\n")
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
