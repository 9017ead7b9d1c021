"""Prompt and evaluation text from a file, standard input or the command line, read no further than the tokens it
may use: bytes arrive in chunks, are decoded, and are encoded window by window exactly where Tokenizer.encode cuts
the text, so reading stops soon after the token budget is passed (`--prompt-file /dev/zero` ends, in bounded memory).
"""
from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from klconvert.errors import KLError, not_utf8
from klconvert.tokenizer import MAX_ENCODE_CHARS, Tokenizer

READ_CHUNK_BYTES = 1 << 20
BYTE_ORDER_MARK = "\ufeff"


@dataclass(frozen=True)
class TokenizedText:
    """The text read and its ids (Tokenizer.encode(text), the first ids of the whole text's); `whole` is False when
    reading stopped past the budget, so the whole text has at least len(ids) tokens; `where` names its source in
    messages (`--prompt-file -` for standard input, as given)."""

    text: str
    ids: list[int]
    whole: bool
    where: str


def _chunks(source: str, flag: str) -> Iterator[bytes]:
    """The bytes of a file, or of standard input for '-', a chunk at a time."""
    if source == "-" and sys.stdin is None:   # started with it closed (<&-)
        raise KLError(f"{flag} -: standard input is closed; pipe the text in, or give a file")
    try:
        with (open(sys.stdin.fileno(), "rb", closefd=False) if source == "-" else open(source, "rb")) as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                yield chunk
    except OSError as e:
        raise KLError(f"{flag} {source}: cannot read it ({e.strerror}); check the path") from None


def _text_chunks(text: str) -> Iterator[bytes]:
    data = text.encode("utf-8", "surrogateescape")  # bytes the shell passed that are not UTF-8 stay invalid
    for start in range(0, len(data), READ_CHUNK_BYTES):
        yield data[start:start + READ_CHUNK_BYTES]


def read_tokens(chunks: Iterator[bytes], where: str, tokenizer: Tokenizer, max_tokens: int) -> TokenizedText:
    """Decode UTF-8 `chunks` (a byte-order mark at the start dropped, as editors on Windows write one) and encode
    them, stopping once more than `max_tokens` ids are made; `where` names the source in errors."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    read = 0  # bytes handed to the decoder so far
    pending, windows, ids = "", [], []
    at_start = True
    for chunk in _with_end(chunks):
        held = len(decoder.getstate()[0])
        try:
            pending += decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            if read == 0 and e.start == 0 and chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise KLError(f"{where}: UTF-16 text, not UTF-8 (it starts with {chunk[:2].hex(' ').upper()}, a "
                              "UTF-16 byte-order mark); convert it to UTF-8") from None
            raise KLError(f"{not_utf8(where, read - held + e.start)}; convert it to UTF-8") from None
        read += len(chunk)
        if at_start and pending:
            pending, at_start = pending.removeprefix(BYTE_ORDER_MARK), False
        while len(pending) >= MAX_ENCODE_CHARS or (not chunk and pending):
            window, pending = pending[:MAX_ENCODE_CHARS], pending[MAX_ENCODE_CHARS:]
            windows.append(window)
            ids += tokenizer.encode(window)
            if len(ids) > max_tokens:
                return TokenizedText("".join(windows), ids, whole=not (pending or chunk), where=where)
    return TokenizedText("".join(windows), ids, whole=True, where=where)


def _with_end(chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield from chunks
    yield b""  # the end: flush the decoder and encode what is left


def read_prompt(prompt: str | None, prompt_file: str | None, tokenizer: Tokenizer, max_tokens: int) -> TokenizedText:
    """`--prompt TEXT` or `--prompt-file FILE|-`, refused when empty (whitespace alone is a prompt: "\\n" starts the
    model unconditionally, as the API and eval take it); see read_tokens."""
    if (prompt is None) == (prompt_file is None):
        raise KLError("give the prompt as --prompt TEXT or --prompt-file FILE (- for standard input)"
                      + (", not both" if prompt is not None else ""))
    if prompt is not None:
        where, chunks = "--prompt", _text_chunks(prompt)
    else:
        where, chunks = f"--prompt-file {prompt_file}", _chunks(prompt_file, "--prompt-file")
    result = read_tokens(chunks, where, tokenizer, max_tokens)
    if not result.text:   # a text cut past the budget is never empty
        raise KLError(f"{where}: the prompt is empty; write some text into it")
    return result


def read_text_file(path: str | Path, flag: str, tokenizer: Tokenizer, max_tokens: int, min_tokens: int = 0) -> str:
    """The start of a UTF-8 file that holds its first `max_tokens` tokens (all of it when shorter); refused when the
    file holds fewer than `min_tokens`."""
    result = read_tokens(_chunks(str(path), flag), f"{flag} {path}", tokenizer, max_tokens)
    if len(result.ids) < min_tokens:
        raise KLError(f"{result.where}: holds {len(result.ids)} token(s) of text; give at least {min_tokens}")
    return result.text
