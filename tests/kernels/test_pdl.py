"""kernels/pdl.py's rule, checked on the code the compiler makes for an H100/H200 (sm_90, compiled here without a
GPU, by tests/kernels/pdl_ptx.py in a process without Triton's interpreter): every decode kernel launched with PDL
waits for its predecessor before its first global load, store or atomic -- only L2 prefetches come first -- and
lets the next kernel launch only after that wait. The kernels that read weights prefetch them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("pdl_ptx.py")
INT_MMA = {"int_mma_fwd_kernel[DENSE=False]", "int_mma_fwd_kernel[DENSE=True]"}  # with and without a dense tail
DECODE_KERNELS = INT_MMA | {"int_gemv_fwd_kernel[]", "moe_router_fwd_kernel[]", "add_rms_norm_fwd_kernel[]",
                            "kda_layer_step_fwd_kernel[]", "mla_decode_merge_kernel[]",
                            "mla_decode_fwd_kernel[FP8=False]", "mla_decode_fwd_kernel[FP8=True]"} | {
    f"moe_decode_fwd_kernel[GATED={g}, MMA={m}]" for g in (True, False) for m in (True, False)}
PREFETCHING = INT_MMA | {"int_gemv_fwd_kernel[]", "moe_router_fwd_kernel[]", "kda_layer_step_fwd_kernel[]"} | {
    k for k in DECODE_KERNELS if k.startswith("moe_decode")}


@pytest.mark.slow
def test_every_decode_kernel_waits_before_touching_memory_and_lets_go_after():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(found) == DECODE_KERNELS
    for name, k in found.items():
        assert k["launch_pdl"], name
        assert k["wait"] is not None and k["launch_dependents"] is not None, name
        assert k["wait"] < k["launch_dependents"] < k["first_memory_op"], (name, k)
        assert (k["prefetches"] > 0) == (name in PREFETCHING), (name, k)
