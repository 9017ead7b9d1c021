"""Run the klconvert command in a child process under an address-space limit and a timeout, as a hostile input's
refusal must run: one line, the right exit status, and memory bounded while refusing."""
from __future__ import annotations

import functools
import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass

# The limit is what the command maps once its libraries are imported (python + CPU torch + tiktoken + jinja: ~0.66
# GB of address space; a CUDA build of torch maps more), plus HEADROOM_BYTES for the work: a refusal must fit in
# that, and a real run of the tiny model does (a test checks it, so the limit is not so tight that refusals pass
# for the wrong reason).
HEADROOM_BYTES = 512 << 20
TIMEOUT_SECONDS = 120
_IMPORTS = "import torch, tiktoken, jinja2, safetensors, klconvert.cli, klconvert.runtime.engine, klconvert.tokenizer"


# Each thread's malloc arena reserves 64 MB of address space and OpenMP starts a thread per core, so without a cap the
# limit would measure the machine's cores (a 16-core GPU host failed a real run with it), not the command's memory.
_CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2"}


@functools.cache
def address_space_limit() -> int:
    status = subprocess.run([sys.executable, "-c", f"{_IMPORTS}; print(open('/proc/self/status').read())"],
                            capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=True,
                            env=_CHILD_ENV).stdout
    return int(re.search(r"VmPeak:\s+(\d+) kB", status).group(1)) * 1024 + HEADROOM_BYTES


@dataclass(frozen=True)
class Finished:
    code: int
    out: str
    err: str

    def error_line(self, exit_code: int = 2) -> str:
        """The one `klconvert: error:` line; asserts there is nothing else on stderr and no traceback."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == exit_code, self.err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("klconvert: error: "), self.err[-2000:]
        return lines[0]


def klconvert_bounded(*args: str, stdin: bytes | None = None) -> Finished:
    """`python -m klconvert ARGS` under address_space_limit() and TIMEOUT_SECONDS."""
    limit = address_space_limit()
    bound = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "klconvert", *map(str, args)], input=stdin, capture_output=True,
                          env=_CHILD_ENV, timeout=TIMEOUT_SECONDS, preexec_fn=bound)
    return Finished(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
