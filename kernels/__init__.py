"""Triton kernels for decode and prefill, each beside its naive_ twin in plain fp32 PyTorch (klconvert.kernels).

Import from the modules (klconvert.kernels.int_linear, .fused_moe, .kda_decode and their naive_ twins): this file
imports none of them, so a module that needs no Triton (naive_kda, whose gate the PyTorch model uses) loads
without it.

The folder sits at the repository root, so a Python started there also finds it as a top-level `kernels`: the
name of Hugging Face's kernel hub library, which transformers looks up (find_spec, then the package's metadata,
then an import for its version). Imported under any name but klconvert.kernels, this file gives the name back:
to the real package further down sys.path when one is installed, else to nothing (None in sys.modules, which
Python and transformers read as "not installed").
"""
import sys

if __name__ != "klconvert.kernels":
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        sys.modules[__name__] = None
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            sys.modules[__name__] = None
            raise
