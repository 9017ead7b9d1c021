"""Names written into the model card's markdown (convert/markdown_text.py) read back as they are, by a CommonMark
renderer with tables, in each place the card puts one: a code span, a paragraph, a heading, a table cell; and the
card quantize writes keeps its structure whatever the source's and OUT's names hold."""
from __future__ import annotations

import shlex
import shutil
import string

import pytest
from markdown_it import MarkdownIt

from klconvert.convert.markdown_text import code_span, literal_text
from klconvert.quantize import quantize

MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])
ODD_NAMES = ["a`b|c", "`a", "a`", "``x```y`", "x_y", "_x_", "a*b*c", "[l](http://e.x)", "![i](http://e.x/i.png)",
             "<b>x</b>", "&amp;", "~~s~~", "a\\", "a\\|b", "x #", "x ##", "1. x", "- x", string.punctuation]


def shown_inline(source: str, block: str) -> list[str]:
    """The inline content of each `block` (paragraph, heading, td) in `source` as the renderer reads it: its text as
    such, a code span's in <code></code>, any other markup (a link, emphasis, raw HTML) by its token's type in <>."""
    tokens = MARKDOWN.parse(source)
    return ["".join(c.content if c.type == "text" else f"<code>{c.content}</code>" if c.type == "code_inline" else
                    f"<{c.type}>" for c in inline.children)
            for opened, inline in zip(tokens, tokens[1:]) if opened.type == f"{block}_open"]


@pytest.mark.parametrize("text", ODD_NAMES + [" a ", " a", "a ", "   ", "a  b"])
def test_a_code_span_holds_its_text_whole(text):
    tokens = MARKDOWN.parse(f"from {code_span(text)} on")[1].children
    assert [(t.type, t.content) for t in tokens] == [("text", "from "), ("code_inline", text), ("text", " on")]


@pytest.mark.parametrize("text", ODD_NAMES)
def test_literal_text_shows_as_it_is_in_a_paragraph_a_heading_and_a_table_cell(text):
    assert shown_inline(f"from {literal_text(text)} on", "paragraph") == [f"from {text} on"]
    assert shown_inline(f"# {literal_text(text)}\n\nnext", "heading") == [text]
    table = f"| | |\n|---|---|\n| source | {literal_text(text)} |\n| format | x |"
    assert shown_inline(table, "td") == ["source", text, "format", "x"]   # two columns, the name one cell


def test_ordinary_names_keep_their_bytes():
    """The cards of ordinary names are as before: nothing in a hub repo id, a folder's snake_case or a commit is
    escaped, and a code span is one backtick each side."""
    for name in ("Kimi-Linear-48B-A3B-Instruct", "moonshotai/Kimi-Linear-48B-A3B-Instruct@0123abc", "kimi_linear.v2",
                 "the bundled model tiny"):
        assert literal_text(name) == name and code_span(name) == f"`{name}`"


def test_the_card_shows_odd_names_as_they_are(tiny_released, tmp_path):
    """h276's F1: the card wrote the source's and OUT's names into its markdown and its shell command as they were:
    a backtick ended the source's code span, a pipe added a table column, a newline in the source's name (the command
    line refuses one; the Python API, or a symlink to it, did not) made a line of its own, a heading, and was printed
    raw in the summary; OUT's name split at its space in the Run-it command, its backticks and #s were markup in the
    title. Each is shown as it is where it stands now, the newline as its escape."""
    src = shutil.copytree(tiny_released, tmp_path / "x`y|z\n# Official Moonshot release")
    out = tmp_path / "my `model` | v2 #"
    result = quantize(src, out, bits=4, group_size=32, progress=False)
    body = (out / "README.md").read_text().split("---\n", 2)[2]   # past the front matter: YAML for the hub
    src_shown = "x`y|z\\n# Official Moonshot release"
    assert shown_inline(body, "heading") == [out.name, "How each tensor is stored", "Run it"]
    assert f"from local folder <code>{src_shown}</code> (no hub commit recorded)." in shown_inline(body, "paragraph")[0]
    assert shown_inline(body, "td")[:3] == ["source", f"local folder {src_shown}", "format"]   # a cell, not two
    [command] = [t.content for t in MARKDOWN.parse(body) if t.type == "fence" and t.info == "bash"]
    assert shlex.split(command) == ["klconvert", "run", "--model", f"path/to/{out.name}", "--prompt-file", "prompt.txt"]
    assert "\n" not in result.summary() and f"quantized local folder {src_shown} -> " in result.summary()


def test_a_newline_in_out_s_name_is_shown_as_its_escape(tiny_released, tmp_path):
    """The Python API takes an OUT the command line refuses (a control character in it): its newline made the card's
    title two lines and the summary two. Both show its escape now, as the Run-it command does (a command that names
    it as it is cannot be run: `run --model` refuses the newline too)."""
    result = quantize(tiny_released, tmp_path / "o\nx", bits=4, group_size=32, progress=False)
    body = (result.path / "README.md").read_text().split("---\n", 2)[2]
    assert shown_inline(body, "heading") == ["o\\nx", "How each tensor is stored", "Run it"]
    assert "klconvert run --model 'path/to/o\\nx' --prompt-file prompt.txt\n" in body
    assert "\n" not in result.summary() and result.summary().startswith(f"quantized local folder {tiny_released.name} "
                                                                         f"-> {tmp_path}/o\\nx: ")
