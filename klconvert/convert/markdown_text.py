"""Text the model card takes from names (a source folder's, OUT's, a recipe's pattern) written so that markdown shows
it as it is: a backtick, a pipe or a `#` in a name neither ends a code span, adds a table column nor makes markup.
The names come with their control characters escaped already (errors.controls_escaped): a newline would start a
line of its own, a heading, whatever a span does."""
from __future__ import annotations

import re

# ASCII punctuation that starts or ends inline markup (CommonMark, and GitHub's and the hub's tables and
# strikethrough): a backslash escape, a code span, emphasis, a link or image, raw HTML or an autolink, an entity,
# strikethrough, a table cell's end, a heading's closing #s. An underscore between two letters or digits is none
# (no emphasis opens or closes inside a word), so snake_case names keep their bytes.
_MARKUP = re.compile(r"[\\`*\[\]<&~|#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def code_span(text: str) -> str:
    """`text` as a CommonMark code span: fenced by one backtick more than its longest run of them, which no run in it
    closes; padded by a space each side where it starts or ends with a backtick or a space, as CommonMark strips one
    space each side of a span's text (an all-space text is not stripped)."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.strip(" ") and (text[0] in "` " or text[-1] in "` ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def literal_text(text: str) -> str:
    """`text` as markdown that shows it literally, in a paragraph, a heading or a table cell: each markup character
    backslash-escaped (CommonMark takes a backslash before any ASCII punctuation as the character itself; a table
    takes an escaped pipe as no column's end)."""
    return _MARKUP.sub(lambda m: "\\" + m.group(), text)
