"""Optional dependencies: the extra that installs each, and the one-line error when a feature needs a missing one."""
from __future__ import annotations

import importlib
from types import ModuleType

from klconvert.errors import KLError

# module -> the pyproject extra that installs it
EXTRAS = {"triton": "gpu", "bitsandbytes": "nf4", "onnx": "onnx", "onnxruntime": "onnx"}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (e.g. "bitsandbytes.functional") for `feature`, or KLError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module.split(".")[0]]
        raise KLError(f"{feature} needs {module.split('.')[0]}, which cannot be imported ({e}); install the "
                      f"[{extra}] extra: pip install 'klconvert[{extra}]' (in a checkout: pip install -e "
                      f"'.[{extra}]')") from None
