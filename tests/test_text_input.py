"""Text read chunk by chunk and encoded window by window gives exactly Tokenizer.encode's ids, and stops early."""
from __future__ import annotations

import random
import re

import pytest

from klconvert import text_input
from klconvert.errors import KLError
from klconvert.evaluate import MIN_SCORED_TOKENS
from klconvert.text_input import read_prompt, read_text_file, read_tokens, text_tokens
from klconvert.tokenizer import MAX_ENCODE_CHARS, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_released):
    return Tokenizer.from_folder(tiny_released)


def awkward_text(chars: int, seed: int = 0) -> str:
    """Words, digits, CJK, emoji and long whitespace runs, so windows and chunks cut inside every kind of piece."""
    rng = random.Random(seed)
    parts = ["the ", "quick", " 12345", "漢字", "😀", " " * 30000, "\n\n", "fox-jumps", "é"]
    out, size = [], 0
    while size < chars:
        out.append(rng.choice(parts))
        size += len(out[-1])
    return "".join(out)


@pytest.mark.slow
def test_chunked_reading_matches_encode(tokenizer, monkeypatch):
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", 4099)  # chunks cut through multi-byte characters
    text = awkward_text(2 * MAX_ENCODE_CHARS + 12345)
    read = read_prompt(text, None, tokenizer, 10**9)
    assert read.whole and read.text == text and read.ids == tokenizer.encode(text)


def test_reading_stops_past_the_budget_with_a_prefix_of_the_ids(tokenizer, tmp_path):
    text = awkward_text(3 * MAX_ENCODE_CHARS)
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    full = tokenizer.encode(text)
    read = read_tokens(text_input._chunks(str(path), "--text-file"), "here", tokenizer, 10)
    assert not read.whole and len(read.text) == MAX_ENCODE_CHARS and read.ids == full[:len(read.ids)]
    assert tokenizer.encode(read_text_file(path, "--text-file", tokenizer, 10))[:10] == full[:10]


def test_a_str_is_encoded_window_by_window_as_it_is(tokenizer):
    """evaluate's text: the first ids of Tokenizer.encode's, stopped past the budget; a byte-order mark in a str is
    text (a file's is dropped where it is read)."""
    text = "\ufeff" + awkward_text(3 * MAX_ENCODE_CHARS)
    full = tokenizer.encode(text)
    read = text_tokens(text, "text", tokenizer, 10)
    assert not read.whole and len(read.text) == MAX_ENCODE_CHARS and read.ids == full[:len(read.ids)]
    assert text_tokens(text[:1000], "text", tokenizer, 10**9).ids == tokenizer.encode(text[:1000])


def test_a_bad_byte_is_placed_exactly(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", 7)
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld".encode() + b"\xff tail")
    with pytest.raises(KLError, match=r"bad\.txt: not UTF-8 text \(bad byte at offset 13\)"):
        read_prompt(None, str(path), tokenizer, 100)


@pytest.mark.parametrize("chunk", [1, 2, 4096])
def test_a_byte_order_mark_at_the_start_is_dropped(tokenizer, tmp_path, monkeypatch, chunk):
    """Editors on Windows start UTF-8 files with EF BB BF: not text of the prompt (wherever the chunks cut it)."""
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", chunk)
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfTo be, or not to be \xef\xbb\xbf")
    got = read_text_file(path, "--prompt-file", tokenizer, 100)
    assert got == "To be, or not to be \ufeff"  # only the first is a mark; one inside the text stays


def test_no_prompt_is_not_called_two():
    with pytest.raises(KLError) as e:
        read_prompt(None, None, None, 10)
    assert "--prompt TEXT or --prompt-file FILE" in str(e.value) and "not both" not in str(e.value)
    with pytest.raises(KLError, match="not both"):
        read_prompt("a", "b.txt", None, 10)


@pytest.mark.parametrize("mark, encoding", [("FF FE", "utf-16-le"), ("FE FF", "utf-16-be")])
def test_utf16_text_is_named(tokenizer, tmp_path, mark, encoding):
    """Windows' "Unicode" text starts with a UTF-16 byte-order mark: said so, not "bad byte at offset 0"."""
    path = tmp_path / "u16.txt"
    path.write_bytes(bytes.fromhex(mark) + "To be, or not to be".encode(encoding))
    with pytest.raises(KLError, match=rf"u16\.txt: UTF-16 text, not UTF-8 \(it starts with {mark}, a UTF-16 "
                                      r"byte-order mark\); convert it to UTF-8$"):
        read_prompt(None, str(path), tokenizer, 100)


def test_a_budget_met_exactly_at_a_window_end_reads_on(tokenizer):
    """A budget of exactly the first window's ids: reading goes on past it, so a text cut short always has more ids
    than the budget (the CLI refuses only `len(ids) > budget`; cut at == it ran the first window alone)."""
    text = ("the quick fox " * MAX_ENCODE_CHARS)[:3 * MAX_ENCODE_CHARS // 2]
    budget = len(tokenizer.encode(text[:MAX_ENCODE_CHARS]))
    read = read_prompt(text, None, tokenizer, budget)
    assert len(read.ids) > budget and read.whole and read.ids == tokenizer.encode(text)


@pytest.mark.parametrize("data, offset", [("été café".encode("latin-1"), 0), (b"h\xffllo", 1)])
def test_a_bad_first_byte_is_not_called_utf16(tokenizer, tmp_path, data, offset):
    """Latin-1 text fails at byte 0 too, but without a UTF-16 byte-order mark: a bad byte, placed."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(data)
    with pytest.raises(KLError, match=rf"latin1\.txt: not UTF-8 text \(bad byte at offset {offset}\); convert it to "
                                      r"UTF-8$"):
        read_prompt(None, str(path), tokenizer, 100)


def test_a_prompt_file_that_is_a_directory_is_said_so(tokenizer, tmp_path):
    with pytest.raises(KLError, match=rf"^--prompt-file {re.escape(str(tmp_path))}: cannot read it \(Is a directory\); "
                                      "check the path$"):
        read_prompt(None, str(tmp_path), tokenizer, 100)


def test_a_text_file_of_exactly_the_least_tokens_is_read(tokenizer, tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("hello world", encoding="utf-8")
    assert len(tokenizer.encode("hello world")) == MIN_SCORED_TOKENS
    assert read_text_file(path, "--text-file", tokenizer, 100, min_tokens=MIN_SCORED_TOKENS) == "hello world"
    with pytest.raises(KLError, match=r"two\.txt: holds 2 tokens of text; give at least 3$"):
        read_text_file(path, "--text-file", tokenizer, 100, min_tokens=MIN_SCORED_TOKENS + 1)


def test_only_the_first_of_two_byte_order_marks_is_dropped(tokenizer, tmp_path, monkeypatch):
    """The second mark, a chunk of its own right after the first, is text (each chunk's start is not the file's)."""
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", 3)
    path = tmp_path / "boms.txt"
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbfabc")
    assert read_text_file(path, "--prompt-file", tokenizer, 100) == "\ufeffabc"


def test_a_prompt_file_is_read_with_standard_input_closed(tokenizer, tmp_path, monkeypatch):
    """Standard input closed (<&-) refuses `--prompt-file -` alone; a file is read as ever."""
    monkeypatch.setattr("sys.stdin", None)
    path = tmp_path / "p.txt"
    path.write_text("To be, or not to be", encoding="utf-8")
    assert read_prompt(None, str(path), tokenizer, 100).text == "To be, or not to be"
    with pytest.raises(KLError, match=r"^--prompt-file -: standard input is closed"):
        read_prompt(None, "-", tokenizer, 100)


def test_a_text_cut_where_a_window_ends_a_chunk_is_not_whole(tokenizer, monkeypatch):
    """Cut past the budget where a window took all the text read so far, more chunks to come: not whole (it was
    said whole, though the text goes on)."""
    monkeypatch.setattr(text_input, "MAX_ENCODE_CHARS", 16)
    monkeypatch.setattr(text_input, "READ_CHUNK_BYTES", 16)
    read = read_prompt("the quick fox ju" * 3, None, tokenizer, 2)
    assert len(read.text) == 16 and len(read.ids) > 2 and not read.whole


def test_a_prompt_of_whitespace_alone_is_read_and_an_empty_one_refused(tokenizer, tmp_path):
    """Whitespace alone is a prompt ("\\n": the natural unconditional start, which the API runs and eval scores);
    only no text at all is refused, a file holding a byte-order mark alone too."""
    for text in ("\n", " \t\r\n"):
        assert read_prompt(text, None, tokenizer, 100).ids == tokenizer.encode(text)
    with pytest.raises(KLError, match=r"^--prompt: the prompt is empty; write some text into it$"):
        read_prompt("", None, tokenizer, 100)
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(KLError, match=r"bom\.txt: the prompt is empty"):
        read_prompt(None, str(path), tokenizer, 100)
