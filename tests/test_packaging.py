"""The wheel a user installs holds what the code reads at run time: runtime/ and kernels/ as klconvert.runtime and
klconvert.kernels, the bundled model, the recipes (a wheel once shipped none, so `--recipe` had nothing to name),
and nothing of the tests; the sdist a packager builds and tests from holds every tracked file (one once lacked
tests/conftest.py, tests/kernels/ and the tools the tests import)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _clean_copy(tmp_path: Path) -> tuple[Path, set[str]]:
    """The tracked files copied to a fresh folder (a build writes into its source folder), and their names."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    names = set(filter(None, tracked.split("\0")))
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
