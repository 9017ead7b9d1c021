"""The scripts in tools/ at their edges: each answers --help with its usage and exit 0, changing nothing
(record_bundled.py once took --help for a run and rewrote tests/bundled_recorded.json, and plot_loss.py died
importing matplotlib first), under `python -OO` too, as the scripts in bench/ do; bad arguments are one line and exit
2, with nothing written."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import project_files, run_main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bundled_corpus import CORPUS  # noqa: E402
from plot_loss import MAX_LOSS_LOG_BYTES  # noqa: E402

from klconvert.convert.output_folder import OUTPUT_RECORD, write_output_record  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402

SCRIPTS = sorted(p for p in (ROOT / "tools").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
BENCH_SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def _tree() -> dict[str, int]:
    """Every file of the project (project_files), with its modification time (other tests may write untracked caches
    meanwhile)."""
    return {name: (ROOT / name).stat().st_mtime_ns for name in project_files()}


@pytest.fixture(scope="module")
def optimized_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a `python -OO` child that keeps what it compiles for the next one. -OO reads and writes
    .opt-2.pyc files, which pip does not write: under PYTHONDONTWRITEBYTECODE (as this machine sets it) each -OO
    child compiled torch and the rest from source, seconds a script. They go to a folder of the test run's own,
    outside the project and the children's working folder."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(tmp_path_factory.mktemp("opt2-bytecode"))}


def test_every_tool_answers_help_and_changes_nothing(tmp_path, optimized_env):
    assert len(SCRIPTS) >= 10 and ROOT / "tools" / "record_bundled.py" in SCRIPTS
    before = _tree()
    for scripts in (SCRIPTS[:1], SCRIPTS[1:]):   # the first compiles what they all import, the others read it
        # -OO: a script's --help once took __doc__, which is None there
        runs = {p.name: subprocess.Popen([sys.executable, "-OO", str(p), "--help"], cwd=tmp_path, env=optimized_env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in scripts}
        for name, proc in runs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and out.startswith(f"usage: {name}") and not err, (name, err[-2000:])
            description = out.split("\n\n")[1]   # a whole sentence, not a cut line
            assert description.rstrip().endswith((".", ")", ":")), (name, description)
    assert _tree() == before and not any(tmp_path.iterdir())


# what a child's sitecustomize runs before the script: SIGINT to itself as the import of the module INTERRUPT_AT names
# starts
_INTERRUPT_AT_IMPORT = """import importlib.abc, os, signal, sys
class InterruptAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == os.environ["INTERRUPT_AT"]:
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, InterruptAtImport())
"""
# the scripts whose --help and refusal of an argument import no torch (~2 s of CPU): tool_output imports the
# checkpoint reader, and with it torch, only where one is read; whole_folder, which writes an output folder, imports
# neither; the others import torch (and what imports it) in the functions that use it (klconvert.quant's policy and
# defaults import none; distill_bundled's torch modules live in distill_modules)
HELP_WITHOUT_TORCH = {"make_corpus.py", "plot_loss.py", "train_tokenizer.py", "autoround_bundled.py", "awq_bundled.py",
                      "gptq_bundled.py", "record_bundled.py", "rotate_bundled.py", "quality_table.py",
                      "distill_bundled.py", "train_bundled.py"}


def test_a_ctrl_c_while_a_script_imports_is_one_line(tmp_path):
    """The scripts took over SIGINT only as their main ran: a Ctrl-C in their first second, as torch imported, was
    Python's KeyboardInterrupt traceback (h248's F2). As `klconvert` itself: one line, 130. Each script that imports
    torch is interrupted as that import starts; one of HELP_WITHOUT_TORCH, whose --help imports no torch (its usage,
    status 0, where torch's import would be interrupted; and an unknown option its usage error, status 2), as
    tool_output's first import of klconvert after it takes over (klconvert.errors)."""
    assert HELP_WITHOUT_TORCH <= {p.name for p in SCRIPTS}
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_AT_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    runs = {(p.name, at, arg): subprocess.Popen([sys.executable, str(p), arg], cwd=tmp_path,
                                                env={**env, "INTERRUPT_AT": at}, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True)
            for p in SCRIPTS
            for at, arg in ((("torch", "--help"), ("torch", "--no-such-option"), ("klconvert.errors", "--help"))
                            if p.name in HELP_WITHOUT_TORCH else (("torch", "--help"),))}
    for (name, at, arg), proc in runs.items():
        out, err = proc.communicate(timeout=300)
        if name in HELP_WITHOUT_TORCH and (at, arg) == ("torch", "--help"):
            assert proc.returncode == 0 and out.startswith(f"usage: {name}") and not err, (name, err[-2000:])
        elif name in HELP_WITHOUT_TORCH and at == "torch":
            assert proc.returncode == 2 and not out and err.startswith(f"usage: {name}"), (name, err[-2000:])
            assert err.splitlines()[-1].startswith(f"{name}: error: "), (name, err[-2000:])   # argparse's one line
        else:
            assert (proc.returncode, out, err) == (130, "", "klconvert: interrupted\n"), (name, at, err[-2000:])


def test_no_script_takes_its_help_from_its_docstring_object():
    """Under `python -OO` __doc__ is None: each script's summary is read from its file (klconvert.script_summary).
    Every bench/ script is checked here, one of them run below (each of the others imports torch, seconds apiece)."""
    assert len(BENCH_SCRIPTS) >= 8
    assert not [p.name for p in SCRIPTS + BENCH_SCRIPTS if "__doc__" in p.read_text()]


def test_a_bench_script_answers_help_under_python_oo(tmp_path, optimized_env):
    proc = subprocess.run([sys.executable, "-OO", str(ROOT / "bench" / "convert.py"), "--help"], cwd=tmp_path,
                          env=optimized_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.split("\n\n")[1].startswith("Convert real-shape synthetic checkpoints"), proc.stdout


def _tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def tool_here(tmp_path, monkeypatch, capsys):
    """tools/NAME ARGS run in this process, in tmp_path, as _tool runs it in a child: its main() through
    testkit.run_main (sys.argv naming the script, as argparse's prog). For what is no process's own: each child took
    ~2 s of CPU importing torch."""
    monkeypatch.chdir(tmp_path)

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        tool = importlib.import_module(name.removesuffix(".py"))
        return subprocess.CompletedProcess([name, *args], *run_main(capsys, tool.main, [name, *args]))
    return run


def test_make_corpus_refuses_another_archive_and_writes_nothing(tmp_path):
    before = CORPUS.stat().st_mtime_ns
    (tmp_path / "other.tar.gz").write_bytes(b"not the archive")
    proc = _tool("make_corpus.py", "--sdist", "other.tar.gz", cwd=tmp_path)
    assert proc.returncode == 2 and "not the f393d09d" in proc.stderr and "nothing written" in proc.stderr
    assert CORPUS.stat().st_mtime_ns == before and not CORPUS.with_name(CORPUS.name + ".partial").exists()


def test_quality_table_refuses_token_counts_it_cannot_measure(tmp_path, tool_here):
    """--tokens -70000 measured the first 857 tokens (a negative slice) and --tokens 1 printed nan."""
    for tokens in ("-70000", "1"):
        proc = tool_here("quality_table.py", "--tokens", tokens, "--only", "int8")
        assert proc.returncode == 2 and "--tokens" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = tool_here("quality_table.py", "--folder", "d1")
    assert proc.returncode == 2 and "--folder d1: give LABEL=DIR" in proc.stderr, proc.stderr


def test_quality_table_refuses_an_only_no_row_matches_before_measuring(tmp_path, tool_here):
    """--only nomatch ran the bf16 reference first, then printed "no row matched --only" to stdout with exit 0."""
    proc = tool_here("quality_table.py", "--only", "nomatch")
    assert proc.returncode == 2 and not proc.stdout, (proc.stdout, proc.stderr)
    assert proc.stderr.splitlines() == ["quality_table.py: error: --only 'nomatch': no row's label contains it; give "
                                        "part of one (e.g. 'int4 g128'), or measure a --folder"], proc.stderr


def test_train_tokenizer_writes_a_new_folder_whole(tmp_path, tool_here, monkeypatch):
    """--out defaulted to klconvert/bundled, the package's own files, and the three files went in one by one over
    what was there: a tokenizer of another size beside the bundled weights ran garbled with exit 0."""
    import train_tokenizer

    proc = tool_here("train_tokenizer.py", "--vocab", "300")
    assert proc.returncode == 2 and "the following arguments are required: --out" in proc.stderr, proc.stderr
    model = tmp_path / "model"
    model.mkdir()
    (model / "tiktoken.model").write_text("mine")
    (model / "model.safetensors").write_text("weights")
    train_bpe = train_tokenizer.train_bpe
    monkeypatch.setattr(train_tokenizer, "train_bpe", lambda *_: pytest.fail("trained before refusing --out"))
    for force in ((), ("--force",)):   # refused before the training, --force too: it holds more than a tokenizer
        proc = tool_here("train_tokenizer.py", "--vocab", "300", "--out", "model", *force)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("train_tokenizer.py: error: model: ") and not proc.stdout, proc.stderr
    monkeypatch.setattr(train_tokenizer, "train_bpe", train_bpe)
    assert (model / "tiktoken.model").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    earlier = tmp_path / "tok"
    earlier.mkdir()
    (earlier / "tiktoken.model").write_text("an earlier run's")
    proc = tool_here("train_tokenizer.py", "--vocab", "300", "--out", "tok", "--force")
    assert proc.returncode == 0 and proc.stdout.startswith("300 ranks + 256 specials"), proc.stderr
    assert sorted(p.name for p in earlier.iterdir()) == [OUTPUT_RECORD, "special_tokens_map.json", "tiktoken.model",
                                                         "tokenizer_config.json"]
    assert len(Tokenizer.from_folder(earlier).bpe_ranks) == 300 and not list(tmp_path.glob(".*"))


def test_train_tokenizer_force_replaces_no_model_folder_klconvert_wrote(tmp_path, tool_here):
    """--force replaced any folder whose output record listed all it held -- a quantize or synth output, weights and
    all -- with three tokenizer files, exit 0, and the refusal without it offered --force, though --force promises
    to replace only an OUT holding tokenizer files. A record says klconvert wrote a folder, not that it is a
    tokenizer's: the tool's own earlier output, record and all, is still replaced."""
    model = tmp_path / "q4"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tiktoken.model"):
        (model / name).write_text("the model's")
    write_output_record(model, sorted(os.listdir(model)))
    held = {p.name: p.read_text() for p in model.iterdir()}
    for force in ((), ("--force",)):
        proc = tool_here("train_tokenizer.py", "--vocab", "300", "--out", "q4", *force)
        assert proc.returncode == 2 and not proc.stdout and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr == ("train_tokenizer.py: error: q4: --force replaces only an empty folder or an earlier "
                           "tokenizer's files, and this also holds other files: config.json, model.safetensors; move "
                           "them out of it, or choose another output folder\n")
    assert {p.name: p.read_text() for p in model.iterdir()} == held
    for _ in range(2):   # a new folder, then its own output (which has a record) replaced
        proc = tool_here("train_tokenizer.py", "--vocab", "300", "--out", "tok", "--force")
        assert proc.returncode == 0, proc.stderr
    assert OUTPUT_RECORD in os.listdir(tmp_path / "tok")


def test_train_tokenizer_checks_the_test_split_with_one_byte_decoder(tmp_path, monkeypatch):
    """check_written built the byte decoder anew for each character of the test split it encodes: 11 of a 300-rank
    run's 14 s of CPU."""
    import train_tokenizer

    hf = train_tokenizer.train_bpe("the cat sat on the mat; " * 50, 270)
    tokens = train_tokenizer.ranked_tokens(hf)
    train_tokenizer.write_tiktoken_files(tmp_path, tokens, train_tokenizer.NUM_SPECIAL_TOKENS)
    built, byte_decoder = [], train_tokenizer.byte_decoder
    monkeypatch.setattr(train_tokenizer, "byte_decoder", lambda: built.append(1) or byte_decoder())
    summary = train_tokenizer.check_written(tmp_path, hf, tokens, "the mat sat on the cat")
    assert summary.startswith(f"{len(tokens)} ranks + 256 specials; test split: 22 chars") and len(built) == 1, built


# matplotlib stood in for (klconvert installs none): plot_loss.py's calls, savefig writing the file as the real one
_MATPLOTLIB_STUB = {
    "matplotlib/__init__.py": "def use(backend):\n    pass\n",
    "matplotlib/pyplot.py": (
        "class _Any:\n"
        "    def __getattr__(self, name):\n"
        "        return lambda *args, **kwargs: None\n"
        "class _Figure(_Any):\n"
        "    def savefig(self, path):\n"
        "        open(path, 'wb').write(b'png')\n"
        "def subplots(**kwargs):\n"
        "    return _Figure(), _Any()\n"
        "def close(fig):\n"
        "    pass\n"),
}


def _matplotlib_stubbed(tmp_path: Path) -> dict[str, str]:
    """The environment of a plot_loss.py run that imports _MATPLOTLIB_STUB, written under tmp_path/stub."""
    for name, text in _MATPLOTLIB_STUB.items():
        (tmp_path / "stub" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stub" / name).write_text(text)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), os.environ.get("PYTHONPATH", "")])}


# a training run's loss.json as tools/train_bundled.py writes it, two steps long
_LOSS_LOG = {"step": [1, 2], "train_loss": [7.0, 6.0], "validation_step": [2], "validation_loss": [6.5], "kept_step": 2,
             "kept_validation_loss": 6.5, "tokens_per_step": 512, "parameters": 1e6, "train_seconds": 3.0,
             "device": "cpu"}


def test_plot_loss_refuses_what_is_no_loss_log_in_one_line(tmp_path):
    """A missing file, a JSON of another kind, a binary file and a --png in a missing folder were FileNotFoundError,
    KeyError 'step', UnicodeDecodeError and FileNotFoundError tracebacks (with matplotlib; without it, "needs
    matplotlib" for each, the file never read); lines of two lengths, a string where a number goes, a --png of
    another format and a loss too large for its perplexity, matplotlib's ValueErrors and an OverflowError."""
    log = dict(_LOSS_LOG)
    (tmp_path / "loss.json").write_text(json.dumps(log))
    (tmp_path / "other.json").write_text('{"urls": []}')
    (tmp_path / "short.json").write_text(json.dumps({**log, "step": [1]}))
    (tmp_path / "words.json").write_text(json.dumps({**log, "tokens_per_step": "512"}))
    (tmp_path / "huge.json").write_text(json.dumps({**log, "validation_loss": [1000.0], "kept_validation_loss": 1e3}))
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    env = _matplotlib_stubbed(tmp_path)
    for args, needle in ((["missing.json"], "missing.json: cannot read it as JSON (No such file or directory)"),
                         (["other.json"], "other.json: not a training run's loss log (it has no 'step', 'train_loss', "
                                          "'validation_step' ...)"),
                         (["binary.json"], "binary.json: cannot read it as JSON ('utf-8' codec can't decode"),
                         (["loss.json", "--png", "no/loss.png"], "no/loss.png: cannot write it (No such file or "
                                                                 "directory)"),
                         (["loss.json", "--png", "loss.txt"], "--png loss.txt: name a .png file"),
                         (["short.json"], "short.json: its 'step' and 'train_loss' are not two lists of numbers of one "
                                          "length"),
                         (["words.json"], "words.json: its 'tokens_per_step' is '512', not a number")):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"plot_loss.py: error: {needle}"), proc.stderr
    for log in ("loss.json", "huge.json"):   # a loss of 1,000 nats: math.exp's OverflowError for its perplexity
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), log], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and (tmp_path / "loss.png").read_bytes() == b"png", proc.stderr


def test_plot_loss_refuses_a_number_past_floats_range_in_one_line(tmp_path):
    """An integer past float's range (JSON has no bound on one) as train_seconds, kept_step or a step was
    math.isfinite's OverflowError, a traceback with exit status 1 (h266)."""
    env = _matplotlib_stubbed(tmp_path)
    log = dict(_LOSS_LOG)
    for key, value, needle in (("train_seconds", 10**400, "its 'train_seconds' is an integer of 401 digits, not a "
                                                          "number the plot can draw"),
                               ("kept_step", 10**400, "its 'kept_step' is an integer of 401 digits, not a number the "
                                                      "plot can draw"),
                               ("step", [1, 10**400], "its 'step' and 'train_loss' are not two lists of numbers of one "
                                                      "length")):
        (tmp_path / "loss.json").write_text(json.dumps({**log, key: value}))
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), "loss.json"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"plot_loss.py: error: loss.json: {needle}; "), proc.stderr
    assert not (tmp_path / "loss.png").exists()


def test_plot_loss_reads_a_pipe_as_far_as_its_bound(tmp_path):
    """/dev/zero was read until memory ran out, and a file of any size was read whole: one past MAX_LOSS_LOG_BYTES is
    read no further. A loss.json piped in (`ssh host cat OUT/loss.json | plot_loss.py /dev/stdin`) is read (refusing
    every FIFO, d860080, refused it too), its plot written here."""
    env = _matplotlib_stubbed(tmp_path)
    (tmp_path / "big.json").write_bytes(b" " * (MAX_LOSS_LOG_BYTES + 1))
    for path in ("/dev/zero", "big.json"):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), path], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
        assert proc.stderr == (f"plot_loss.py: error: {path}: over {MAX_LOSS_LOG_BYTES >> 20} MB, far larger than "
                               "any model's loss.json; give the loss.json tools/train_bundled.py wrote\n"), proc.stderr
    log = dict(_LOSS_LOG)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), "/dev/stdin"], cwd=tmp_path,
                          env=env, input=json.dumps(log), capture_output=True, text=True, timeout=60)
    # here, not beside /dev/stdin (/dev/loss.png, written as root)
    assert proc.returncode == 0 and (tmp_path / "loss.png").read_bytes() == b"png", proc.stderr


def test_plot_loss_plots_a_redirected_loss_log_here_and_a_named_one_beside_it(tmp_path):
    """A loss.json redirected in from a file (`plot_loss.py /dev/stdin < loss.json`) wrote /dev/loss.png, as root
    without a word, and through /dev/fd/0 or /proc/self/fd/0 was plotted and then "cannot write" /dev/fd/loss.png
    (h266): is_file followed the descriptor to the file. A descriptor's plot goes here; a named file's, or a link's
    the user made to one, beside it."""
    env = _matplotlib_stubbed(tmp_path)
    log = dict(_LOSS_LOG)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loss.json").write_text(json.dumps(log))
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "loss.json").symlink_to(tmp_path / "run" / "loss.json")
    # /dev/stdin after the two that failed before the fix, where it wrote /dev/loss.png
    for path, png in (("/dev/fd/0", "loss.png"), ("/proc/self/fd/0", "loss.png"), ("/dev/stdin", "loss.png"),
                      ("run/loss.json", "run/loss.png"), ("linked/loss.json", "linked/loss.png")):
        with open(tmp_path / "run" / "loss.json") as redirected:
            proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_loss.py"), path], cwd=tmp_path, env=env,
                                  stdin=redirected, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and (tmp_path / png).read_bytes() == b"png", (path, proc.stderr)
        (tmp_path / png).unlink()
