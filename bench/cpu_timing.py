"""What bench/decode_cpu.py and bench/onnx_cpu.py share: best-of-N decode rates, and the machine's load beside them
(other work on a shared machine slows the wall clock). Imported by name: `python bench/X.py` puts bench/ on the path.
"""
from __future__ import annotations

import os
import time


def best_rates(generate, repeats: int) -> tuple[float, float]:
    """The best new tokens per second of `repeats` calls of generate() (-> new ids [B, n]), by the wall clock and per
    CPU-second of this process (with one thread, what an idle core gives)."""
    best = best_cpu = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = generate().shape[1]
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        best, best_cpu = max(best, n / seconds), max(best_cpu, n / cpu_seconds)
    return best, best_cpu


def machine_load() -> dict:
    """The 1-minute load average and the cores, as a timing's JSON records them."""
    return {"load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}


def load_text(load: dict) -> str:
    """machine_load's figures as the timing's line says them."""
    return f"load average {load['load_average_1min']:.1f} on {load['cpus']} cores"
