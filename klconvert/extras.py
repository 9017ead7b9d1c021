"""Optional dependencies: the extra that installs each, and the one-line error when a feature needs a missing one."""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from types import ModuleType

from klconvert.errors import KLError

# module -> the pyproject extra that installs it
EXTRAS = {"triton": "gpu", "bitsandbytes": "nf4", "onnx": "onnx", "onnxruntime": "onnx"}


# Hugging Face's package that downloads compiled kernels from the hub and loads them; bitsandbytes' CPU backend asks
# it for one while it imports (on a CPU with AVX512-BF16), and the logger that warns when that fails
HUB_KERNELS_MODULE = "kernels"
BITSANDBYTES_CPU_LOG = "bitsandbytes.backends.cpu.ops"


@contextlib.contextmanager
def _no_hub_kernels():
    """While bitsandbytes imports, `from kernels import ...` fails and its fallback stays quiet: klconvert never runs
    code downloaded from a repository, and bitsandbytes then takes its own CPU kernels."""
    held = sys.modules.get(HUB_KERNELS_MODULE)
    log = logging.getLogger(BITSANDBYTES_CPU_LOG)
    was_disabled = log.disabled
    sys.modules[HUB_KERNELS_MODULE] = None          # an import of it raises ImportError
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was_disabled
        if held is None:
            del sys.modules[HUB_KERNELS_MODULE]
        else:
            sys.modules[HUB_KERNELS_MODULE] = held


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (e.g. "bitsandbytes.functional") for `feature`, or KLError naming the extra to install.
    bitsandbytes imports without Hugging Face's hub kernels (`_no_hub_kernels`)."""
    guard = _no_hub_kernels() if module.split(".")[0] == "bitsandbytes" else contextlib.nullcontext()
    try:
        with guard:
            return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS[module.split(".")[0]]
        raise KLError(f"{feature} needs {module.split('.')[0]}, which cannot be imported ({e}); install the "
                      f"[{extra}] extra: pip install 'klconvert[{extra}]' (in a checkout: pip install -e "
                      f"'.[{extra}]')") from None
