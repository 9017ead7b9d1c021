"""klconvert: pull, quantize and run Moonshot AI's Kimi Linear on one GPU.

The names below import on first use, so `import klconvert.errors` or `klconvert --help` does not load torch.
"""
from __future__ import annotations

from importlib import import_module

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
