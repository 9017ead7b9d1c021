"""kernels/pdl.py's rule, checked on the code the compiler makes for an H100/H200 (sm_90, compiled here without a
GPU, by tests/kernels/pdl_ptx.py in a process without Triton's interpreter): every decode kernel launched with PDL
waits for its predecessor before its first global load, store or atomic -- only L2 prefetches come first -- and
lets the next kernel launch only after that wait -- except that the MoE's down launch, when it prefetches, reads the
router's expert ids (written two launches back) before it, past L1. The kernels that read weights prefetch them,
unless told not to (weights larger than half the L2); the down launch, given a later launch's weight, that too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("pdl_ptx.py")
INT_MMA = {"int_mma_fwd_kernel[PREFETCH=True, DENSE=False]", "int_mma_fwd_kernel[PREFETCH=True, DENSE=True]"}
DOWN = {f"moe_decode_fwd_kernel[AFTER={a}, GATED=False, MMA={m}, PREFETCH=True, RAW=False]"  # ids before the wait
        for a, m in ((False, True), (False, False), (True, True))}
# later launches' weights too
AFTER = {"moe_decode_fwd_kernel[AFTER=True, GATED=False, MMA=True, PREFETCH=True, RAW=False]"}
DECODE_KERNELS = INT_MMA | DOWN | AFTER | {
    "int_mma_fwd_kernel[PREFETCH=False, DENSE=False]", "int_gemv_fwd_kernel[PREFETCH=True]",
    "moe_router_fwd_kernel[]", "add_rms_norm_fwd_kernel[]", "kda_layer_step_fwd_kernel[PREFETCH=True]",
    "mla_decode_merge_kernel[]",
    "mla_decode_fwd_kernel[FP8=False]", "mla_decode_fwd_kernel[FP8=True]", "mla_write_rows_kernel[FP8=False]",
    "mla_write_rows_kernel[FP8=True]"} | {
    f"moe_decode_fwd_kernel[AFTER=False, GATED=True, MMA={m}, PREFETCH=True, RAW={r}]"
    for m, r in ((True, False), (False, False), (True, True))} | {
    f"moe_decode_fwd_kernel[AFTER=False, GATED={g}, MMA=True, PREFETCH=False, RAW=False]" for g in (True, False)}
PREFETCHING = INT_MMA | AFTER | {"int_gemv_fwd_kernel[PREFETCH=True]", "moe_router_fwd_kernel[]",
                                 "kda_layer_step_fwd_kernel[PREFETCH=True]"} | {
    k for k in DECODE_KERNELS if k.startswith("moe_decode") and "PREFETCH=True" in k}


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
        first = k["first_memory_op_past_l2_loads"] if name in DOWN else k["first_memory_op"]
        assert k["wait"] < k["launch_dependents"] < first, (name, k)
        if name in DOWN:
            assert k["first_memory_op"] < k["wait"], (name, k)  # the ids are read first: the rule is checked above
        assert (k["prefetches"] > 0) == (name in PREFETCHING), (name, k)
    for name in AFTER:  # the later launches' weights add prefetches to what the launch prefetches without them
        assert found[name]["prefetches"] > found[name.replace("AFTER=True", "AFTER=False")]["prefetches"], name


def test_only_weights_within_half_the_l2_are_prefetched(monkeypatch):
    """An H200's lm_head (0.2-0.4 GB) runs in many waves: prefetched, it read 82 us (int4) against 64 without."""
    import torch

    from klconvert.kernels import pdl

    monkeypatch.setattr(pdl, "_l2_bytes", lambda device: 50 << 20)
    gpu = torch.device("cuda")
    assert pdl.prefetch_fits(gpu, 25 << 20) and not pdl.prefetch_fits(gpu, (25 << 20) + 1)
