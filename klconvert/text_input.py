"""Prompt and evaluation text from a file, standard input, the command line or a str, read no further than the tokens
it may use: bytes arrive in chunks, are decoded, and are encoded window by window exactly where Tokenizer.encode cuts
the text, so reading stops soon after the token budget is passed (`--prompt-file /dev/zero` ends, in bounded memory;
evaluate's str of a whole corpus costs the windows its tokens take).
"""
from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from klconvert.errors import KLError, not_utf8
from klconvert.units import counted
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
    """Decode UTF-8 `chunks` (a byte-order mark at the start dropped, as editors on Windows write one) and encode them
    as text_tokens does; `where` names the source in errors."""
    return _encode_windows(_decoded(chunks, where), where, tokenizer, max_tokens)


def text_tokens(text: str, where: str, tokenizer: Tokenizer, max_tokens: int) -> TokenizedText:
    """A str encoded window by window, stopping once more than `max_tokens` ids are made: its first ids cost memory
    for those windows, not for the whole text (no byte-order mark dropped: a str is text, not a file's bytes)."""
    return _encode_windows((text[start:start + MAX_ENCODE_CHARS] for start in range(0, len(text), MAX_ENCODE_CHARS)),
                           where, tokenizer, max_tokens)


def _decoded(chunks: Iterator[bytes], where: str) -> Iterator[str]:
    """The text of UTF-8 `chunks`, a leading byte-order mark dropped; a bad byte refused, placed in the stream."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    read = 0  # bytes handed to the decoder so far
    at_start = True
    for chunk in _with_end(chunks):
        held = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            if read == 0 and e.start == 0 and chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise KLError(f"{where}: UTF-16 text, not UTF-8 (it starts with {chunk[:2].hex(' ').upper()}, a "
                              "UTF-16 byte-order mark); convert it to UTF-8") from None
            raise KLError(f"{not_utf8(where, read - held + e.start)}; convert it to UTF-8") from None
        read += len(chunk)
        if at_start and text:
            text, at_start = text.removeprefix(BYTE_ORDER_MARK), False
        yield text


def _with_end(chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield from chunks
    yield b""  # the end: flush the decoder


def _encode_windows(pieces: Iterator[str], where: str, tokenizer: Tokenizer, max_tokens: int) -> TokenizedText:
    """Text arriving in `pieces` encoded window by window, cut exactly where Tokenizer.encode cuts it, so the ids are
    the first of the whole text's; stops once more than `max_tokens` ids are made."""
    pending, windows, ids = "", [], []
    for piece in chain(pieces, [None]):   # None: the end, where what is left is encoded ("" may come before it)
        pending += piece or ""
        while len(pending) >= MAX_ENCODE_CHARS or (piece is None and pending):
            window, pending = pending[:MAX_ENCODE_CHARS], pending[MAX_ENCODE_CHARS:]
            windows.append(window)
            ids += tokenizer.encode(window)
            if len(ids) > max_tokens:
                return TokenizedText("".join(windows), ids, whole=not pending and piece is None, where=where)
    return TokenizedText("".join(windows), ids, whole=True, where=where)


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
        raise KLError(f"{result.where}: holds {counted(len(result.ids), 'token')} of text; give at least {min_tokens}")
    return result.text
