"""The wheel a user installs holds what the code reads at run time: runtime/ and kernels/ as klconvert.runtime and
klconvert.kernels, the bundled model, the recipes (a wheel once shipped none, so `--recipe` had nothing to name),
and nothing of the tests."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_code_the_model_and_the_recipes(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    source = tmp_path / "src"
    for name in filter(None, tracked.split("\0")):   # a clean copy: the build writes into its source folder
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
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
