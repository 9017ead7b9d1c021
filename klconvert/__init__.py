"""klconvert: pull, quantize and run Moonshot AI's Kimi Linear on one GPU.

The names below import on first use, so `import klconvert.errors` or `klconvert --help` does not load torch.
"""
from __future__ import annotations

import os
import sys
from importlib import import_module
from importlib.util import spec_from_file_location

# The folders pyproject's package-dir installs inside klconvert/ from beside it: in a source tree (this repository,
# an unpacked sdist) they sit beside the package folder.
_BESIDE = ("runtime", "kernels", "recipes")
_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _SourceTreeFinder:
    """Finds klconvert.runtime, .kernels and .recipes beside the package folder when Python imports klconvert from a
    source tree without its editable install (started in the tree's root, whose klconvert/ hides an installed one:
    "No module named 'klconvert.recipes'"). Only those names: the tree's root is not put on the package's path (it
    holds klconvert/ itself, tests/, build/...)."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in _BESIDE:
            return None
        folder = os.path.join(_TREE, name)
        return spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                       submodule_search_locations=[folder])


if not os.path.isdir(os.path.join(_TREE, "klconvert", "runtime")) and \
        os.path.isfile(os.path.join(_TREE, "runtime", "model.py")):
    sys.meta_path.append(_SourceTreeFinder)

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
