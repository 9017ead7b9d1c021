"""A command the tool hands the user to paste into a shell (`klconvert pull ...`): each argument quoted as the shell
needs it, so a path with a space (or a quote, or a `$`) stays the one argument it is rather than failing, or naming
another folder."""
from __future__ import annotations

import shlex


def shell_command(*args: object) -> str:
    """ARGS as one shell line (shlex.join): an argument that needs no quoting is shown as it is."""
    return shlex.join(map(str, args))
