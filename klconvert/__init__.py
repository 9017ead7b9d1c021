"""klconvert: pull, quantize and run Moonshot AI's Kimi Linear on one GPU.

The names below import on first use, so `import klconvert.errors` or `klconvert --help` does not load torch.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

# In a source tree (this repository, an unpacked sdist) runtime/, kernels/ and recipes/ sit beside this folder; an
# install puts them inside it (pyproject's package-dir). Imported from a tree -- Python started in its root, where
# the folder hides an installed klconvert -- they are found beside it.
_TREE = Path(__file__).resolve().parent.parent
if not (_TREE / "klconvert" / "runtime").is_dir() and (_TREE / "runtime" / "model.py").is_file():
    __path__.append(str(_TREE))

_LAZY = {"Engine": "klconvert.runtime.engine", "load": "klconvert.runtime.engine", "KLError": "klconvert.errors",
         "Tokenizer": "klconvert.tokenizer"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'klconvert' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
