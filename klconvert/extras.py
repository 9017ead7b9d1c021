"""Optional dependencies: the extra that installs each, and the one-line error when a feature needs a missing one."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import logging
import sys
from types import ModuleType

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from klconvert.errors import KLError, descriptors_exhausted
from klconvert.runtime.host_memory import import_exhausted

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
    """Import `module` (e.g. "bitsandbytes.functional") for `feature`, or KLError naming the extra to install --
    also when the package is older than the extra asks for (torch 2.8 brings triton 3.4, which cannot compile our
    kernels; bitsandbytes 0.46-0.48 crash on the CPU). bitsandbytes imports without Hugging Face's hub kernels
    (`_no_hub_kernels`)."""
    top = module.split(".")[0]
    extra = EXTRAS[top]
    install = f"pip install 'klconvert[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
    # the distribution's version first (an old release may crash while importing), then that of the copy imported,
    # whichever distribution brought it (pytorch-triton's triton, onnxruntime-gpu's onnxruntime)
    _refuse_unfit_version(top, _distribution_version(top), feature, install)
    guard = _no_hub_kernels() if top == "bitsandbytes" else contextlib.nullcontext()
    try:
        with guard:
            imported = importlib.import_module(module)
    except (ImportError, OSError) as e:   # OSError: out of file descriptors, reading a module's source
        exhausted = descriptors_exhausted(e, f"importing {top} for {feature}")   # an ImportError too: a dlopen's
        if exhausted is None:   # the memory, not the package: no reinstall helps
            exhausted = import_exhausted(e)
        if exhausted is not None:
            raise exhausted from None
        if not isinstance(e, ImportError):
            raise
        missing = _first_module_named(e)
        if missing not in (None, top):   # installed, but a module of another package it needs is not importable
            raise KLError(f"{feature} needs {top}, whose import of {missing} failed ({e}); install or repair "
                          f"{missing} ({install} installs what {top} needs)") from None
        if missing is None:   # raised by the package's own code, naming no module: it is there, and broken
            raise KLError(f"{feature} needs {top}, which is installed but fails to import ({e}); repair it: pip "
                          f"install --force-reinstall {top} (which reinstalls what it needs too)") from None
        raise KLError(f"{feature} needs {top}, which cannot be imported ({e}); install the [{extra}] extra: "
                      f"{install}") from None
    _refuse_unfit_version(top, getattr(sys.modules.get(top), "__version__", None), feature, install)
    return imported


def _refuse_unfit_version(top: str, version, feature: str, install: str) -> None:
    """KLError when `version` of the package `top` is one klconvert's metadata does not accept (pyproject's extras:
    triton>=3.5). Nothing is said when either is unknown (no version to read; klconvert run from a source tree that
    was never installed)."""
    accepted = _declared_versions().get(top)
    if accepted is None:
        return
    try:
        parsed = Version(str(version))
    except InvalidVersion:
        return
    if not accepted.contains(parsed, prereleases=True):
        below = all(bound.contains(parsed, prereleases=True) for bound in accepted if bound.operator in ("<", "<="))
        how = "upgrade it" if below else "install an older one"
        raise KLError(f"{feature} needs {top}{accepted}, and {top} {parsed} is installed; {how}: {install}")


@functools.cache
def _distribution_version(top: str) -> str | None:
    """The version the installed distribution named `top` records (read once), or None."""
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _declared_versions() -> dict[str, SpecifierSet]:
    """The versions klconvert's installed metadata accepts of each distribution it names, its extras' included
    (read once); none when klconvert runs from a source tree that was never installed."""
    try:
        requirements = importlib.metadata.requires("klconvert") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    accepted: dict[str, SpecifierSet] = {}
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        accepted[name] = accepted.get(name, SpecifierSet()) & requirement.specifier
    return accepted


def _first_module_named(error: BaseException | None) -> str | None:
    """The top-level package of the first module an ImportError names, down its chain of causes; None when none
    names one (onnxruntime, with numpy broken, raises its own "import numpy failed", naming none and chaining none)."""
    while error is not None:
        if isinstance(error, ImportError) and error.name:
            return error.name.split(".")[0]
        error = error.__cause__ or error.__context__
    return None
