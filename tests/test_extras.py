"""What a CPU user gets without the extras, and a Python started in the repository root: the repo's kernels/ folder
never stands in for Hugging Face's `kernels` package."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klconvert.errors import KLError
from klconvert.quantize import quantize
from klconvert.runtime.weights import use_triton
from testkit import assert_one_line_error, run_klconvert

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("triton", "transformers", "bitsandbytes")


def without(pythonpath: list[Path]) -> dict:
    """The environment for a child run with these PYTHONPATH entries (and no Triton interpreter switch)."""
    return {"PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "TRITON_INTERPRET": None}


def python_c(code: str, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd`, as a notebook or a shell started there runs it: `pythonpath` ahead of this
    process's own PYTHONPATH (where packages installed with --target are found)."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), *inherited])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory) -> Path:
    """A PYTHONPATH folder whose sitecustomize makes the optional packages unimportable."""
    shim = tmp_path_factory.mktemp("no-extras")
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None  # `import name` raises ImportError, find_spec(name) is None\n")
    return shim


@pytest.mark.slow
def test_synth_quantize_and_run_on_cpu_without_the_extras(without_extras, tmp_path):
    tiny, q = tmp_path / "tiny", tmp_path / "q"
    for args in (["synth", "--preset", "tiny", "--out", tiny],
                 ["quantize", tiny, q, "--bits", "4", "--device", "cpu"]):
        proc = run_klconvert(*args, cwd=tmp_path, env=without([without_extras]))
        assert proc.returncode == 0, proc.stderr
    proc = run_klconvert("run", "--model", q, "--prompt-file", "-", "--max-new-tokens", "4", "--device", "cpu",
                         stdin="Hello", cwd=tmp_path, env=without([without_extras]))
    assert proc.returncode == 0, proc.stderr
    assert "torch, context" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("args", [("--preset", "kimi-linear-48b", "--bits", "4"),
                                  ("--preset", "kimi-linear-48b", "--recipe", "48gb")])
def test_plan_of_int_weights_without_the_extras(without_extras, tmp_path, args):
    """The fit check is for before one has a GPU: sizing int weights read the kernels' k-tile from the Triton kernel
    module, whose import of triton failed ("ModuleNotFoundError: import of triton halted", a traceback)."""
    proc = run_klconvert("plan", *args, cwd=tmp_path, env=without([without_extras]))
    assert proc.returncode == 0 and "\ntotal " in proc.stdout, proc.stderr


@pytest.mark.slow
def test_nf4_without_its_extra_is_one_line_naming_it(without_extras, tiny_released, tmp_path):
    proc = run_klconvert("quantize", tiny_released, tmp_path / "q", "--scheme", "nf4", cwd=tmp_path,
                         env=without([without_extras]))
    assert_one_line_error(proc.returncode, proc.stderr, "--scheme nf4 needs bitsandbytes",
                          "pip install 'klconvert[nf4]'")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("kernels", ["triton", "auto"])
def test_triton_kernels_without_triton_name_the_gpu_extra(monkeypatch, kernels):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(KLError, match=rf"^kernels='{kernels}' \(--kernels\).* needs triton.*pip install "
                                      r"'klconvert\[gpu\]'"):
        use_triton(kernels, torch.device("cuda"))  # the choice is made before any CUDA work
    assert use_triton("torch", torch.device("cuda")) is False


def test_nf4_without_bitsandbytes_is_refused_before_anything_is_written(tiny_released, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(KLError, match=r"--scheme nf4 needs bitsandbytes.*\[nf4\]"):
        quantize(tiny_released, tmp_path / "q", scheme="nf4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_eval_of_an_nf4_model_without_bitsandbytes_is_refused_before_the_reference_runs(tmp_path, monkeypatch):
    """The reference ran whole first (12-33 s for the bundled model, minutes for the 48B one), then reading the
    model's NF4 weights was refused."""
    from klconvert import evaluate as evaluate_module
    from klconvert.models import bundled_dir

    nf4 = quantize(bundled_dir(), tmp_path / "nf4", scheme="nf4", progress=False).path
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setattr(evaluate_module, "run_model", lambda *a, **k: pytest.fail("a model ran"))
    with pytest.raises(KLError, match=rf"^--model {re.escape(str(nf4))} \(NF4 weights\) needs bitsandbytes.*\[nf4\]"):
        evaluate_module.evaluate(nf4, "tiny", "ROMEO. But soft, what light through yonder window breaks?",
                                 device="cpu")


def test_an_nf4_models_reader_is_imported_before_the_plan_measures_the_host(tmp_path, monkeypatch):
    """Reading NF4 weights imports bitsandbytes (with triton, numpy, sympy): 126 MB of the host mapped after the CPU
    plan had measured it, so a 15,514-token prompt of the bundled model at nf4 planned to fit under ulimit -d 600-700
    MB and ran out mid-prefill (h291). The reader is imported first."""
    import klconvert
    from klconvert.runtime import engine as engine_module
    from klconvert.synth.checkpoint import synth

    source = synth("tiny", tmp_path / "tiny2", layers=2, progress=False).path   # bitsandbytes is slow on the CPU
    nf4 = quantize(source, tmp_path / "nf4", scheme="nf4", progress=False).path
    order = []
    monkeypatch.setattr(engine_module, "load_nf4_reader", lambda: order.append("reader"))
    measured = engine_module.host_memory
    monkeypatch.setattr(engine_module, "host_memory", lambda **kw: order.append("host") or measured(**kw))
    klconvert.load(nf4, device="cpu", max_context=16)
    assert order[:2] == ["reader", "host"], order


HF_STYLE = ("import importlib.util, transformers\n"
            "from transformers import PreTrainedModel, KimiLinearForCausalLM\n"
            "from transformers.utils.import_utils import is_kernels_available\n")


@pytest.mark.slow
@pytest.mark.parametrize("blocked", [(), ("triton",)], ids=["with-triton", "without-triton"])
def test_transformers_from_the_repository_root(tmp_path, blocked):
    """transformers probes for `kernels` (Hugging Face's package, which transformers 5.25 installs); from the root it
    finds the folder first, which must step aside: to the real package where one is installed, else to nothing --
    transformers sees there what it sees from anywhere else."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import sys\nfor n in {blocked!r}:\n    sys.modules[n] = None\n")
    probe = HF_STYLE + ("spec = importlib.util.find_spec('kernels')\n"
                        "print(is_kernels_available(), spec is not None and spec.origin)\n")
    elsewhere = python_c(probe, tmp_path, [shim])
    at_root = python_c(probe + "import klconvert.kernels.naive_kda\n", ROOT, [shim])
    assert elsewhere.returncode == 0 and at_root.returncode == 0, elsewhere.stderr + at_root.stderr
    assert at_root.stdout == elsewhere.stdout and str(ROOT / "kernels") not in at_root.stdout


@pytest.mark.slow
def test_an_installed_kernels_package_is_the_one_found_from_the_root(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.0.1'\ndef get_kernel(name):\n    return name\n")
    proc = python_c("import kernels\nassert kernels.get_kernel('x') == 'x', kernels\nprint(kernels.__file__)\n"
                  "import klconvert.kernels.naive_kda\n", ROOT, [site])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site / "kernels" / "__init__.py")


# Run in a fresh interpreter: bitsandbytes' CPU backend asks for the hub kernel while it imports, on a CPU with
# AVX512-BF16 -- made true here for any CPU -- and a stand-in `kernels` package records whether it was asked.
HUB_KERNEL_PROBE = '''
import importlib.abc, sys
class AlwaysAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec
import importlib.util
sys.meta_path.insert(0, AlwaysAvx512Bf16())
from klconvert.extras import require
require("bitsandbytes.functional", "the probe")
import kernels
print("asked" if kernels.ASKED else "not asked")
'''
STAND_IN_KERNELS = '''
ASKED = []
def get_kernel(*args, **kwargs):
    ASKED.append(args)
    raise RuntimeError("a stand-in")
'''


def test_bitsandbytes_imports_without_the_hub_kernels(tmp_path):
    pytest.importorskip("bitsandbytes")
    (tmp_path / "kernels.py").write_text(STAND_IN_KERNELS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", HUB_KERNEL_PROBE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "not asked"
    assert "kernels-community" not in done.stderr


@pytest.mark.parametrize("blocked, said", [
    ("bitsandbytes", "x needs bitsandbytes, which cannot be imported ("),
    ("numpy", "x needs bitsandbytes, whose import of numpy failed (import of numpy halted; None in sys.modules); "
              "install or repair numpy (pip install 'klconvert[nf4]' (in a checkout: pip install -e '.[nf4]') "
              "installs what bitsandbytes needs)"),
])
def test_a_missing_extra_is_told_from_a_package_it_needs(tmp_path, blocked, said):
    """With bitsandbytes installed and numpy broken, the line said to install the [nf4] extra -- installed already."""
    pytest.importorskip("bitsandbytes")
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{blocked!r}] = None\n")
    proc = python_c("from klconvert.errors import KLError\nfrom klconvert.extras import require\ntry:\n"
                    "    require('bitsandbytes.functional', 'x')\nexcept KLError as e:\n    print(e)\n", tmp_path,
                    [tmp_path])
    assert proc.returncode == 0 and proc.stdout.startswith(said), proc.stdout + proc.stderr
    assert ("install the [nf4] extra: pip install 'klconvert[nf4]'" in proc.stdout) == (blocked == "bitsandbytes")


def test_an_installed_extra_that_fails_to_import_is_told_from_a_missing_one(tmp_path):
    """onnxruntime with numpy broken raises its own ImportError("import numpy failed"), naming no module: the line
    said to install the [onnx] extra, installed already."""
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("raise ImportError('import numpy failed')\n")
    proc = python_c("from klconvert.errors import KLError\nfrom klconvert.extras import require\ntry:\n"
                    "    require('onnxruntime', 'x')\nexcept KLError as e:\n    print(e)\n", tmp_path, [tmp_path])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("x needs onnxruntime, which is installed but fails to import (import numpy "
                                   "failed); repair it: pip install --force-reinstall onnxruntime (which reinstalls "
                                   "what it needs too)"), proc.stdout


@pytest.mark.parametrize("module, version, said", [
    ("triton", "3.4.0", "x needs triton>=3.5, and triton 3.4.0 is installed; upgrade it: pip install 'klconvert[gpu]'"),
    ("triton", "3.4.0+git5389ed7", "x needs triton>=3.5, and triton 3.4.0+git5389ed7 is installed"),  # pytorch-triton
    ("bitsandbytes.functional", "0.48.2",
     "x needs bitsandbytes>=0.49, and bitsandbytes 0.48.2 is installed; upgrade it: pip install 'klconvert[nf4]'"),
    ("triton", "3.5.0+git5389ed7", "taken"),
    ("triton", "3.6.0rc1", "taken"),
    ("triton", "dev", "taken"),   # no version to hold to a bound: not refused
])
def test_an_extra_older_than_declared_is_refused_in_one_line(tmp_path, module, version, said):
    """torch 2.8 brings triton 3.4, whose compiler cannot build the PDL wait (a traceback mid-run); bitsandbytes
    0.46-0.48 crash in their CPU quantizer (status 139) -- both installed beside klconvert by the base torch alone.
    The version is the imported package's own, whichever distribution brought it."""
    package = tmp_path / module.split(".")[0]
    package.mkdir()
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (package / "functional.py").write_text("")
    proc = python_c("from klconvert.errors import KLError\nfrom klconvert.extras import require\ntry:\n"
                    f"    require({module!r}, 'x')\n    print('taken')\nexcept KLError as e:\n    print(e)\n", tmp_path,
                    [tmp_path])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(said), proc.stdout


def test_an_old_extra_that_crashes_while_importing_is_refused_before_its_import(tmp_path):
    """The check read only the imported copy's __version__: a bitsandbytes 0.48 whose import raised AttributeError
    was a traceback. Its distribution's recorded version is read first."""
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text("raise AttributeError('an old release breaking')\n")
    (tmp_path / "bitsandbytes-0.48.0.dist-info").mkdir()
    (tmp_path / "bitsandbytes-0.48.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.48.0\n")
    proc = python_c("from klconvert.errors import KLError\nfrom klconvert.extras import require\ntry:\n"
                    "    require('bitsandbytes.functional', 'x')\nexcept KLError as e:\n    print(e)\n", tmp_path,
                    [tmp_path])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x needs bitsandbytes>=0.49, and bitsandbytes 0.48.0 is installed; upgrade it: "), \
        proc.stdout


@pytest.mark.parametrize("version, said", [("3.4.0", "upgrade it: I"), ("4.0.0", "install an older one: I"),
                                           ("3.5.0rc1", "upgrade it: I")])
def test_a_version_outside_a_bounded_range_is_told_which_way(monkeypatch, version, said):
    from packaging.specifiers import SpecifierSet

    from klconvert import extras

    monkeypatch.setattr(extras, "_declared_versions", lambda: {"triton": SpecifierSet(">=3.5,<4")})
    with pytest.raises(KLError, match=f"^x needs triton<4,>=3.5, and triton {version} is installed; {said}$"):
        extras._refuse_unfit_version("triton", version, "x", "I")
    extras._refuse_unfit_version("triton", "3.9.1+git1a2b", "x", "I")   # in range: nothing said
