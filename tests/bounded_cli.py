"""Run the klconvert command in a child process under an address-space limit and a timeout, as a hostile input's
refusal must run: one line, the right exit status, and memory bounded while refusing."""
from __future__ import annotations

import resource
import subprocess
import sys
from dataclasses import dataclass

# Python + torch + tiktoken + jinja map ~0.66 GB of address space before any work (VmSize); the limit leaves
# ~0.5 GB above that, and a real run of the tiny model fits under it (tests check that too).
ADDRESS_SPACE_BYTES = 1200 << 20
TIMEOUT_SECONDS = 120


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


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))


def klconvert_bounded(*args: str, stdin: bytes | None = None, cwd=None) -> Finished:
    """`python -m klconvert ARGS` under ADDRESS_SPACE_BYTES and TIMEOUT_SECONDS."""
    proc = subprocess.run([sys.executable, "-m", "klconvert", *map(str, args)], input=stdin, capture_output=True,
                          timeout=TIMEOUT_SECONDS, preexec_fn=_limit_memory, cwd=cwd)
    return Finished(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))
