"""Render a model folder's chat template -- a program someone else wrote -- in a child process bounded in memory,
CPU time, loop work and output size, in the sandbox transformers renders it in.

Jinja's sandbox bounds each `range` (100,000 items) but not nested loops' product, and a single expression such as
`'a' * 10**10` or `'a'.ljust(10**10)` allocates in one C call that no in-process hook can stop; a child process
under resource limits can be stopped whatever the template does.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from klconvert.errors import ERROR_CHARS, KLError

MEMORY_BYTES = 512 << 20     # the child's address space, plus 16 bytes per byte of input (python + jinja: ~40 MB)
CPU_SECONDS = 10             # the released template renders in milliseconds
WALL_SECONDS = 60            # a child that does not end (or start) within this is killed
LOOP_ITEMS = 1_000_000       # range() items over the whole render, all loops together
OUTPUT_CHARS_OVER_INPUT = 4  # the rendered text may be 4x its input, plus 1 M characters of the template's own
OUTPUT_CHARS_EXTRA = 1 << 20
# The child's working folder, which `python -m` puts first on its import path: the folder klconvert is imported
# from, never the user's (a json.py or jinja2.py there -- a cloned model repo's, say -- would run in the child).
CHILD_FOLDER = Path(__file__).resolve().parent.parent


class RenderPastBound(KLError):
    """A render stopped at the caller's bound on its length (render_chat_template's max_chars): the text is too
    long for what the caller can take, which is no fault of the template."""


def render_chat_template(template: str, where: str, max_chars: int | None = None, **variables) -> str:
    """The template rendered with `variables` (JSON values), or a KLError naming `where` and what went wrong.
    `max_chars`: the caller's bound on the rendered text (e.g. what the context can hold); a render past it, where
    tighter than the renderer's own, is a RenderPastBound."""
    request = json.dumps({"template": template, "variables": variables})
    output_chars = OUTPUT_CHARS_OVER_INPUT * len(request) + OUTPUT_CHARS_EXTRA
    callers_bound = max_chars is not None and max_chars < output_chars
    if callers_bound:
        output_chars = max_chars
    limits = {"memory": MEMORY_BYTES + 16 * len(request), "cpu": CPU_SECONDS, "loop_items": LOOP_ITEMS,
              "output_chars": output_chars}
    try:
        proc = subprocess.run([sys.executable, "-m", "klconvert.chat_template"],
                              input=json.dumps({"limits": limits, "request": request}).encode("utf-8"),
                              capture_output=True, timeout=WALL_SECONDS, cwd=CHILD_FOLDER)
    except subprocess.TimeoutExpired:
        raise _failed(where, f"it did not finish in {WALL_SECONDS} s") from None
    try:
        answer = json.loads(proc.stdout.decode("utf-8"))
    except ValueError:
        answer = None
    if proc.returncode < 0:   # the CPU limit's signal: the template ran too long
        raise _failed(where, f"it used more than {CPU_SECONDS} s of CPU")
    if proc.returncode != 0 or not isinstance(answer, dict):   # the child itself failed, before or after the render
        said = " ".join(proc.stderr.decode("utf-8", "replace").split())[-ERROR_CHARS:]
        raise KLError(f"{where}: the chat template renderer could not run (it exited with status {proc.returncode}: "
                      f"{said}); repair klconvert's install: pip install --force-reinstall klconvert")
    if "no_jinja2" in answer:
        raise KLError(f"rendering a chat template needs jinja2, which cannot be imported ({answer['no_jinja2']}); "
                      "repair the install: pip install --force-reinstall jinja2")
    if "error" in answer:
        if callers_bound and answer.get("past_output_chars"):
            raise RenderPastBound(f"{where}: the rendered chat is longer than {output_chars:,} characters")
        raise _failed(where, answer["error"])
    return answer["text"]


def _failed(where: str, reason: str) -> KLError:
    return KLError(f"{where}: chat_template failed to render ({reason}); fix the template or send the prompt as "
                   "plain text")


# ---- the child ---------------------------------------------------------------------------------------------
class _TooMuchWork(Exception):
    pass


class _PastOutputChars(_TooMuchWork):
    pass


def _render_bounded(template: str, variables: dict, loop_items: int, output_chars: int) -> str:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    # As transformers renders chat templates: sandboxed, immutable, trim/lstrip blocks, loop controls.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    used = [0]

    def bounded_range(*args):
        items = safe_range(*args)
        used[0] += len(items)
        if used[0] > loop_items:
            raise _TooMuchWork(f"its loops run over more than {loop_items:,} range() items")
        return items

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # transformers' filter: JSON without Jinja's HTML escaping, non-ASCII written as it is (so the tokenizer's
        # codes for special-token text in a message come back from `| tojson` as they went in)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(range=bounded_range, raise_exception=raise_exception)
    parts, size = [], 0
    for part in env.from_string(template).generate(**variables):
        size += len(part)
        if size > output_chars:
            raise _PastOutputChars(f"it writes more than {output_chars:,} characters")
        parts.append(part)
    return "".join(parts)


def _child() -> None:
    """Read {"limits", "request"} on stdin, set the limits, render, write {"text"} or {"error"} on stdout
    ({"no_jinja2"} when jinja2 cannot be imported)."""
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    limits = job["limits"]
    try:
        import resource
    except ImportError:  # not a POSIX system: the parent's wall-clock limit still holds
        resource = None
    if resource is not None:
        for which, soft in ((resource.RLIMIT_CPU, limits["cpu"]), (resource.RLIMIT_AS, limits["memory"])):
            hard = resource.getrlimit(which)[1]  # a limit may be lowered, never raised past the inherited hard one
            resource.setrlimit(which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    request = json.loads(job["request"])
    out_of_memory = f"it needs more than {limits['memory'] >> 20} MB of memory"
    try:   # a dependency of klconvert's: failing here is the install's fault, not the template's
        import jinja2.ext  # noqa: F401
        import jinja2.sandbox  # noqa: F401
    except ImportError as e:
        sys.stdout.write(json.dumps({"no_jinja2": str(e)}))
        return
    try:
        answer = {"text": _render_bounded(request["template"], request["variables"], limits["loop_items"],
                                          limits["output_chars"])}
    except MemoryError:
        answer = {"error": out_of_memory}
    except RecursionError:
        answer = {"error": "it recurses too deeply"}
    except _TooMuchWork as e:
        answer = {"error": str(e), "past_output_chars": isinstance(e, _PastOutputChars)}
    except Exception as e:  # a template is a program: whatever it raises is the template's fault
        said = " ".join(str(e)[:ERROR_CHARS].split())   # jinja may quote several lines; raise_exception any length
        answer = {"error": f"{type(e).__name__}: {said}"}
    try:   # the answer's JSON (control characters take 6 bytes) may not fit where the text did
        sys.stdout.write(json.dumps(answer))
    except MemoryError:
        sys.stdout.write(json.dumps({"error": out_of_memory}))


if __name__ == "__main__":
    _child()
