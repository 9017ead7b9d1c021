"""A long prompt's prefill on the CPU stays within a bounded workspace: the MLA layers' attention must not fall back to
SDPA's math form, whose T x T scores per head took 9 GB for a 14,400-token prompt of the bundled model; and the
process's resident memory must stay near the workspace the memory plan counts, which the temporaries glibc kept on
its heap once took it to 1.3-5x (kernels/naive_kda.kda_chunked and runtime/host_malloc.py say why)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.config import KimiLinearConfig
from klconvert.models import BUNDLED_DIR
from klconvert.runtime.host_malloc import glibc
from klconvert.runtime.kda import CHUNK

LENGTHS = (2048, 8192)   # one segment each (MLA attends with start 0); 32 and 128 KDA chunks a layer

# In a fresh process, so that its memory is these prefills': the bundled model loaded on the CPU for `batch`
# sequences, its plan holding every position's logits where `all_logits` (as eval loads it); one sequence's prompt of
# `warm` tokens run first (the libraries' first run of this code pages in ~14 MB of their files and sets up their
# buffers, once: theirs, as their import is, not the plan's); then for each length the
# resident bytes before the batch's prefill (the heap's free pages handed back first, so that reusing them counts as
# growth), the peak during it (the kernel's high-water mark reset just before; where it cannot be, the process's peak
# so far) and the plan's prefill workspace for it (the decode step's is not this prefill's). Each of `runs` is a
# prefill, measured in turn at each length in the order given: generate's (the last logits), forward's, or
# forward_segments' (every position's, each row's log-softmax taken as eval's are).
PREFILL = '''
import ctypes, resource, torch
import klconvert
from klconvert.models import BUNDLED_DIR
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
engine = klconvert.load(BUNDLED_DIR, device="cpu", max_context={context}, batch={batch}, all_logits={all_logits})
ids = torch.randint(0, 4096, ({batch}, {context}), generator=torch.Generator().manual_seed(0))
engine.prefill(ids[:1, :{warm}])
for tokens in {lengths}:
    for run in {runs}:
        ctypes.CDLL(None).malloc_trim(0)
        before = status("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            peak = lambda: status("VmHWM:")
        except OSError:
            peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        exec(run)
        print(tokens, before, peak(), engine.plan.prefill_workspace_for(tokens))
'''


LAST_LOGITS = "engine.prefill(ids[:, :tokens])"
ALL_LOGITS = "for rows in engine.forward_segments(ids[:, :tokens]): rows.log_softmax(-1)"


def prefill_growth(lengths: tuple[int, ...], batch: int = 1, warm: int = CHUNK,
                   runs: tuple[str, ...] = (LAST_LOGITS,)) -> list[tuple[int, int, int]]:
    """(tokens, the peak's growth, the plan's workspace) of a batch's prefill of each length by each of `runs`
    (a length's rows in the order of `runs`), PREFILL's figures; the plan holds every position's logits where a run
    makes them (any but LAST_LOGITS)."""
    script = PREFILL.format(context=max(lengths), batch=batch, warm=warm, lengths=lengths, runs=runs,
                            all_logits=runs != (LAST_LOGITS,))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [(tokens, peak - before, workspace)
            for tokens, before, peak, workspace in (map(int, line.split()) for line in done.stdout.splitlines())]
    # the tests' asserts run over these rows: a child that printed none of them would pass them all
    asked = [tokens for tokens in lengths for _ in runs]
    assert [tokens for tokens, *_ in rows] == asked, f"asked {asked}, the child printed {done.stdout!r}"
    return rows


# The peak's growth over the plan's workspace (38 MB at 2,048 tokens, 133 MB at 8,192) on a 2-core box, 2026-12-04,
# 2, 1 or 4 torch threads: 0.93-1.14 now (over 40 runs of each length); before kda_chunked's D in one tensor and the
# mmap threshold fixed around a prefill 1.42-1.85 and 1.19-1.32 (12 runs), with the first alone 1.0-1.53 and
# 0.97-1.25 (12 runs).
WORKSPACE_MULTIPLE = 1.2


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="reads /proc/self/status; the bound is glibc's malloc with its threshold fixed")
def test_a_long_prompts_prefill_stays_near_the_plans_workspace():
    for tokens, growth, workspace in prefill_growth(LENGTHS):
        # the math form's scores alone: 4 heads x 8,192^2 fp32 = 1 GiB, held twice or more (scores, softmax)
        assert growth < 2**30, \
            f"{tokens} tokens: the prefill's peak grew {growth / 2**20:.0f} MB: MLA's scores held whole?"
        assert growth <= WORKSPACE_MULTIPLE * workspace, \
            (f"{tokens} tokens: the prefill's peak resident memory grew {growth / 2**20:.0f} MB, "
             f"{growth / workspace:.2f}x the plan's workspace of {workspace / 2**20:.0f} MB (bound "
             f"{WORKSPACE_MULTIPLE}x): temporaries made per chunk or per block and kept resident by the allocator?")


# One prompt's every-position logits: a segment's made at once grow with its tokens as the workspace does, ~2.9x it
# and ~1.4x it with the logits forward returns at 2,048 tokens as at 8,192, in a third of the time.
LOGITS_TOKENS = 2048
FORWARD = "engine.forward(ids[:, :tokens])"


@pytest.fixture(scope="module")
def logits_growth() -> dict[str, tuple[int, int, int]]:
    """prefill_growth's row of forward's and of forward_segments' run over LOGITS_TOKENS of one prompt: one child
    loads the model (as each test's own child did) and measures both, forward first, whose bound is the nearer to
    what it grew before it held its logits once; forward_segments' grew some 2.4x its bound before."""
    return dict(zip((FORWARD, ALL_LOGITS), prefill_growth((LOGITS_TOKENS,), runs=(FORWARD, ALL_LOGITS))))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="reads /proc/self/status; the bound is glibc's malloc with its threshold fixed")
def test_every_positions_logits_stay_within_the_plans_workspace(logits_growth):
    """forward_segments (what eval reads) made a whole segment's logits at once, [S, vocab] fp32 and copies of them
    that no plan counted: 8,192 tokens of the bundled model grew 416 MB against a workspace of 133 MB (2026-12-07),
    and the release's 163,840-word vocabulary makes them 2.7 GB at 4,096 tokens; 2,048 tokens grew 109-111 MB against
    38 (a9d7847's parent). They come a few positions at a time, which the plan counts: 135 MB against 137, and 35-39
    MB against 42."""
    tokens, growth, workspace = logits_growth[ALL_LOGITS]
    assert growth <= WORKSPACE_MULTIPLE * workspace, \
        (f"{tokens} tokens' logits grew the peak resident memory {growth / 2**20:.0f} MB, {growth / workspace:.2f}x "
         f"the plan's workspace of {workspace / 2**20:.0f} MB (bound {WORKSPACE_MULTIPLE}x): a segment's logits "
         "made at once?")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="reads /proc/self/status; the bound is glibc's malloc with its threshold fixed")
def test_forward_holds_its_logits_once(logits_growth):
    """forward joined the segments' logits (twice them), each made whole: 8,192 tokens of the bundled model grew
    381 MB, against a workspace of 133 MB and the 136 MB they are (2026-12-07), and 2,048 tokens 99-107 MB against 38
    and 34 (a9d7847's parent). It fills its output a few positions at a time: 157 MB, and 47-49 MB."""
    vocab = KimiLinearConfig.from_file(BUNDLED_DIR / CONFIG_FILE).vocab_size
    tokens, growth, workspace = logits_growth[FORWARD]
    logits = tokens * vocab * 4
    assert growth <= WORKSPACE_MULTIPLE * (workspace + logits), \
        (f"forward over {tokens} tokens grew the peak resident memory {growth / 2**20:.0f} MB, over "
         f"{WORKSPACE_MULTIPLE}x the plan's workspace ({workspace / 2**20:.0f} MB) and its logits "
         f"({logits / 2**20:.0f} MB)")


SHORT, BATCH = 23, 256   # helper-140's prompts of a few tokens, many at once: one chunk, shorter than CHUNK
# The plan's prefill workspace over the short batch's peak growth: 1.25x now, the prompts run one at a time (2026-12-06:
# 9.9 MB against 7.9; the batch's last logits are planned twice, for generate's join); 1.0x when they ran at once and
# the plan sized B prompts' temporaries; 5.6x when the plan and kda_chunked sized the pairwise decay for a whole chunk
# (its untouched part not resident: 2,000 such prompts were refused a 22 GB host).
SHORT_PLAN_MULTIPLE = 2


@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="reads /proc/self/status; the bound is glibc's malloc with its threshold fixed")
def test_a_batch_of_short_prompts_is_planned_near_what_it_takes():
    """The plan's KDA chunk for a segment shorter than CHUNK is the segment: still an upper bound, not 6x over."""
    [(tokens, growth, workspace)] = prefill_growth((SHORT,), batch=BATCH, warm=SHORT)
    assert growth <= WORKSPACE_MULTIPLE * workspace, \
        f"{BATCH} prompts of {tokens} tokens grew {growth / 2**20:.0f} MB, over the plan's {workspace / 2**20:.0f} MB"
    assert workspace <= SHORT_PLAN_MULTIPLE * growth, \
        (f"the plan's workspace for {BATCH} prompts of {tokens} tokens is {workspace / 2**20:.0f} MB, "
         f"{workspace / growth:.1f}x the {growth / 2**20:.0f} MB their prefill grew (bound {SHORT_PLAN_MULTIPLE}x)")


LONG_BATCH, LONG_BATCH_TOKENS = 16, 2048   # half the tokens of 8 prompts of 8,192, and further from the bound


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not glibc(),
                    reason="reads /proc/self/status; the bound is glibc's malloc with its threshold fixed")
def test_a_batchs_every_position_logits_stay_within_the_plans_workspace():
    """forward_segments holds each prompt's last hidden rows of a segment until the segment's logits are made, which
    the plan counted for one prompt: 8 prompts of 8,192 tokens of the bundled model grew the peak 202 MB against a
    workspace of 137 MB (1.47x, 2026-12-07), and 16 prompts of 2,048 tokens 72 MB against 42 (1.70x: the uncounted
    rows are 15 prompts' against the workspace of one, at any length). The plan counts them for the batch: 200 MB
    against 201, and 71-75 MB against 74."""
    [(tokens, growth, workspace)] = prefill_growth((LONG_BATCH_TOKENS,), batch=LONG_BATCH, runs=(ALL_LOGITS,))
    assert growth <= WORKSPACE_MULTIPLE * workspace, \
        (f"{LONG_BATCH} prompts' {tokens} tokens' logits grew the peak resident memory {growth / 2**20:.0f} MB, "
         f"{growth / workspace:.2f}x the plan's workspace of {workspace / 2**20:.0f} MB (bound {WORKSPACE_MULTIPLE}x)")


# In a fresh process on 2 torch threads (the test's own has started its workers): the process's threads when the plan
# measures the host, and once the weights are read.
THREADS_AT_THE_PLAN = '''
import os, torch
import klconvert
import klconvert.runtime.engine as engine_module
from klconvert.models import BUNDLED_DIR
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
measure = engine_module.host_memory
at_plan = []
engine_module.host_memory = lambda **room: at_plan.append(threads()) or measure(**room)
klconvert.load(BUNDLED_DIR, device="cpu", max_context=64)
print(at_plan[0], threads())
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the threads in /proc/self/task")
def test_the_host_is_measured_with_torchs_worker_threads_started():
    """torch's intra-op workers started at the first parallel op, reading the weights, after the plan measured the
    host: each maps a stack of ulimit -s (8 MiB), which ulimit -d and -v count and the plan did not, so a 16,500-token
    prompt of the bundled model on 2 threads was taken under ulimit -d 588-592 MB and ran out part-way. They are
    started before the host is measured: no thread starts while the weights are read."""
    done = subprocess.run([sys.executable, "-c", THREADS_AT_THE_PLAN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    at_plan, loaded = map(int, done.stdout.split())
    assert loaded == at_plan, f"{loaded - at_plan} thread(s) started after the plan measured the host"
