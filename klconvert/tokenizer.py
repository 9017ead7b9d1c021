"""Tokenizer: a checkpoint folder's tiktoken.model and tokenizer_config.json, encoding and decoding text."""
from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import hashlib
import json
import math
import numbers
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import tiktoken

from klconvert.checkpoint.folder_files import CONFIG_FILE as MODEL_CONFIG_FILE, refuse_link_out
from klconvert.checkpoint.regular_file import read_bounded, read_json
from klconvert.chat_template import RenderPastBound, render_chat_template
from klconvert.config import SIZE_RANGES, KimiLinearConfig
from klconvert.errors import KLError, not_utf8, refuse_if_not_permitted, shown, unreadable_reason
from klconvert.models import resolve_model
from klconvert.units import counted
from klconvert.verified_files import redownload_advice

BPE_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer HF folders keep the template here; it wins over the config's
# The name of the template transformers renders a chat with, of the several a config's chat_template may list
DEFAULT_CHAT_TEMPLATE = "default"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # transformers' copy of the specials; klconvert reads the config's
TOKENIZER_FILES = (BPE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)  # a tokenizer folder's files (the release's)
# what transformers 5 saves in their place (with a slim tokenizer_config.json): read by the `tokenizers` library,
# which klconvert does not depend on
TRANSFORMERS_TOKENIZER_FILE = "tokenizer.json"

# The pre-tokenizer of the released tokenization_kimi.py (TikTokenTokenizer.pat_str), carried as data: runs
# of Han characters; cased words (Han excluded) with an optional English contraction; 1-3 digits; punctuation
# with its trailing newlines; whitespace. `&&` is a character-class intersection (Rust regex syntax).
KIMI_PRETOKENIZE_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# The released tokenizer hands tiktoken at most 400k characters a call and cuts runs of more than 25k
# whitespace or non-whitespace characters (tiktoken issue #195); cutting at the same places keeps ids equal.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Bounds on the files, read before anything is built from them. The released tiktoken.model is 2.6 MB; tiktoken
# builds one regex alternative per special token, 100k of which take 0.8 GB and seconds (the released has 256).
MAX_BPE_BYTES = 32 << 20
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
MAX_SPECIAL_TOKENS = 8192
MAX_SPECIAL_TOKEN_CHARS = 256  # the released ones are short tags ("<|im_user|>"); tiktoken compiles them into a regex
# All named special tokens' text together (released: ~6,000 characters). 8,192 of 250 characters each took 0.8 GB
# (the Encoding's regex, ours) before the checkpoint itself was checked.
MAX_SPECIAL_TEXT_CHARS = 1 << 17

# A chat's message text is escaped before the template runs, so that a special token's text becomes its id only where
# the template wrote its first and last characters. In each string of the messages, dict keys too, the first character
# of each special token's text inside it is swapped for its code: ESCAPE, then ESCAPE+1+i for the i-th character
# escaped; ESCAPE itself is one, escaped wherever it is, so no message text holds a code. So are a string's edges where
# a token's text could run past them -- the first character of its start cut off by the string's end ("see <|im_"),
# the last of its end cut off by the string's start ("end|> and go on") -- where that character is no word's (a
# letter, digit or underscore: the release's tokens begin with "<" or "[" and end with ">" or "]"). No special token's
# text holds a code, so none can lie inside a message's text, nor reach into it from the text beside it, the
# template's or another string's, at a non-word character. Only those characters change, not whole strings: a
# template's lookups and tests (message['content'], role == 'user') see ordinary strings as they are -- a word's edge
# escaped for a fine-tune's word-like token ("tool_output" from "content"'s "t") lost the content silently. So a
# whole string the template writes between a token's first and last characters still joins it ("<|im_" + "end" +
# "|>"; "user" lies inside "<|im_user|>", and escaping it failed the released template's role tests), as do a
# word-like token's pieces and text a template rewrites (| lower, | replace, | trim...). The message text comes back
# verbatim and is encoded as plain text. The codes are ideographs of CJK Extension B (U+20000.., rare, assigned since
# Unicode 3.1): printable, so a template writes them as they are however it writes a string -- as text, in Python's
# repr of a list, in JSON. Private-use codes (plane 15) came out of a repr as backslash text (\U000f0000\U000f0007),
# which a message may hold too: it came back rewritten.
ESCAPE = 0x20000
# past the codes: ESCAPE, then one for each character escaped -- each special token's first and last, and ESCAPE
ESCAPE_END = ESCAPE + 1 + 2 * MAX_SPECIAL_TOKENS + 1


def _holds_a_code(text: str) -> bool:
    """Whether `text` holds a character of the escape codes (ESCAPE..ESCAPE_END): real Han characters, which a
    special token may hold; only a chat cannot take such a token."""
    return any(ESCAPE <= ord(char) < ESCAPE_END for char in text)


def _word_character(char: str) -> bool:
    """Whether `char` can be part of a word (a letter, digit or underscore), as a string's edge: see ESCAPE."""
    return char.isalnum() or char == "_"


def _begins_one(sorted_texts: list[str], head: str) -> bool:
    """Whether one of `sorted_texts` (sorted) begins with `head`: those that do sort together, from where it would."""
    at = bisect.bisect_left(sorted_texts, head)
    return at < len(sorted_texts) and sorted_texts[at].startswith(head)


def read_bpe_ranks(path: Path, vocab_size: int = SIZE_RANGES["vocab_size"][1]) -> dict[bytes, int]:
    """tiktoken.model as {token bytes: rank}, every rank below `vocab_size`; the format of
    tiktoken.load_tiktoken_bpe, checked line by line.

    load_tiktoken_bpe itself is not used: it copies every file it reads into /tmp/data-gym-cache keyed by
    the path alone, and later serves that copy even after the file at that path has changed.
    """
    refuse_link_out(path)
    try:
        data = read_bounded(path, MAX_BPE_BYTES, BPE_FILE)
    except FileNotFoundError:
        if path.with_name(TRANSFORMERS_TOKENIZER_FILE).is_file():
            raise KLError(f"{path}: no {BPE_FILE} here, only a {TRANSFORMERS_TOKENIZER_FILE} that transformers saved, "
                          f"which klconvert does not read; copy the release's {', '.join(TOKENIZER_FILES)} into "
                          f"{path.parent}") from None
        raise KLError(f"{path}: no {BPE_FILE} here (the tokenizer's BPE ranks); name a Kimi Linear checkpoint "
                      "folder, or re-download the model") from None
    except OSError as e:
        refuse_if_not_permitted(e, path)   # said as that; anything else (a folder, a FIFO, a link in a loop) is damage
        raise KLError(f"{path}: cannot read the BPE ranks ({e.strerror or e}); re-download the model") from None
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token_base64, rank_text = line.split()
            token, rank = base64.b64decode(token_base64, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise KLError(f"{path}: line {line_number} is not '<base64 token> <rank>' (got {line[:60]!r}); "
                          f"{redownload_advice(path)}") from None
        if not token or rank < 0 or token in ranks:
            problem = "an empty token" if not token else "a negative rank" if rank < 0 else "a repeated token"
            raise KLError(f"{path}: line {line_number} holds {problem}; {redownload_advice(path)}")
        if rank >= vocab_size or len(ranks) >= vocab_size:
            problem = f"rank {shown(rank)}" if rank >= vocab_size else f"rank number {len(ranks) + 1}"
            raise KLError(f"{path}: line {line_number} holds {problem}, outside the model's vocabulary of "
                          f"{vocab_size:,} ids; the tokenizer is not this model's -- {redownload_advice(path)}")
        if rank in line_of_rank:
            raise KLError(f"{path}: line {line_number} holds rank {rank}, which line {line_of_rank[rank]} already "
                          f"gives another token; {redownload_advice(path)}")
        ranks[token] = rank
        line_of_rank[rank] = line_number
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise KLError(f"{path}: {len(missing_bytes)} of the 256 single bytes have no rank (first: "
                      f"{missing_bytes[0]:#04x}), so some text cannot be encoded; {redownload_advice(path)}")
    return ranks


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json as a dict."""
    refuse_link_out(path)
    try:
        config = read_json(path, MAX_TOKENIZER_CONFIG_BYTES, TOKENIZER_CONFIG_FILE)
    except FileNotFoundError:
        raise KLError(f"{path}: no {TOKENIZER_CONFIG_FILE} here; re-download the model") from None
    except UnicodeDecodeError as e:   # a ValueError, so before the JSON parser's
        raise KLError(f"{not_utf8(path, e.start)}; convert it to UTF-8, or {redownload_advice(path)}") from None
    except OSError as e:
        refuse_if_not_permitted(e, path)
        raise KLError(f"{path}: cannot read the tokenizer config ({unreadable_reason(e)}); "
                      "re-download the model") from None
    except json.JSONDecodeError as e:
        raise KLError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {redownload_advice(path)}") from None
    except (RecursionError, ValueError) as e:  # nesting past Python's stack; an int of 4,300+ digits
        raise KLError(f"{path}: not a tokenizer config ({unreadable_reason(e, 80)}); "
                      f"{redownload_advice(path)}") from None
    if not isinstance(config, dict):
        raise KLError(f"{path}: expected a JSON object at the top level; {redownload_advice(path)}")
    return config


STRIPPING_FLAGS = ("lstrip", "rstrip", "single_word")   # an added token's flags that change how text around it splits
# Every flag of an added token (tokenizers' AddedToken): transformers builds one from each entry, and a flag that is
# no bool ("lstrip": null) ends its load in a TypeError
ADDED_TOKEN_FLAGS = (*STRIPPING_FLAGS, "normalized", "special")
# The config's keys that transformers reads as its named special tokens (SPECIAL_TOKENS_ATTRIBUTES). klconvert uses
# bos, eos and pad; transformers adds the text of any of them that added_tokens_decoder lacks as a token of a new id,
# past the model's vocabulary, and fails to load one that is no text. transformers 5 reads any other "<name>_token"
# key that holds text so too (a model's own special token).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The config's lists of special tokens beside the named ones: transformers 4's name and 5's. klconvert reads neither;
# transformers adds each to its tokenizer, and fails to load one that holds anything but a token
EXTRA_SPECIAL_TOKENS_FIELDS = ("additional_special_tokens", "extra_special_tokens")


def mistyped_flag(entry: dict) -> str | None:
    """The first of ADDED_TOKEN_FLAGS that `entry` (an added token's fields) gives as no bool, if any."""
    return next((flag for flag in ADDED_TOKEN_FLAGS if flag in entry and not isinstance(entry[flag], bool)), None)


def read_special_tokens(config: dict, path: Path, vocab_size: int = SIZE_RANGES["vocab_size"][1]) -> dict[str, int]:
    """{content: id} for every entry of the config's added_tokens_decoder, every id below `vocab_size`."""
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise KLError(f"{path}: no 'added_tokens_decoder' map of special tokens; {redownload_advice(path)}")
    special_tokens: dict[str, int] = {}
    for key, entry in decoder.items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,9}", key):   # "01026" would name the id of "1026" a second time
            raise KLError(f"{path}: added_tokens_decoder entry {shown(key)} is not an id in plain decimal (digits, no "
                          f"leading zeros); fix the file or {redownload_advice(path)}")
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise KLError(f"{path}: added_tokens_decoder entry {key!r} is not '<id>': {{\"content\": \"<text>\"}}; "
                          f"fix the file or {redownload_advice(path)}")
        if len(content) > MAX_SPECIAL_TOKEN_CHARS:
            raise KLError(f"{path}: added_tokens_decoder entry {key} is {len(content):,} characters long, over the "
                          f"{MAX_SPECIAL_TOKEN_CHARS} a special token's text may be; fix the file or "
                          f"{redownload_advice(path)}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate ("\ud800" in the JSON): no text, and tiktoken cannot take it
            raise KLError(f"{path}: added_tokens_decoder entry {key} holds {content[:40]!r}, with an unpaired "
                          f"surrogate that is no text; fix the file or {redownload_advice(path)}") from None
        mistyped = mistyped_flag(entry)
        if mistyped is not None:
            allowed = "false" if mistyped in STRIPPING_FLAGS else "true or false"
            raise KLError(f"{path}: added_tokens_decoder entry {key} sets {mistyped} to {shown(entry[mistyped])}, "
                          f"which is neither true nor false, so transformers cannot load the tokenizer; set it to "
                          f"{allowed}, or {redownload_advice(path)}")
        applied = next((flag for flag in STRIPPING_FLAGS if entry.get(flag) is True), None)
        if applied is not None:   # transformers applies these; klconvert does not
            raise KLError(f"{path}: added_tokens_decoder entry {key} sets {applied} true, which klconvert does not "
                          "apply and transformers and vLLM do (the space beside the token is taken into it): the two "
                          f"would read text apart; set it to false, or {redownload_advice(path)}")
        if content in special_tokens:
            raise KLError(f"{path}: special token {content!r} appears twice in added_tokens_decoder (ids "
                          f"{special_tokens[content]} and {key}); fix the file or {redownload_advice(path)}")
        if int(key) >= vocab_size:
            raise KLError(f"{path}: added_tokens_decoder gives {shown(content)} the id {key}, outside the model's "
                          f"vocabulary 0..{vocab_size - 1}; fix the file or {redownload_advice(path)}")
        special_tokens[content] = int(key)
    text_chars = sum(map(len, special_tokens))
    if text_chars > MAX_SPECIAL_TEXT_CHARS:
        raise KLError(f"{path}: added_tokens_decoder's {len(special_tokens):,} special tokens hold {text_chars:,} "
                      f"characters of text, over the {MAX_SPECIAL_TEXT_CHARS:,} klconvert takes (the released model's "
                      f"hold ~6,000); fix the file or {redownload_advice(path)}")
    return special_tokens


def special_token_text(token, where: str, special_tokens: Mapping[str, int], path: Path) -> str:
    """The text of a special token the config gives at `where` ("bos_token", "additional_special_tokens[2]"): its
    text, or a serialized AddedToken of it ({"__type": "AddedToken", "content": ..., bool flags}), one of
    `special_tokens`. KLError for anything else: transformers fails to load any other value (a plain dict, an int: a
    TypeError), and gives text no special token has a new id, past the model's vocabulary."""
    serialized = isinstance(token, dict) and token.get("__type") == "AddedToken"
    text = token.get("content") if serialized else token
    if not isinstance(text, str):
        raise KLError(f"{path}: {where} is {shown(token)}, not a special token (its text, or "
                      "{\"__type\": \"AddedToken\", \"content\": <its text>}), so transformers cannot load the "
                      f"tokenizer; fix the file or {redownload_advice(path)}")
    mistyped = mistyped_flag(token) if serialized else None
    if mistyped is not None:
        raise KLError(f"{path}: {where} sets {mistyped} to {shown(token[mistyped])}, which is neither true nor false, "
                      f"so transformers cannot load the tokenizer; fix the file or {redownload_advice(path)}")
    if text not in special_tokens:
        raise KLError(f"{path}: {where} {shown(text)} is not in added_tokens_decoder; fix the file or "
                      f"{redownload_advice(path)}")
    return text


def named_special_token(config: dict, key: str, special_tokens: Mapping[str, int], path: Path) -> str | None:
    """The text of the config's `key` ("bos_token", ...) if set (special_token_text)."""
    token = config.get(key)
    return None if token is None else special_token_text(token, key, special_tokens, path)


def check_extra_special_tokens(config: dict, path: Path, special_tokens: Mapping[str, int]) -> None:
    """KLError where the config's additional_special_tokens or extra_special_tokens is not what transformers loads:
    null, or a list (or a {name: token} map) of special tokens (special_token_text). An int among them failed
    transformers' load of the tokenizer."""
    for field in EXTRA_SPECIAL_TOKENS_FIELDS:
        tokens = config.get(field)
        if tokens is None:
            continue
        if isinstance(tokens, list):
            entries = [(f"{field}[{i}]", token) for i, token in enumerate(tokens)]
        elif isinstance(tokens, dict):
            entries = [(f"{field}[{shown(name)}]", token) for name, token in tokens.items()]
        else:
            raise KLError(f"{path}: {field} is {shown(tokens)}, not a list of special tokens; fix the file or "
                          f"{redownload_advice(path)}")
        for where, token in entries:
            special_token_text(token, where, special_tokens, path)


def named_chat_templates(value, path: Path) -> list[tuple[object, object]] | None:
    """The (name, template) pairs of tokenizer_config.json's chat_template `value` where it lists named templates
    ([{"name": ..., "template": ...}], or such a {name: template} map), else None. KLError for a list entry that is no
    named template: transformers fails loading such a folder, not only its chat."""
    if isinstance(value, list):
        for i, entry in enumerate(value):
            if not (isinstance(entry, dict) and "name" in entry and "template" in entry):
                raise KLError(f"{path}: chat_template[{i}] is {shown(entry)}, not a named template "
                              f"{{\"name\": ..., \"template\": ...}}; fix the file or {redownload_advice(path)}")
        return [(entry["name"], entry["template"]) for entry in value]
    return list(value.items()) if isinstance(value, dict) else None


def chat_template_text(value, path: Path) -> str:
    """The jinja text a chat is rendered with, from tokenizer_config.json's chat_template `value` (not None) as
    transformers reads it: the text itself, or from its list of named templates ([{"name": ..., "template": ...}],
    which transformers loads as a {name: template} map, and takes as such a map too) the last one named
    DEFAULT_CHAT_TEMPLATE. KLError for any other value, templates none of which is so named (transformers refuses the
    chat too), and a text over MAX_CHAT_TEMPLATE_BYTES."""
    where, named = "chat_template", named_chat_templates(value, path)
    if named is not None:
        defaults = [template for name, template in named if name == DEFAULT_CHAT_TEMPLATE]
        if not defaults:
            raise KLError(f"{path}: chat_template names its templates {shown([name for name, _ in named])}, none of "
                          f"them {DEFAULT_CHAT_TEMPLATE!r}, the one a chat is rendered with; name the template to use "
                          f"{DEFAULT_CHAT_TEMPLATE!r}, or send the prompt without --chat")
        where, value = f"the chat_template named {DEFAULT_CHAT_TEMPLATE!r}", defaults[-1]
    if not isinstance(value, str):
        raise KLError(f"{path}: {where} should be one jinja string, got {type(value).__name__}; fix the file or "
                      f"{redownload_advice(path)}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_CHAT_TEMPLATE_BYTES:   # held to the bound of the template file
        raise KLError(f"{path}: {where} is {size:,} bytes, over the {MAX_CHAT_TEMPLATE_BYTES >> 20} MB a chat "
                      f"template may be; fix the file or {redownload_advice(path)}")
    return value


def pieces_for_tiktoken(text: str, max_chars: int = MAX_ENCODE_CHARS,
                        max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """`text` cut where the released tokenizer cuts it: every max_chars, and every max_run inside a longer run."""
    long_run = re.compile(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}")
    for window_start in range(0, len(text), max_chars):
        window = text[window_start:window_start + max_chars]
        cut = 0
        for run in long_run.finditer(window):
            for at in range(run.start() + max_run, run.end(), max_run):
                yield window[cut:at]
                cut = at
        yield window[cut:]


class ChatPastTokens(KLError):
    """encode_chat's render stopped past what its max_tokens ids can stand for: the chat needs more than max_tokens
    ids (`run` says so against the context)."""

    def __init__(self, max_tokens: int, message: str):
        super().__init__(message)
        self.max_tokens = max_tokens


class Tokenizer:
    """Kimi's tiktoken BPE with the special tokens and chat template of one checkpoint folder."""

    def __init__(self, name: str, ranks: dict[bytes, int], special_tokens: Mapping[str, int],
                 bos_token: str | None, eos_token: str, pad_token: str | None, chat_template, chat_template_path: Path):
        """`chat_template`: as the folder gives it at `chat_template_path` (None: none), read by chat_template_text
        where a chat needs it."""
        self._ranks = MappingProxyType(ranks)   # tiktoken keeps its own only as a private attribute
        self._encoding = tiktoken.Encoding(name=name, pat_str=KIMI_PRETOKENIZE_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=dict(special_tokens))
        self._special_tokens = MappingProxyType(dict(special_tokens))
        self._special_ids = frozenset(special_tokens.values())
        self._bos_token, self._eos_token, self._pad_token = bos_token, eos_token, pad_token
        self._chat_template = chat_template
        self._chat_template_path = chat_template_path
        by_length = sorted(special_tokens, key=len, reverse=True)  # longest first, so no token shadows another
        self._special_split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        # What a chat's message text is escaped with (see ESCAPE): where a special's text or ESCAPE starts in a
        # string; the specials' texts sorted, and each reversed sorted, for whether one begins or ends with a string's
        # end or start; the characters a special's text begins and ends with; a code for each of those and ESCAPE.
        self._escape_pattern = re.compile("|".join(map(re.escape, [*by_length, chr(ESCAPE)])))
        self._specials_sorted = sorted(special_tokens)
        self._specials_reversed_sorted = sorted(text[::-1] for text in special_tokens)
        self._longest_special = len(by_length[0])
        first_chars = frozenset(text[0] for text in special_tokens)
        last_chars = frozenset(text[-1] for text in special_tokens)
        self._escaped_chars = sorted({*first_chars, *last_chars, chr(ESCAPE)})
        # a string's edges are escaped only at these (see ESCAPE): not at a word's characters
        self._edge_first_chars = frozenset(char for char in first_chars if not _word_character(char))
        self._edge_last_chars = frozenset(char for char in last_chars if not _word_character(char))
        self._escape_codes = {char: chr(ESCAPE) + chr(ESCAPE + 1 + i) for i, char in enumerate(self._escaped_chars)}
        first_code, last_code = chr(ESCAPE + 1), chr(ESCAPE + len(self._escaped_chars))
        self._unescape_pattern = re.compile(f"{chr(ESCAPE)}([{first_code}-{last_code}])")
        # The most characters of a rendered chat one id can stand for (encode_chat's bound on a render): an id covers
        # at most its token's bytes (a character is one byte or more) or its special token's text, and the render
        # writes a message's escaped character as its code of 2 characters, at most `expansion` characters for each
        # character it comes back as.
        longest = max(max(map(len, ranks)), max(map(len, special_tokens)))
        expansion = max(map(len, self._escape_codes.values()))
        self._rendered_chars_per_id = math.ceil(longest * max(1.0, expansion))

    @classmethod
    def from_folder(cls, path: str | Path, vocab_size: int | None = None) -> Tokenizer:
        """The folder's tokenizer (`tiny`: the bundled model's), every id below `vocab_size` (default: the folder's
        config.json vocab_size, or klconvert's largest where the folder has no config.json)."""
        low, high = SIZE_RANGES["vocab_size"]
        if vocab_size is not None and not (isinstance(vocab_size, numbers.Integral) and not isinstance(vocab_size, bool)
                                           and low <= vocab_size <= high):
            raise KLError(f"vocab_size {vocab_size!r} should be a whole number from {low} to {high:,} (the model's "
                          "vocabulary), or None to take config.json's")
        folder = resolve_model(path)
        if not folder.is_dir():
            raise KLError(f"{folder}: not a folder; point --model at a Kimi Linear checkpoint folder")
        known_vocab = vocab_size
        if vocab_size is None:
            has_config = (folder / MODEL_CONFIG_FILE).is_file()
            known_vocab = KimiLinearConfig.from_file(folder / MODEL_CONFIG_FILE).vocab_size if has_config else None
            vocab_size = known_vocab or high
        bpe_path, config_path = folder / BPE_FILE, folder / TOKENIZER_CONFIG_FILE
        ranks = read_bpe_ranks(bpe_path, vocab_size)
        config = read_tokenizer_config(config_path)
        special_tokens = read_special_tokens(config, config_path, vocab_size)
        rank_ids = set(ranks.values())
        for text, token_id in special_tokens.items():
            if token_id in rank_ids:
                raise KLError(f"{config_path}: special token {text!r} has id {token_id}, which {bpe_path} already "
                              f"gives to a BPE token; the two files are from different models -- "
                              f"{redownload_advice(config_path)}")
        # BPE ranks fill the ids below the first special token (the released files': 0 to 163,583 before 163,584): a
        # gap there is a tiktoken.model cut short, whose missing merges would become placeholders and every prompt
        # other tokens
        first_special = min(special_tokens.values(), default=0)
        unranked = next((i for i in range(first_special) if i not in rank_ids), None)
        if unranked is not None:
            raise KLError(f"{bpe_path}: no BPE token has id {unranked:,}, below {first_special:,}, where "
                          f"{config_path.name}'s special tokens begin; the file is cut short or damaged -- "
                          f"{redownload_advice(bpe_path)}")
        # Ids of the model's vocabulary (without a config: below the largest named) that neither file names get the
        # released tokenizer's placeholder name, so that any id the model can produce decodes (some Kimi configs list
        # only the named specials).
        taken_ids = rank_ids | set(special_tokens.values())
        end = known_vocab or max(taken_ids) + 1
        specials = end - len(ranks)  # named, and unnamed ids below the end
        if specials > MAX_SPECIAL_TOKENS:
            raise KLError(f"{config_path}: {specials:,} of the ids below {end:,} are not BPE ranks and would "
                          f"all be special tokens, over the {MAX_SPECIAL_TOKENS:,} klconvert takes (the released "
                          f"model has 256); fix the file or {redownload_advice(config_path)}")
        for token_id in range(end):
            if token_id not in taken_ids:
                placeholder = f"<|reserved_token_{token_id}|>"
                if placeholder in special_tokens:   # the id would have no name, and decoding it would fail mid-run
                    raise KLError(f"{config_path}: special token {placeholder!r} has id {special_tokens[placeholder]}, "
                                  f"but it is the placeholder name of the unnamed id {token_id}; fix the file or "
                                  f"{redownload_advice(config_path)}")
                special_tokens[placeholder] = token_id
        own_tokens = [key for key, value in config.items()
                      if key.endswith("_token") and key not in SPECIAL_TOKEN_KEYS and isinstance(value, str)]
        named = {key: named_special_token(config, key, special_tokens, config_path)
                 for key in (*SPECIAL_TOKEN_KEYS, *own_tokens)}
        # eos ends a generated turn (stop_ids); bos klconvert only hands the chat template, and transformers loads a
        # config that names none
        if named["eos_token"] is None:
            raise KLError(f"{config_path}: 'eos_token' is not set; fix the file or {redownload_advice(config_path)}")
        check_extra_special_tokens(config, config_path, special_tokens)
        chat_template_path = folder / CHAT_TEMPLATE_FILE
        if os.path.lexists(chat_template_path):   # a folder, FIFO or dangling link there is refused, not passed over
            refuse_link_out(chat_template_path)
            try:
                chat_template = read_bounded(chat_template_path, MAX_CHAT_TEMPLATE_BYTES,
                                             CHAT_TEMPLATE_FILE).decode("utf-8")
            except UnicodeDecodeError as e:
                raise KLError(f"{not_utf8(chat_template_path, e.start)}; convert it to UTF-8, or "
                              f"{redownload_advice(chat_template_path)}") from None
            except OSError as e:
                refuse_if_not_permitted(e, chat_template_path)
                raise KLError(f"{chat_template_path}: cannot read the chat template ({unreadable_reason(e)}); "
                              "fix the file or re-download the model") from None
        else:
            chat_template, chat_template_path = config.get("chat_template"), config_path
            if isinstance(chat_template, str):   # held to its bound now, as chat_template.jinja is as it is read; any
                chat_template_text(chat_template, config_path)   # other form only once a chat needs it
        return cls(folder.name or "kimi", ranks, special_tokens, named["bos_token"], named["eos_token"],
                   named["pad_token"], chat_template, chat_template_path)

    def check_chat_template_loads(self) -> None:
        """KLError where the chat template is in a form transformers fails to load the folder with (a list entry that
        is no named template); its other faults only a chat meets (encode_chat)."""
        named_chat_templates(self._chat_template, self._chat_template_path)

    # ---- ids --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Largest id (BPE rank or special) + 1."""
        return self._encoding.n_vocab

    @property
    def bpe_ranks(self) -> Mapping[bytes, int]:
        """{token bytes: rank} as tiktoken.model lists them, read-only."""
        return self._ranks

    @property
    def bpe_digest(self) -> str:
        """sha256 of the BPE ranks as tiktoken.model lists them, one '<base64 token> <rank>' line each in rank order:
        equal for two folders whose files rank the same tokens alike."""
        ranks = sorted(self._ranks.items(), key=operator.itemgetter(1))
        return hashlib.sha256(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks)).hexdigest()

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """{content: id} of every added token plus "<|reserved_token_{id}|>" for unnamed ids, read-only."""
        return self._special_tokens

    @property
    def bos_id(self) -> int | None:
        return None if self._bos_token is None else self._special_tokens[self._bos_token]

    @property
    def eos_id(self) -> int:
        return self._special_tokens[self._eos_token]

    @property
    def pad_id(self) -> int | None:
        return None if self._pad_token is None else self._special_tokens[self._pad_token]

    @property
    def special_ids(self) -> frozenset[int]:
        """Every special id (named or reserved): what `run` leaves out of its text unless --show-special."""
        return self._special_ids

    @property
    def stop_ids(self) -> frozenset[int]:
        """The tokenizer's ids that end a generated turn: the eos token and <|im_end|> (the model's stop tokens add
        config.json's eos_token_id: model_stop_ids)."""
        stop_ids = {self.eos_id}
        if "<|im_end|>" in self._special_tokens:
            stop_ids.add(self._special_tokens["<|im_end|>"])
        return frozenset(stop_ids)

    # ---- text -> ids ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token text in it ("<|im_end|>") is encoded as ordinary text. KLError for what is
        no str (None, bytes, 5 were TypeErrors from inside tiktoken)."""
        if not isinstance(text, str):
            fix = ("decode the bytes first, e.g. text.decode('utf-8')" if isinstance(text, (bytes, bytearray))
                   else "give the text to encode as a str")
            raise KLError(f"encode: text should be a str, got {type(text).__name__}; {fix}")
        return [token_id for piece in pieces_for_tiktoken(text)
                for token_id in self._encoding.encode_ordinary(piece)]

    def encode_chat(self, messages: list[dict], max_tokens: int | None = None) -> list[int]:
        """Chat turns ([{"role": ..., "content": ...}]) through the folder's chat template, ready to generate.

        Special tokens count only where the template wrote their text's first and last characters (see ESCAPE): their
        text inside a message, or reaching into one from beside it, stays plain text.
        `max_tokens`: the most ids the caller can take (`run`: what the context leaves the prompt); a render longer
        than that many ids can stand for is stopped as it passes it, unencoded: a ChatPastTokens.
        """
        _check_messages(messages)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)
                                       or max_tokens < 1):
            raise KLError(f"encode_chat: max_tokens {shown(max_tokens)} should be a whole number of at least 1, or "
                          "None for no bound")
        if self._chat_template is None:
            raise KLError(f"{self._chat_template_path}: no chat_template (nor {CHAT_TEMPLATE_FILE}) in this "
                          "folder; send the prompt as plain text or use a checkpoint that ships a chat template")
        template = chat_template_text(self._chat_template, self._chat_template_path)
        clash = next((text for text in self._special_tokens if _holds_a_code(text)), None)
        if clash is not None:   # it would match inside a message's codes, turning the user's text into its id
            raise KLError(f"encode_chat: the special token {shown(clash)} holds a character of U+{ESCAPE:X}.."
                          f"U+{ESCAPE_END - 1:X}, which klconvert escapes chat text with, so a chat cannot be encoded "
                          "with this tokenizer; send the prompt as plain text (without --chat)")
        try:
            escaped = self._escape(messages, "messages")
        except RecursionError:
            raise KLError("encode_chat: messages are nested too deeply (or a list or dict holds itself); give "
                          "[{'role': ..., 'content': ...}] dicts of strings") from None
        per_id = self._rendered_chars_per_id
        # as transformers hands them: a token the config names none of is no variable (undefined: it prints nothing)
        tokens = {key: token for key, token in (("bos_token", self._bos_token), ("eos_token", self._eos_token))
                  if token is not None}
        try:
            rendered = render_chat_template(template, str(self._chat_template_path),
                                            None if max_tokens is None else int(max_tokens) * per_id,
                                            messages=escaped, add_generation_prompt=True, **tokens)
        except RenderPastBound as e:
            raise ChatPastTokens(int(max_tokens), f"{e}, more than {counted(max_tokens, 'token')} can hold at up to "
                                 f"{per_id} characters a token") from None
        ids: list[int] = []
        for index, part in enumerate(self._special_split.split(rendered)):  # [text, special, text, ...]
            if index % 2:
                ids.append(self._special_tokens[part])
            else:
                ids.extend(self.encode(self._unescape(part)))
        if not ids:
            raise KLError(f"{self._chat_template_path}: the chat template renders the conversation as no text; fix "
                          "the template, or send the prompt without --chat")
        return ids

    def _escape(self, value, where: str):
        """`value` (message dicts, lists, strings: JSON values, the template's input) with each string escaped, dict
        keys too (_escape_text); KLError naming `where` in it for what is no JSON value (json.dumps raised
        TypeError)."""
        if isinstance(value, str):
            return self._escape_text(value)
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise KLError(f"encode_chat: {where} has the key {shown(key)}, which is no string; JSON keys are "
                                  "strings")
            return {self._escape_text(key): self._escape(item, f"{where}[{key!r}]") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if value is None or isinstance(value, (int, float)):   # bools too; numpy's float64 is a float
            return value
        raise KLError(f"encode_chat: {where} holds {shown(value)} ({type(value).__name__}), which is no JSON value; "
                      "give strings, numbers, lists and dicts")

    def _escape_text(self, text: str) -> str:
        """`text` with its code (see ESCAPE) for each character where a special token's text begins inside it, each
        ESCAPE, and each non-word character at its edges where a token's text could run past its end or from before
        its start."""
        escaped = set()
        match = self._escape_pattern.search(text)
        while match:   # each start, overlapping ones too: a special starting inside another's text stays whole
            escaped.add(match.start())
            match = self._escape_pattern.search(text, match.start() + 1)
        for start in range(max(0, len(text) - self._longest_special + 1), len(text)):
            if text[start] in self._edge_first_chars and _begins_one(self._specials_sorted, text[start:]):
                escaped.add(start)
        for last in range(min(len(text), self._longest_special - 1)):   # text[:last + 1] ends one: reversed, begins
            if text[last] in self._edge_last_chars and _begins_one(self._specials_reversed_sorted, text[last::-1]):
                escaped.add(last)
        pieces, done = [], 0
        for at in sorted(escaped):
            pieces += (text[done:at], self._escape_codes[text[at]])
            done = at + 1
        return "".join(pieces) + text[done:]

    def _unescape(self, text: str) -> str:
        return self._unescape_pattern.sub(lambda m: self._escaped_chars[ord(m[1]) - ESCAPE - 1], text)

    # ---- ids -> text ------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's bytes are its UTF-8 text)."""
        return self._encoding.decode_single_token_bytes(self._known_id(token_id))

    def decode(self, ids: Iterable[int]) -> str:
        """One sequence of ids (a flat list, or a [T] tensor or array) to text; bytes that are not valid UTF-8 become
        U+FFFD."""
        return self._encoding.decode(self._known(ids), errors="replace")

    def _known(self, ids: Iterable[int]) -> list[int]:
        """ids as a list of ints, each one the vocabulary has (_known_id); a list or [n] tensor inside is a batch's
        row, refused as that (it was called an id outside the vocabulary)."""
        known, n = [], self.vocab_size
        for at, i in enumerate(ids):
            if type(i) is int and 0 <= i < n:   # the common case, at once
                known.append(i)
            elif isinstance(i, (list, tuple)) or getattr(i, "ndim", 0):
                raise KLError(f"decode takes one sequence of token ids (a flat list), got a sequence at [{at}]; decode "
                              "each row of generate's [batch, n] output, e.g. decode(generate(...)[0])")
            else:
                known.append(self._known_id(i, f" at [{at}]"))
        return known

    def _known_id(self, token_id, where: str = "") -> int:
        """One id -- an int, numpy's or a 0-d tensor's integer -- as an int the vocabulary has, else a KLError naming
        it as given (`where`: its index): tiktoken raised KeyError, or an OverflowError naming no id for a negative
        one; a bool was read as id 0 or 1, a torch uint64 past int64 a RuntimeError, and a float (1.5) was called an
        id outside the vocabulary."""
        value = token_id.item() if getattr(token_id, "ndim", None) == 0 else token_id   # exact, uint64 too
        if isinstance(value, bool):
            raise KLError(f"token ids should be whole numbers, got a bool{where}; give ints (a bool would decode as "
                          "id 0 or 1)")
        try:
            index = operator.index(value)
        except TypeError:
            index = None
        if index is None:
            raise KLError(f"token ids should be whole numbers, got {shown(value)} ({type(value).__name__}){where}; "
                          "give ints")
        if not 0 <= index < self.vocab_size:
            raise KLError(f"token id {shown(index)} is outside the vocabulary (0..{self.vocab_size - 1})")
        return index


def _check_messages(messages) -> None:
    """KLError unless `messages` is a list (or tuple) of dicts, each with a string 'role' and a string 'content' (or
    a list of text parts, {"type": "text", "text": str}, which chat templates take too; None or none beside
    'tool_calls'): a str rendered each character as a message, a missing or None content an empty turn, and a part
    that is not text (an image) nothing the model could see."""
    if not isinstance(messages, (list, tuple)):
        example = f" give [{{'role': 'user', 'content': {messages[:40]!r}}}]" if isinstance(messages, str) else ""
        raise KLError(f"encode_chat: messages should be a list of {{'role': ..., 'content': ...}} dicts, got a "
                      f"{type(messages).__name__};{example or ' make it a list'}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise KLError(f"encode_chat: messages[{i}] should be a dict with string 'role' and 'content', got a "
                          f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise KLError(f"encode_chat: messages[{i}]['role'] should be a string ('system', 'user', 'assistant'), "
                          f"got {shown(role)}")
        if content is None and message.get("tool_calls"):
            continue   # an assistant turn of tool calls alone (OpenAI's form): the template renders the calls
        if not (isinstance(content, str) or (isinstance(content, (list, tuple))
                                             and all(isinstance(part, dict) for part in content))):
            raise KLError(f"encode_chat: messages[{i}]['content'] should be a string (or a list of content-part "
                          f"dicts), got {shown(content)}")
        for j, part in enumerate(content if isinstance(content, (list, tuple)) else ()):
            if part.get("type") != "text":
                raise KLError(f"encode_chat: messages[{i}]['content'][{j}] is a part of type "
                              f"{shown(part.get('type'))}; "
                              "Kimi Linear reads text only -- send the text as {'type': 'text', 'text': ...} parts, "
                              "or as one string")
            if not isinstance(part.get("text"), str):
                raise KLError(f"encode_chat: messages[{i}]['content'][{j}]['text'] should be a string, got "
                              f"{shown(part.get('text'))}")


def check_tokenizer_if_any(folder: Path, config: KimiLinearConfig) -> Tokenizer | None:
    """A source folder's tokenizer read as `run` reads it, config.json's token ids held to it (check_config_token_ids)
    -- refused now, not in an output that copies it -- when it has one: a folder of weights alone (neither
    tiktoken.model nor tokenizer_config.json) passes, as its output will, and has None."""
    if (folder / BPE_FILE).exists() or (folder / TOKENIZER_CONFIG_FILE).exists():
        tokenizer = Tokenizer.from_folder(folder, config.vocab_size)
        check_config_token_ids(config, tokenizer, folder)
        return tokenizer
    return None


def check_config_token_ids(config: KimiLinearConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """KLError where one of config.json's eos_token_id (each, where a list) is an ordinary text token of
    tiktoken.model rather than a special token of tokenizer_config.json: generation stops at config.json's eos ids
    (model_stop_ids), so such an id stopped it wherever that text came. A special other than the tokenizer's own is
    no contradiction: the release's eos_token_id is <|im_end|>, its tokenizer's eos_token [EOS] (both stop).
    bos_token_id and pad_token_id are not held: klconvert reads neither, and a fine-tune's generic pad id is no harm."""
    for token_id in config.eos_token_ids:
        if token_id is None or token_id in tokenizer.special_ids:
            continue
        raise KLError(f"{folder / MODEL_CONFIG_FILE}: eos_token_id {token_id} is the text token "
                      f"{shown(tokenizer.token_bytes(token_id))} of {BPE_FILE}, not a special token of "
                      f"{TOKENIZER_CONFIG_FILE} "
                      f"(its eos_token has id {tokenizer.eos_id}); generation would stop wherever that text came -- "
                      f"set eos_token_id to a special token's id, or {redownload_advice(folder / MODEL_CONFIG_FILE)}")


def model_stop_ids(config: KimiLinearConfig, tokenizer: Tokenizer | None) -> frozenset[int]:
    """The model's stop tokens, the ids that end a generated turn -- where `klconvert run` stops, and Engine.generate
    and OnnxEngine.generate without stop_ids: config.json's eos_token_id (one id or a list) and the tokenizer's
    (its eos_token and <|im_end|>), where the folder has a tokenizer."""
    return frozenset(config.eos_token_ids) | (tokenizer.stop_ids if tokenizer is not None else frozenset())


class StreamDecoder:
    """Generated ids to text one id at a time, holding back a UTF-8 character split across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this id ("" while a character is still incomplete)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end of generation, an incomplete character as U+FFFD."""
        return self._utf8.decode(b"", final=True)
