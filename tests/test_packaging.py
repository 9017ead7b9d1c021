"""The wheel a user installs holds what the code reads at run time: runtime/ and kernels/ as klconvert.runtime and
klconvert.kernels, the bundled model, the recipes (a wheel once shipped none, so `--recipe` had nothing to name),
and nothing of the tests; the sdist a packager builds and tests from holds every tracked file (one once lacked
tests/conftest.py, tests/kernels/ and the tools the tests import)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import klconvert
from testkit import project_files

ROOT = Path(__file__).resolve().parent.parent


def _clean_copy(tmp_path: Path) -> tuple[Path, set[str]]:
    """The project's files (project_files) copied to a fresh folder (a build writes into its source folder), and
    their names."""
    names = project_files()
    source = tmp_path / "src"
    for name in names:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    return source, names


def test_the_wheel_holds_the_code_the_model_and_the_recipes(tmp_path):
    source, _ = _clean_copy(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("klconvert-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"klconvert/{folder}/{p.name}" for folder, source_folder in (("runtime", "runtime"),
                                                                          ("kernels", "kernels"),
                                                                          ("recipes", "recipes"))
            for p in (ROOT / source_folder).iterdir() if p.suffix in (".py", ".yaml")}
    want |= {f"klconvert/bundled/{p.name}" for p in (ROOT / "klconvert" / "bundled").iterdir()}
    assert want <= names, sorted(want - names)
    assert not any(n.startswith(("tests/", "tools/", "bench/")) or "/tests/" in n for n in names)


def test_the_sdist_holds_every_tracked_file(tmp_path):
    source, tracked = _clean_copy(tmp_path)
    build = f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path / 'dist')!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True, timeout=600)
    (sdist,) = (tmp_path / "dist").glob("klconvert-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert tracked - {".gitignore"} <= names, sorted(tracked - names)



def test_a_source_tree_imports_whole_without_the_editable_install(tmp_path):
    """Python started in a tree's root (an unpacked sdist a packager tests after `pip install .`) imports its
    klconvert/ folder ahead of the installed one; runtime/, kernels/ and recipes/ sit beside that folder, not in it:
    "No module named 'klconvert.recipes'" -- `python -m klconvert --help` was a traceback there."""
    source, _ = _clean_copy(tmp_path)
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import klconvert, klconvert.recipes, klconvert.runtime.engine, klconvert.kernels.int_linear\n"
            "print(klconvert.__file__, klconvert.recipes.__file__, klconvert.kernels.__file__, *klconvert.__path__)")
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=source, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": ":".join([str(source), *site]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(source / "klconvert" / "__init__.py"), str(source / "recipes" / "__init__.py"),
                                   str(source / "kernels" / "__init__.py"), str(source / "klconvert")]
    # only the folders pyproject maps (a first form put the tree's root on the package's path: klconvert.klconvert,
    # klconvert.build.head... importable, and a walk of the package's modules never ended)
    tomllib = pytest.importorskip("tomllib")
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {f"klconvert.{name}" for name in klconvert._BESIDE} == set(mapped) and \
        all(mapped[f"klconvert.{name}"] == name for name in klconvert._BESIDE)

# modules the code imports whose distribution is not installed here, by the name it is declared under
NOT_INSTALLED_HERE = {"fla": "fla-core"}


def _distribution_names(requirements: list[str]) -> set[str]:
    """The normalized project names of requirement strings ("huggingface-hub>=1.33,<3" -> "huggingface-hub")."""
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r)[0]).lower() for r in requirements}


def test_every_module_the_code_imports_is_declared():
    """numpy was imported by the ONNX export and needed by every shard written (tensor.numpy() in
    safetensors_writer, and safetensors' own save), but declared nowhere: torch does not require it, so a base
    install's `quantize` and `synth` ended in "RuntimeError: Numpy is not available"."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _distribution_names(project["dependencies"])
    extras = _distribution_names([r for reqs in project["optional-dependencies"].values() for r in reqs
                                  if not r.startswith("klconvert[")])
    installed = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for folder in ("klconvert", "runtime", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"klconvert"}:
                    imported.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    assert {"torch", "triton", "onnx"} <= set(imported)   # the scan sees the code's imports
    undeclared = {module: sorted(where) for module, where in imported.items()
                  if not _distribution_names(installed.get(module) or [NOT_INSTALLED_HERE[module]]) & (core | extras)}
    assert not undeclared
    assert "numpy" in core   # every shard written goes through it, not only the ONNX export
