"""The summary the developer scripts in tools/ and bench/ give their --help: the first paragraph of the script's
docstring, read from its source file, since under `python -OO` a module's __doc__ is None (each took
description=__doc__.split(...) and died there before printing its usage)."""
from __future__ import annotations

import ast
from pathlib import Path


def script_summary(script: str) -> str:
    """The first paragraph of the docstring of the Python file `script` (a script passes its __file__)."""
    return ast.get_docstring(ast.parse(Path(script).read_text(encoding="utf-8"))).split("\n\n")[0]
