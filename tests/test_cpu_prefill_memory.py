"""A long prompt's prefill on the CPU stays within a bounded workspace: the MLA layers' attention must not fall back to
SDPA's math form, whose T x T scores per head took 9 GB for a 14,400-token prompt of the bundled model."""
from __future__ import annotations

import subprocess
import sys

# In a fresh process, so its peak resident memory is this prefill's: the peak after loading, then after a
# 6,000-token prefill (one segment: MLA attends with start 0), in MB.
PREFILL = '''
import resource, torch
import klconvert
from klconvert.models import BUNDLED_DIR
engine = klconvert.load(BUNDLED_DIR, device="cpu", max_context=6016)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
loaded = peak()
engine.prefill(torch.randint(0, 4096, (1, 6000), generator=torch.Generator().manual_seed(0)))
print(loaded, peak())
'''


def test_a_long_prompts_prefill_does_not_hold_its_scores_whole():
    done = subprocess.run([sys.executable, "-c", PREFILL], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, after = map(float, done.stdout.split())
    # the math form's scores alone: 4 heads x 6,000^2 fp32 = 576 MB, held twice or more (scores, softmax)
    assert after - loaded < 400, (loaded, after)
