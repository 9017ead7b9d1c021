"""The README's walkthrough as a user types it, in a fresh folder: the main job's commands, then the Python API,
evaluate and ONNX blocks exactly as written (only the token counts cut, for time)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from klconvert.models import BUNDLED_DIR

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_block(after: str) -> str:
    """The first python block after the text `after`."""
    return re.compile(r"```python\n(.*?)```", re.S).search(README, README.index(after)).group(1)


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """A fresh folder after the README's main job, each command's (stdout, stderr)."""
    folder = tmp_path_factory.mktemp("walkthrough")
    shell = README[README.index("# 1. the main job"):README.index("# 2. the tests")]
    commands = [line.split("  #")[0].strip() for line in shell.splitlines()[1:] if line.strip()]
    assert [c.split()[:2] for c in commands] == [["printf", "'ROMEO.\\nBut"], ["klconvert", "pull-and-quantize"],
                                                 ["klconvert", "run"], ["klconvert", "run"]]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in commands:
        proc = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        outputs.append((proc.stdout, proc.stderr))
    return folder, outputs


def test_the_main_job_runs_as_written(walked):
    folder, outputs = walked
    assert (folder / "tiny-w4a16" / "config.json").is_file() and outputs[1][0].strip().endswith("tiny-w4a16")
    card = (folder / "tiny-w4a16" / "README.md").read_text()   # not the install's path, which it once named
    assert "quantized by klconvert" in card and "from the bundled model tiny (a small Kimi Linear" in card
    assert "| source | the bundled model tiny |" in card and str(BUNDLED_DIR) not in card
    quantized, bundled = outputs[2], outputs[3]
    for out, _ in (quantized, bundled):   # the continuation: English words, several of the commonest among them
        words = re.findall(r"[a-z]+", out.lower())
        assert len(words) >= 20 and sum(w in {"the", "and", "i", "a", "to", "of", "my", "not", "is", "you", "me",
                                              "it", "that", "in", "be", "so", "with"} for w in words) >= 5, out
    assert "running the bundled model `tiny`" in bundled[1]


def test_the_python_blocks_run_as_written(walked, monkeypatch):
    folder, _ = walked
    monkeypatch.chdir(folder)
    (folder / "doc.txt").write_text("ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east.\n")
    namespace: dict = {}
    exec(python_block("## Python API").replace("max_new_tokens=32", "max_new_tokens=4"), namespace)
    assert isinstance(namespace["text"], str) and namespace["new_ids"] and namespace["both"].shape[0] == 2
    exec(python_block("### `klconvert eval`"), namespace)
    assert 0 <= namespace["r"].kl_mean < 1 and 0 < namespace["r"].top1_agreement <= 1
    pytest.importorskip("onnxruntime")
    exec(python_block("The ONNX export (`[onnx]` extra), and onnxruntime running it with the state fed back:")
         .replace("max_new_tokens=32", "max_new_tokens=4"), namespace)
    assert (folder / "tiny-w4a16-onnx" / "model.onnx").is_file() and len(namespace["new_ids"][0]) >= 1


def test_the_test_extra_is_what_the_readme_says_it_installs():
    """The README lists what `pip install -e '.[test]'` adds beside the three extras; it named pytest, ruff,
    transformers, compressed-tensors and accelerate, and not pytest-xdist (which its own `-n auto` needs),
    markdown-it-py or setuptools (h319). Every requirement of the extra is named there, by its distribution name."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    requirements = [Requirement(text) for text in extra["project"]["optional-dependencies"]["test"]]
    assert [r.extras for r in requirements if r.name == "klconvert"] == [{"gpu", "nf4", "onnx"}]   # "all three"
    text = " ".join(README.split())
    said = text[text.index("`[test]` all three plus "):text.index(", `[fast]`")]
    unsaid = [r.name for r in requirements if r.name != "klconvert" and not re.search(rf"(?<![\w-]){r.name}(?![\w-])",
                                                                                        said)]
    assert not unsaid, f"README's [test] extra does not name {unsaid}: {said}"


def test_the_readme_says_how_to_name_a_folder_called_tiny(tmp_path, monkeypatch):
    """`--model tiny` is the bundled model even beside a folder ./tiny of the user's (`klconvert synth --preset tiny
    --out tiny`, then `klconvert quantize tiny q`, quantized the bundled model, unsaid): the README says so, and that
    ./tiny reaches the folder (h319)."""
    from klconvert.models import resolve_model

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") == BUNDLED_DIR and resolve_model("./tiny").resolve() == tmp_path / "tiny"
    assert "even where a folder of that name is in the working folder: give yours as `./tiny`." in " ".join(
        README.split())
