"""The codes a rendered chat holds the caller's text in, so that only the template's own text becomes special tokens.

Each string the caller gives (a message's text, a key, at any depth) is written by the template between a start and
an end code, and inside it every special token's text (and the lead character itself) is swapped for a code: text
joined across strings, or with the template's text beside it ("<|im_" + "end|>"), never meets as one token, and a
string the template cut or trimmed still holds no special text. A code is the lead character and one ideograph of CJK
Extension B (printable, so a template writes it as it is in text, a list's repr and JSON). The lead is picked per chat
as the first such ideograph that neither the template nor any special token holds, so a special token or a template
holding any of them -- real Han characters -- is read as it is; the codes after a lead mean nothing alone.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

LEADS = range(0x20000, 0x2A6E0)   # CJK Extension B: where the lead is picked
CODES = 0x20000                   # the character after the lead: SPAN_START, SPAN_END, then each escaped text's
SPAN_START, SPAN_END, FIRST_TEXT = 0, 1, 2
CODE_CHARS = 2   # a code's characters: the most a character of the caller's text is written as
SPAN_CHARS = 4   # a span's start and end codes, written for each string of the caller's that is not empty


def free_lead(taken: Iterable[str]) -> str | None:
    """The first of LEADS that no text of `taken` holds (None if they hold every one)."""
    used = set().union(*map(set, taken))
    return next((chr(c) for c in LEADS if chr(c) not in used), None)


class ChatCodes:
    """Writing the caller's text into a render (mark) and reading a render back into the caller's text and the
    template's (pieces), for one lead and the texts it escapes (the special tokens')."""

    def __init__(self, lead: str, texts: Iterable[str]):
        self.lead = lead
        self.texts = tuple(sorted(texts, key=len, reverse=True))   # longest first, so no text shadows another
        escaped = (*self.texts, lead)
        self._restored = escaped
        self._codes = {text: lead + chr(CODES + FIRST_TEXT + i) for i, text in enumerate(escaped)}
        self._escape = re.compile("|".join(map(re.escape, escaped)))
        self._code = re.compile(re.escape(lead) + "(.)", re.DOTALL)

    def escape(self, text: str) -> str:
        """`text` with each escaped text swapped for its code: what a template's string operations see."""
        return self._escape.sub(lambda m: self._codes[m[0]], text)

    def mark(self, text: str) -> str:
        """The caller's `text` as a render writes it: escaped, between the span codes ("" stays "")."""
        if not text:
            return ""
        return f"{self.lead}{chr(CODES + SPAN_START)}{self.escape(text)}{self.lead}{chr(CODES + SPAN_END)}"

    def pieces(self, rendered: str) -> Iterator[tuple[str, bool]]:
        """`rendered` as (text, whether it is the caller's) in order, the codes read back: text inside a span, and an
        escaped text anywhere (from a string the template cut or trimmed), is the caller's. A code the template cut
        in two stays as it is written."""
        depth, at = 0, 0
        for code in self._code.finditer(rendered):
            if code.start() > at:
                yield rendered[at:code.start()], depth > 0
            at, index = code.end(), ord(code[1]) - CODES
            if index == SPAN_START:
                depth += 1
            elif index == SPAN_END:
                depth = max(0, depth - 1)   # an end whose start the template cut off
            elif 0 <= index - FIRST_TEXT < len(self._restored):
                yield self._restored[index - FIRST_TEXT], True
            else:
                yield code[0], True
        if at < len(rendered):
            yield rendered[at:], depth > 0
