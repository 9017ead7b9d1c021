"""Every script in tools/ answers --help with its usage and exit 0, changing nothing: record_bundled.py once took
--help for a run and rewrote tests/bundled_recorded.json, and plot_loss.py died importing matplotlib first."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "tools").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def _tree() -> dict[str, int]:
    """Every file git tracks, with its modification time (other tests may write untracked caches meanwhile)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return {name: (ROOT / name).stat().st_mtime_ns for name in tracked.decode().split("\0") if name}


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
