"""Tests of klconvert.tokenizer on synthetic tokenizer folders written by klconvert.synth.tokenizer_files."""
import base64
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from klconvert.errors import KLError
from klconvert.models import BUNDLED_DIR
from klconvert import tokenizer_json as tokenizer_json_module
from klconvert.synth.tokenizer_files import (KIMI_CHAT_TEMPLATE, bpe_tokens, write_tiktoken_files,
                                             write_tokenizer_files)
from klconvert.tokenizer import (ESCAPE, ESCAPE_END, KIMI_PRETOKENIZE_PATTERN, ChatPastTokens, StreamDecoder,
                                 Tokenizer, pieces_for_tiktoken, read_bpe_ranks)
from klconvert.tokenizer_json import tokenizer_json

SMALL_RANKS = 1000
REAL_RANKS = 163584  # the released vocabulary: 163584 BPE ranks + 256 specials = 163840

TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog. It's 2024!",
    "你好，世界！这是一个模型。",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "Mixed: CamelCase HTTPServer 日本語テキスト 12345\n\n\tindented\r\n  trailing  ",
    "",
]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    write_tokenizer_files(folder, SMALL_RANKS)
    return folder


@pytest.fixture(scope="module")
def small(small_folder) -> Tokenizer:
    return Tokenizer.from_folder(small_folder)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    started = time.perf_counter()
    write_tokenizer_files(folder, REAL_RANKS)
    assert time.perf_counter() - started < 10
    return folder


@pytest.fixture
def broken_folder(small_folder, tmp_path) -> Path:
    """A copy of the small folder for a test to damage."""
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((small_folder / name).read_bytes())
    return tmp_path


def edit_config(folder: Path, edit) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---- the pre-tokenizer -------------------------------------------------------------------------------------
def tiktoken_pieces(text: str) -> list[str]:
    """How tiktoken splits `text` with the Kimi pattern: with every substring in the vocabulary, each piece
    becomes one token."""
    data = text.encode()
    substrings = {data[i:j] for i in range(len(data)) for j in range(i + 1, len(data) + 1)}
    substrings |= {bytes([b]) for b in range(256)}
    ranks = {token: rank for rank, token in enumerate(sorted(substrings, key=lambda t: (len(t), t)))}
    encoding = tiktoken.Encoding("pieces", pat_str=KIMI_PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return [encoding.decode_single_token_bytes(t).decode() for t in encoding.encode_ordinary(text)]


@pytest.mark.parametrize("text, pieces", [
    ("Hello world, it's John's HTTPServer!", ["Hello", " world", ",", " it's", " John's", " HTTPServer", "!"]),
    ("I'M DON'T", ["I'M", " DON'T"]),
    ("你好世界，我是Kimi模型。", ["你好世界", "，", "我是", "Kimi", "模型", "。"]),
    ("12345678 3.14", ["123", "456", "78", " ", "3", ".", "14"]),
    ("a  b\n\n  c", ["a", " ", " b", "\n\n", " ", " c"]),
    ("日本語のテキスト", ["日本語", "のテキスト"]),
])
def test_pattern_splits_text_like_the_released_tokenizer(text, pieces):
    assert tiktoken_pieces(text) == pieces


def released_split(s: str, max_run: int):
    """The released tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, as a reference."""
    run_length, run_is_space, start = 0, s[0].isspace() if s else False, 0
    for i, char in enumerate(s):
        if run_is_space ^ char.isspace():
            run_length, run_is_space = 1, char.isspace()
        else:
            run_length += 1
            if run_length > max_run:
                yield s[start:i]
                start, run_length = i, 1
    yield s[start:]


@pytest.mark.parametrize("text", ["", "ab", "a" * 12, "  " * 7 + "xyz" * 5 + " " * 4, "ab cd" * 9 + "q" * 23])
def test_long_runs_are_cut_where_the_released_tokenizer_cuts_them(text):
    max_chars, max_run = 20, 4
    expected = [piece for start in range(0, len(text), max_chars)
                for piece in released_split(text[start:start + max_chars], max_run)]
    assert list(pieces_for_tiktoken(text, max_chars, max_run)) == expected


def released_pieces(text: str) -> list[str]:
    """tokenization_kimi.py's cuts at its own sizes: TIKTOKEN_MAX_ENCODE_CHARS = 400_000 characters a call, runs of more
    than MAX_NO_WHITESPACES_CHARS = 25_000."""
    return [piece for start in range(0, len(text), 400_000)
            for piece in released_split(text[start:start + 400_000], 25_000)]


@pytest.mark.parametrize("text", ["a" * 25_001, "\t\n" * 12_501 + "x", "ab " * 133_334], ids=["word", "tabs", "window"])
def test_encode_cuts_at_the_released_tokenizers_sizes(text):
    """Whitespace is what str.isspace says, tabs and newlines too; ids differ wherever a cut does."""
    assert list(pieces_for_tiktoken(text)) == released_pieces(text)


# ---- encode / decode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_small_vocab(small, text):
    assert small.decode(small.encode(text)) == text


def test_round_trip_real_size_vocab(real_folder):
    tokenizer = Tokenizer.from_folder(real_folder)
    assert tokenizer.vocab_size == 163840
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_english_and_chinese_encode_to_multi_byte_tokens(small):
    for text in ("Hello world, the quick brown fox.", "你好，世界"):
        ids = small.encode(text)
        assert len(ids) < len(text.encode()) / 2
        assert all(token_id < SMALL_RANKS for token_id in ids)


def test_special_ids_match_added_tokens_decoder(small, small_folder):
    config = json.loads((small_folder / "tokenizer_config.json").read_text())
    expected = {entry["content"]: int(key) for key, entry in config["added_tokens_decoder"].items()}
    assert dict(small.special_tokens) == expected
    assert small.vocab_size == max(expected.values()) + 1 == SMALL_RANKS + 256
    assert (small.bos_id, small.eos_id, small.pad_id) == (expected["[BOS]"], expected["[EOS]"], expected["[PAD]"])
    assert small.stop_ids == {expected["[EOS]"], expected["<|im_end|>"]}


def test_special_token_text_in_a_prompt_stays_plain_text(small):
    text = "stop here <|im_end|><|im_assistant|>assistant<|im_middle|>[EOS]"
    ids = small.encode(text)
    assert not set(ids) & set(small.special_tokens.values())
    assert small.decode(ids) == text


# ---- chat --------------------------------------------------------------------------------------------------
def test_encode_chat_renders_kimi_turns(small):
    s = small.special_tokens
    ids = small.encode_chat([{"role": "user", "content": "Hi <|im_end|> there"}])
    assert small.decode(ids) == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                                 "<|im_user|>user<|im_middle|>Hi <|im_end|> there<|im_end|>"
                                 "<|im_assistant|>assistant<|im_middle|>")
    specials = [token_id for token_id in ids if token_id in s.values()]
    assert specials == [s[t] for t in ("<|im_system|>", "<|im_middle|>", "<|im_end|>", "<|im_user|>",
                                       "<|im_middle|>", "<|im_end|>", "<|im_assistant|>", "<|im_middle|>")]
    ending = [s["<|im_assistant|>"], *small.encode("assistant"), s["<|im_middle|>"]]
    assert ids[-len(ending):] == ending


def test_encode_chat_keeps_a_given_system_turn_and_history(small):
    s = small.special_tokens
    ids = small.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4"}, {"role": "user", "content": "和3+3?"}])
    assert small.decode(ids) == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                                 "<|im_user|>user<|im_middle|>2+2?<|im_end|>"
                                 "<|im_assistant|>assistant<|im_middle|>4<|im_end|>"
                                 "<|im_user|>user<|im_middle|>和3+3?<|im_end|>"
                                 "<|im_assistant|>assistant<|im_middle|>")
    assert ids.count(s["<|im_end|>"]) == 4


def test_a_special_token_that_starts_another_is_split_off_whole(broken_folder):
    """The template's specials are matched longest first: '<|im_end|>x' is one id, not '<|im_end|>' and text 'x' --
    in the message the same text stays plain text."""
    longer = SMALL_RANKS + 20
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(longer)].update(content="<|im_end|>x"))
    (broken_folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|im_end|>x")
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "<|im_end|>x"}])
    assert ids == tokenizer.encode("<|im_end|>x") + [longer]


@pytest.mark.parametrize("template, written", [
    ("{{ messages[0]['content'] }}", lambda messages: messages[0]["content"]),
    ("{{ messages }}", str),                                                          # Python's repr of a list
    ("{{ messages | tojson }}", lambda messages: json.dumps(messages, ensure_ascii=False)),
], ids=["text", "repr", "json"])
@pytest.mark.parametrize("content", [
    f"{chr(ESCAPE)}{chr(ESCAPE + 1)} and {chr(ESCAPE)}",   # the codes themselves
    "\U000f0000\U000f0001 and \U000f0000",                      # plane 15's, the codes before h225
    r"path C:\U000f0000\U000f0007 x",                              # their backslash spellings (h221's F5)
    r"\U000f0000\U000f0001 <|im_end|> \U000f0000\U000f0101 \U00020000\U00020001",
], ids=["codes", "private-use", "backslash", "mixed"])
def test_a_message_holding_the_escape_codes_comes_back_as_it_was(broken_folder, template, written, content):
    """The codes are escaped too, and the message comes back as the template writes it, plain text: a message holding
    the code of the first special escaped came back as that special's text, and one holding the backslash text a
    printed list's repr wrote the old codes as came back rewritten -- r"C:\U000f0000\U000f0007" as
    "C:<|reserved_token_4112|>", with a template that prints no list."""
    (broken_folder / "chat_template.jinja").write_text(template)
    tokenizer = Tokenizer.from_folder(broken_folder)
    messages = [{"role": "user", "content": content}]
    ids = tokenizer.encode_chat(messages)
    assert tokenizer.decode(ids) == written(messages) and ids == tokenizer.encode(written(messages))


def test_the_template_is_given_the_bos_token(broken_folder):
    (broken_folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == [tokenizer.bos_id, *tokenizer.encode("hi")]


@pytest.mark.parametrize("drop", [lambda c: c.pop("bos_token"), lambda c: c.update(bos_token=None)],
                         ids=["absent", "null"])
def test_a_config_naming_no_bos_token_is_read_and_its_template_given_none(broken_folder, drop):
    """klconvert hands bos only to the chat template, and transformers loads such a config, rendering a chat with
    bos_token undefined (printed as nothing): the folder was refused whole, "'bos_token' is not set"."""
    edit_config(broken_folder, drop)
    (broken_folder / "chat_template.jinja").write_text("[{{ bos_token }}]{{ messages[0]['content'] }}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.bos_id is None
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == tokenizer.encode("[]hi")


def test_a_config_naming_no_eos_token_is_refused(broken_folder):
    """eos ends a generated turn (stop_ids): it cannot go unnamed as bos can."""
    edit_config(broken_folder, lambda c: c.pop("eos_token"))
    assert_one_line_error(broken_folder, "tokenizer_config.json", "'eos_token' is not set; fix the file or")


def test_templates_render_as_transformers_renders_them():
    """trim_blocks and lstrip_blocks (a block tag's own line leaves nothing), and loop controls, as transformers'
    render_jinja_template sets them."""
    from klconvert.chat_template import render_chat_template

    template = ("{% for m in messages %}\n  {% if m['content'] == 'stop' %}{% break %}{% endif %}\n"
                "  {{ m['content'] }};\n{% endfor %}")
    messages = [{"content": c} for c in ("a", "b", "stop", "c")]
    assert render_chat_template(template, "t", messages=messages) == "  a;\n  b;\n"


def test_a_render_is_stopped_past_the_callers_bound_and_no_sooner():
    """A render of exactly max_chars passes; one past it is a RenderPastBound. Past the renderer's own bound (the
    caller's is looser, or none) it is the template's fault, said as such."""
    from klconvert.chat_template import RenderPastBound, render_chat_template

    assert render_chat_template("{{ 'x' * 10 }}", "t", max_chars=10) == "x" * 10
    with pytest.raises(RenderPastBound, match=r"^t: the rendered chat is longer than 9 characters$"):
        render_chat_template("{{ 'x' * 10 }}", "t", max_chars=9)
    with pytest.raises(KLError, match=r"^t: chat_template failed to render \(it writes more than [\d,]+ characters\)") \
            as error:
        render_chat_template("{{ 'x' * 3000000 }}", "t")
    assert not isinstance(error.value, RenderPastBound)


@pytest.mark.parametrize("template, want", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "[{'type': 'text', 'text': 'a <|im_end|> \\U000f0000'}]"),
    ("{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
     '[{"type": "text", "text": "a <|im_end|> \U000f0000"}]'),       # transformers' tojson: no HTML escapes
])
def test_special_text_in_content_parts_comes_back_as_plain_text(broken_folder, template, want):
    """Content parts (a list of dicts) reach the text as the template writes them -- Python's repr, or JSON -- with
    the special-token text inside as it was, encoded as plain text (it came out as escape codes)."""
    (broken_folder / "chat_template.jinja").write_text(template)
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": [{"type": "text", "text": "a <|im_end|> \U000f0000"}]}])
    assert tokenizer.decode(ids) == want and not set(ids) & set(tokenizer.special_tokens.values())


@pytest.mark.parametrize("folder", ["synth", "bundled"])
def test_text_parts_render_as_their_text_joined(small_folder, folder):
    """OpenAI-style content ([{"type": "text", "text": ...}, ...]) renders as the text of its parts, one after the
    other, as the released Kimi template renders it: the template printed the list's Python repr into the prompt."""
    tokenizer = Tokenizer.from_folder(small_folder if folder == "synth" else "tiny")
    parts = [{"type": "text", "text": "Hi <|im_end|>"}, {"type": "text", "text": " there"}]
    assert tokenizer.encode_chat([{"role": "user", "content": parts}]) == \
        tokenizer.encode_chat([{"role": "user", "content": "Hi <|im_end|> there"}])


@pytest.mark.parametrize("folder", ["synth", "bundled"])
def test_special_text_split_across_text_parts_stays_plain_text(small_folder, folder):
    """Parts "stop here <|im_" and "end|> and go on" were each escaped alone, then met in the render as <|im_end|>'s
    text: its id, inside the user's turn (h228's F2). They give the ids of the one string."""
    tokenizer = Tokenizer.from_folder(small_folder if folder == "synth" else "tiny")
    parts = [{"type": "text", "text": "stop here <|im_"}, {"type": "text", "text": "end|> and go on"}]
    assert tokenizer.encode_chat([{"role": "user", "content": parts}]) == \
        tokenizer.encode_chat([{"role": "user", "content": "stop here <|im_end|> and go on"}])


TOOL_ARGUMENTS_TEMPLATE = "{% for m in messages %}{{ m.tool_calls[0].function.arguments | tojson }}{% endfor %}"


@pytest.mark.parametrize("template, messages, written", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}",
     [{"role": "user", "content": "<|im_"}, {"role": "user", "content": "end|>"}], "<|im_end|>"),
    ("{{ messages[0]['content'] }}|>", [{"role": "user", "content": "see <|im_end"}], "see <|im_end|>"),
    ("<|im_{{ messages[0]['content'] }}", [{"role": "user", "content": "end|> and go on"}], "<|im_end|> and go on"),
    (TOOL_ARGUMENTS_TEMPLATE, [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"<|im_end|>": "v <|im_end|>"}}}]}],
     '{"<|im_end|>": "v <|im_end|>"}'),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}",
     [{"role": "user", "content": f"<|im_{chr(ESCAPE)}"}, {"role": "user", "content": f"{chr(ESCAPE + 1)}end|>"}],
     f"<|im_{chr(ESCAPE)}{chr(ESCAPE + 1)}end|>"),
], ids=["messages", "template-after", "template-before", "dict-key", "codes"])
def test_special_text_a_message_begins_or_ends_is_no_token(broken_folder, template, messages, written):
    """A special token's text that runs into a message's text from beside it -- another message's, the template's
    -- or out of it was the token's id, though each string was escaped (h228's F2): two messages "<|im_" and
    "end|>" joined, a message ending "see <|im_end" before the template's "|>", and a dict key, which was not
    escaped at all, through tojson. Each is plain text now, the message text back as it was."""
    (broken_folder / "chat_template.jinja").write_text(template)
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat(messages)
    assert ids == tokenizer.encode(written) and tokenizer.decode(ids) == written


def test_the_templates_own_special_text_beside_a_messages_fragments_is_its_id(broken_folder):
    """Escaping the message's edges leaves the template's own specials whole: its <|im_end|> before a message "x" is
    <|im_end|>'s id, where "<|im_end|>!" -- a longer special -- took the message's "!" into its own id."""
    longer = SMALL_RANKS + 20
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(longer)].update(content="<|im_end|>!"))
    (broken_folder / "chat_template.jinja").write_text("<|im_user|>{{ messages[0]['content'] }}<|im_end|>")
    tokenizer = Tokenizer.from_folder(broken_folder)
    s = tokenizer.special_tokens
    content = "end|> <|im_end|>! [EOS] <|im"   # a special's end, whole specials, a special's start
    ids = tokenizer.encode_chat([{"role": "user", "content": content}])
    assert ids == [s["<|im_user|>"], *tokenizer.encode(content), s["<|im_end|>"]]
    (broken_folder / "chat_template.jinja").write_text("<|im_end|>{{ messages[0]['content'] }}")
    ids = Tokenizer.from_folder(broken_folder).encode_chat([{"role": "user", "content": "!"}])
    assert ids == [s["<|im_end|>"], *tokenizer.encode("!")]


def test_a_template_sees_strings_it_tests_as_they_are(broken_folder):
    """Only characters where a special's text could begin or end past the string are escaped, not whole strings: the
    role "user" lies inside <|im_user|>'s text, and the released template tells turns apart by `role == 'user'`."""
    (broken_folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] == 'user' }} {{ m['content'] == 'a <b> [c] d|e' }}{% endfor %}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.encode_chat([{"role": "user", "content": "a <b> [c] d|e"}]) == tokenizer.encode("True True")


@pytest.mark.parametrize("special", ["tool_output", "madeupword0000", "user<|im_middle|>"])
def test_a_word_like_special_leaves_the_templates_lookups_and_tests_alone(broken_folder, special):
    """A fine-tune's word-like special token ("tool_output", which "content" ends the start of) had the key "content"
    escaped at its "t", so message['content'] was undefined and the user's text silently left out of the prompt (h260's
    F1); "user<|im_middle|>" had the role "user" escaped, failing role == 'user'. A word's edges stay as they are."""
    extra = SMALL_RANKS + 20
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(extra)].update(content=special))
    (broken_folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] == 'user' }}|{{ m['content'] }}|{{ m['role'] }}{% endfor %}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "hello there"}])
    assert ids == tokenizer.encode("True|hello there|user")


@pytest.mark.parametrize("template", ["{{ messages[0]['content'] }}", "{{ messages }}"], ids=["text", "repr"])
@pytest.mark.parametrize("content", ["[BOS]" * 300, chr(ESCAPE) * 300, "a <|im_end|>" * 200,
                                     "The quick brown fox. " * 100], ids=["special", "escape", "mixed", "words"])
def test_a_render_bounded_by_its_own_ids_count_is_never_stopped(broken_folder, template, content):
    """encode_chat's max_tokens stops a render longer than that many ids can stand for: a render that fits is never
    stopped, however its text comes back (a message's escaped characters are rendered as codes of 2 characters)."""
    (broken_folder / "chat_template.jinja").write_text(template)
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": content}])
    assert tokenizer.encode_chat([{"role": "user", "content": content}], max_tokens=len(ids)) == ids


def test_the_bound_allows_for_special_text_rendered_longer_than_it_comes_back(broken_folder):
    """A message's special-token text is rendered as its code of 2 characters: a one-character special "Q" in a
    vocabulary holding a 16-"Q" token renders 32 characters an id, past any token's length."""
    config = json.loads((broken_folder / "tokenizer_config.json").read_text())
    first = max(map(int, config["added_tokens_decoder"])) + 1   # QQ, QQQQ, 8 Qs, 16 Qs: the merges that make it
    with open(broken_folder / "tiktoken.model", "a") as f:
        f.writelines(f"{base64.b64encode(b'Q' * 2 ** i).decode()} {first + i - 1}\n" for i in (1, 2, 3, 4))
    rank = first + 3
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"].update({str(rank + 1): {"content": "Q"}}))
    (broken_folder / "chat_template.jinja").write_text("{{ messages }}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Q" * 1600}])
    assert ids.count(rank) == 100
    assert tokenizer.encode_chat([{"role": "user", "content": "Q" * 1600}], max_tokens=len(ids)) == ids


def test_a_render_longer_than_max_tokens_can_hold_is_stopped(broken_folder):
    """`{{ 'x' * 100000 }}` made a two-letter prompt 100,000 characters, encoded whole before `run` counted its ids
    against the context; it is stopped as it passes what max_tokens ids can stand for."""
    (broken_folder / "chat_template.jinja").write_text("{{ 'x' * 100000 }}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert len(tokenizer.encode_chat([{"role": "user", "content": "hi"}])) > 64   # no bound: rendered and encoded
    with pytest.raises(ChatPastTokens) as refused:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}], max_tokens=64)
    message = str(refused.value)
    assert refused.value.max_tokens == 64
    assert re.search(r"the rendered chat is longer than [\d,]+ characters, more than 64 tokens can hold at up to "
                     r"\d+ characters a token$", message) and "\n" not in message, message
    # "1 tokens" before (units.counted)
    with pytest.raises(ChatPastTokens, match=r"more than 1 token can hold at up to \d+ characters a token$"):
        tokenizer.encode_chat([{"role": "user", "content": "hi"}], max_tokens=1)
    for wrong in (0, -1, 2.5, True, "64"):
        with pytest.raises(KLError, match=f"encode_chat: max_tokens {re.escape(repr(wrong))} should be a whole "
                                          "number of at least 1"):
            tokenizer.encode_chat([{"role": "user", "content": "hi"}], max_tokens=wrong)


def test_the_bundled_chat_template_is_the_synthetic_ones():
    """One template: the bundled model's tokenizer_config.json carries the one klconvert.synth writes."""
    config = json.loads((BUNDLED_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == KIMI_CHAT_TEMPLATE


@pytest.mark.parametrize("content, needle", [
    ([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
     "messages[0]['content'][1] is a part of type 'image_url'; Kimi Linear reads text only -- send the text as "
     "{'type': 'text', 'text': ...} parts, or as one string"),
    ([{"text": "hi"}], "messages[0]['content'][0] is a part of type None"),
    ([{"type": "text"}], "messages[0]['content'][0]['text'] should be a string, got None"),
    ([{"type": "text", "text": 5}], "messages[0]['content'][0]['text'] should be a string, got 5"),
])
def test_parts_that_are_not_text_are_refused(small, content, needle):
    """An image part rendered as nothing (or its dict's repr): the model cannot see it, and the user would not know."""
    with pytest.raises(KLError) as refused:
        small.encode_chat([{"role": "user", "content": content}])
    assert str(refused.value).startswith(f"encode_chat: {needle}") and "\n" not in str(refused.value), refused.value


@pytest.mark.parametrize("messages, needle", [
    ("hello", "messages should be a list of {'role': ..., 'content': ...} dicts, got a str; give "
              "[{'role': 'user', 'content': 'hello'}]"),
    ((m for m in [{"role": "user", "content": "hi"}]), "messages should be a list of {'role': ..., 'content': ...} "
                                                       "dicts, got a generator"),
    (["hi"], "messages[0] should be a dict with string 'role' and 'content', got a str"),
    ([{"role": 1, "content": "hi"}], "messages[0]['role'] should be a string ('system', 'user', 'assistant'), "
                                     "got 1"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], "messages[1]['content'] should be a string (or a list "
                                                            "of content-part dicts), got None"),
    ([{"role": "user", "content": None}], "messages[0]['content'] should be a string"),
    ([{"role": "user", "content": ["hi"]}], "messages[0]['content'] should be a string"),
    ([{"role": "user", "content": "hi", "meta": {"seen": {1, 2}}}],
     "messages[0]['meta']['seen'] holds {1, 2} (set), which is no JSON value; give strings, numbers, lists and "
     "dicts"),
    ([{"role": "user", "content": "hi", "name": np.int64(3)}], f"messages[0]['name'] holds {np.int64(3)!r} (int64), "
                                                               "which is no JSON value"),
    ([{"role": "user", "content": "hi", 1: "x"}], "messages[0] has the key 1, which is no string; JSON keys are "
                                                  "strings"),
])
def test_encode_chat_refuses_what_is_no_list_of_messages(small, messages, needle):
    """"hello" rendered each character as a message (35 ids of empty turns); an int role or a missing or None
    content was rendered; a generator was a raw TypeError "not JSON serializable"."""
    with pytest.raises(KLError) as refused:
        small.encode_chat(messages)
    assert str(refused.value).startswith(f"encode_chat: {needle}") and "\n" not in str(refused.value), refused.value


def test_encode_chat_takes_a_tuple_of_messages(small):
    message = {"role": "user", "content": "hi", "name": None, "weight": 1.5, "parts": [1, True]}
    assert small.encode_chat((message,)) == small.encode_chat([message])


def test_encode_chat_takes_a_turn_of_tool_calls_without_content(small):
    """OpenAI's assistant turn of tool calls alone has content None; the check of content refused it."""
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for message in ({"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "assistant", "tool_calls": calls}):
        assert small.encode_chat([{"role": "user", "content": "hi"}, message])


def test_encode_chat_refuses_a_message_that_holds_itself(small):
    message = {"role": "user", "content": "hi"}
    message["self"] = message
    with pytest.raises(KLError, match=r"^encode_chat: messages are nested too deeply \(or a list or dict holds "
                                      r"itself\)"):
        small.encode_chat([message])


def test_chat_template_jinja_file_wins_over_the_config(broken_folder):
    (broken_folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_user|>{{ m['content'] }}{% endfor %}{{ eos_token }}")
    tokenizer = Tokenizer.from_folder(broken_folder)
    s = tokenizer.special_tokens
    assert tokenizer.encode_chat([{"role": "user", "content": "x"}]) == [s["<|im_user|>"], *tokenizer.encode("x"),
                                                                          s["[EOS]"]]


@pytest.mark.parametrize("token_id", [-1, "end", 2**64, np.uint64(2**63 + 5),
                                      torch.tensor(2**63 + 5, dtype=torch.uint64)])
def test_ids_outside_the_vocabulary_are_one_line(small, token_id):
    """tiktoken raised KeyError, or for a negative id an OverflowError naming no id; a torch uint64 id past int64 a
    RuntimeError. The id is named as given."""
    end = small.vocab_size
    bad = end if isinstance(token_id, str) else token_id
    named = 2**63 + 5 if hasattr(bad, "dtype") else bad
    for decode in (small.decode, lambda ids: StreamDecoder(small).push(ids[0])):
        with pytest.raises(KLError, match=rf"^token id {re.escape(str(named))} is outside the vocabulary "
                                          rf"\(0\.\.{end - 1}\)"):
            decode([bad])
    assert small.decode(np.array(small.encode("hi"))) == "hi"    # numpy's and torch's integers are ids
    assert small.decode(torch.tensor(small.encode("hi"))) == "hi"


@pytest.mark.parametrize("ids", [[True], np.array([True]), torch.tensor([True]), [5, np.True_]])
def test_bool_ids_are_refused(small, ids):
    """torch.tensor([True]) decoded as id 1 ('\\x01'); a Python True was called outside the vocabulary."""
    with pytest.raises(KLError, match=r"^token ids should be whole numbers, got a bool at \[\d\]; give ints"):
        small.decode(ids)
    with pytest.raises(KLError, match=r"^token ids should be whole numbers, got a bool; give ints"):
        small.token_bytes(ids[-1])


@pytest.mark.parametrize("ids, at, named", [([1.5], 0, "1.5 (float)"), ([5, 1.0], 1, "1.0 (float)"),
                                            (np.array([2.5]), 0, "2.5 (float)"),
                                            (torch.tensor([0.5]), 0, "0.5 (float)"), (["5"], 0, "'5' (str)")])
def test_ids_that_are_no_whole_numbers_are_refused_as_that(small, ids, at, named):
    """[1.5] was called an id outside the vocabulary; numpy's and torch's integers stay ids, a tensor's too."""
    with pytest.raises(KLError, match=rf"^token ids should be whole numbers, got {re.escape(named)} at \[{at}\]; give "
                                      r"ints$"):
        small.decode(ids)
    with pytest.raises(KLError, match=rf"^token ids should be whole numbers, got {re.escape(named)}; give ints$"):
        small.token_bytes(ids[at])
    hi = small.encode("hi")
    for given in (np.array(hi), torch.tensor(hi), torch.tensor(hi, dtype=torch.int32), [np.int16(i) for i in hi],
                  [torch.tensor(i) for i in hi]):
        assert small.decode(given) == "hi"


@pytest.mark.parametrize("text, fix", [(None, "give the text to encode as a str"),
                                       (5, "give the text to encode as a str"),
                                       (b"bytes", "decode the bytes first, e.g. text.decode('utf-8')"),
                                       (bytearray(b"bytes"), "decode the bytes first, e.g. text.decode('utf-8')")])
def test_encode_takes_a_str_only(small, text, fix):
    """None, bytes and 5 were TypeErrors from inside tiktoken."""
    with pytest.raises(KLError, match=rf"^encode: text should be a str, got {type(text).__name__}; {re.escape(fix)}$"):
        small.encode(text)


@pytest.mark.parametrize("ids", [[[352, 1824]], torch.tensor([[352, 1824]]), np.array([[352, 1824]]), [5, (6,)]])
def test_decode_of_a_batch_says_it_takes_one_sequence(small, ids):
    """decode(engine.generate(...)) -- the [1, n] output as it comes -- read "token id [352, 1824] is outside the
    vocabulary"."""
    with pytest.raises(KLError, match=r"^decode takes one sequence of token ids \(a flat list\), got a sequence "
                                      r"at \[\d\]; decode each row of generate's \[batch, n\] output, e\.g\. "
                                      r"decode\(generate\(\.\.\.\)\[0\]\)$"):
        small.decode(ids)


# ---- streaming ---------------------------------------------------------------------------------------------
def test_stream_decoder_holds_back_split_characters(small):
    text = "héllo 😀 你好世界 👍🏽!"
    ids = small.encode(text)
    stream = StreamDecoder(small)
    pieces = [stream.push(token_id) for token_id in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # some character was split across tokens and held back
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_decoder_replaces_invalid_bytes_like_decode(small):
    ids = [0xF0, 0x9F, ord("a"), 0xFF, 0xE4, 0xBD]  # a cut 4-byte start, a stray byte, a cut 3-byte start
    stream = StreamDecoder(small)
    assert "".join(stream.push(token_id) for token_id in ids) + stream.flush() == small.decode(ids)


# ---- tokenizer.json (what transformers and vLLM read) ------------------------------------------------------
def tokenizers_backend(data: bytes):
    return pytest.importorskip("tokenizers").Tokenizer.from_str(data.decode())


def test_tokenizer_json_of_a_real_size_vocabulary_is_fixed_and_encodes_as_klconvert(real_folder):
    """The same bytes every run (8.6 MB); the `tokenizers` library reads it and encodes as klconvert does, TEXTS and
    text made of the vocabulary's own tokens (tests/test_interop_transformers.py: transformers). Not timed here: its
    15 s bound (~2 s quiet) failed on a loaded CI box at 24 s."""
    tokenizer = Tokenizer.from_folder(real_folder)
    data = tokenizer_json(tokenizer, real_folder / "tiktoken.model")
    assert tokenizer_json(tokenizer, real_folder / "tiktoken.model") == data
    backend = tokenizers_backend(data)
    rng = np.random.default_rng(0)
    words = [word for word in (token.decode(errors="replace") for token in tokenizer.bpe_ranks)
             if "\ufffd" not in word and (word.isprintable() or word.isspace())]
    made_of_tokens = "".join(rng.choice(words, 5000))
    for text in [*TEXTS, " I'll don't 日本語のテキスト\r\n", made_of_tokens]:
        ids = tokenizer.encode(text)
        assert backend.encode(text, add_special_tokens=False).ids == ids
        assert backend.decode(ids) == text


def test_a_token_no_merges_reach_is_taken_whole_as_tiktoken_takes_it(tmp_path):
    """ignore_merges: tiktoken gives a piece that is a token its id before merging anything; without the flag
    `tokenizers` would merge pairs, and none makes "xyz"."""
    write_tiktoken_files(tmp_path, [*(bytes([b]) for b in range(256)), b"xyz"])
    tokenizer = Tokenizer.from_folder(tmp_path)
    data = tokenizer_json(tokenizer, tmp_path / "tiktoken.model")
    assert tokenizer.encode("xyz") == [256] and json.loads(data)["model"]["merges"] == []
    assert tokenizers_backend(data).encode("xyz").ids == [256]
    document = json.loads(data)
    document["model"]["ignore_merges"] = False
    assert tokenizers_backend(json.dumps(document).encode()).encode("xyz").ids == list(b"xyz")


def test_one_long_token_is_no_quadratic_search(tmp_path):
    """A split is tried only at lengths some token has: a 4 MB token (under the 32 MB a tiktoken.model may be) was
    4 million slices of up to 4 MB each."""
    write_tiktoken_files(tmp_path, [*(bytes([b]) for b in range(256)), b"ab", b"q" * (4 << 20)])
    tokenizer = Tokenizer.from_folder(tmp_path)
    started = time.perf_counter()
    assert json.loads(tokenizer_json(tokenizer, tmp_path / "tiktoken.model"))["model"]["merges"] == ["a b"]
    assert time.perf_counter() - started < 5


def test_a_vocabulary_of_too_many_merges_is_refused(tmp_path, monkeypatch):
    """Tokens that split every way (a run of one byte) list merges past any BPE vocabulary's: refused by rank as
    they pass MAX_MERGES, before the rest is spelled out."""
    monkeypatch.setattr(tokenizer_json_module, "MAX_MERGES", 100)
    write_tiktoken_files(tmp_path, [*(bytes([b]) for b in range(256)), *(b"a" * n for n in range(2, 40))])
    tokenizer = Tokenizer.from_folder(tmp_path)
    with pytest.raises(KLError, match=rf"^{re.escape(str(tmp_path))}/tiktoken.model: its tokens split into more "
                                      r"than 100 merges \(or 67,108,864 characters of them\) by b'a{15}', rank 269, "
                                      r".*re-download the model$"):
        tokenizer_json(tokenizer, tmp_path / "tiktoken.model")


def test_a_special_spelled_as_a_rank_is_refused_for_the_tokenizer_json(tmp_path):
    """helper-155: `tokenizers` takes an added token whose text is a vocab token as that token, and numbers every
    added token after it from the vocab's size: a tiktoken.model holding b"[EOS]" as a rank gave transformers an eos
    one id off klconvert's, and quantize went on."""
    write_tiktoken_files(tmp_path, [*(bytes([b]) for b in range(256)), b"[EOS]"])
    tokenizer = Tokenizer.from_folder(tmp_path)   # klconvert reads the folder
    with pytest.raises(KLError, match=rf"^{re.escape(str(tmp_path))}/tiktoken.model: holds the special token '\[EOS\]' "
                                      r"\(id 258\) as rank 256 too: a tokenizer.json cannot give transformers and vLLM "
                                      r"the ids klconvert uses; fix the tokenizer files or re-download the model$"):
        tokenizer_json(tokenizer, tmp_path / "tiktoken.model")


def test_a_rank_among_the_specials_is_refused_for_the_tokenizer_json(tmp_path):
    """helper-155: a rank past the first special (its id left out of added_tokens_decoder) is a gap in the vocab's
    ids, which `tokenizers` closes: every special came out one id off klconvert's in transformers."""
    write_tiktoken_files(tmp_path, [bytes([b]) for b in range(256)])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    last = max(int(key) for key, entry in config["added_tokens_decoder"].items()
               if entry["content"].startswith("<|reserved_token_"))
    del config["added_tokens_decoder"][str(last)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with open(tmp_path / "tiktoken.model", "ab") as f:
        f.write(base64.b64encode(b"zz") + b" %d\n" % last)
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.encode("zz") == [last]
    with pytest.raises(KLError, match=rf"^{re.escape(str(tmp_path))}/tiktoken.model: rank {last} follows rank 255 "
                                      r"\(its ranks are no run 0..n-1\): a tokenizer.json cannot give"):
        tokenizer_json(tokenizer, tmp_path / "tiktoken.model")


# ---- the synthetic files -----------------------------------------------------------------------------------
def test_synth_ranks_are_bytes_then_true_merges():
    tokens = bpe_tokens(2000)
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(set(tokens)) == len(tokens) == 2000
    rank = {token: r for r, token in enumerate(tokens)}
    for r, token in enumerate(tokens[256:], start=256):
        assert any(rank.get(token[:i], r) < r and rank.get(token[i:], r) < r for i in range(1, len(token))), token
    assert bpe_tokens(2000) == tokens


def test_synth_file_reads_the_same_with_tiktoken(small_folder, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache would otherwise keep a copy in /tmp
    # older tiktoken (0.7-0.9 at least) reads a local path through blobfile, which klconvert does not install:
    # tiktoken's parse is the reference here, its file reading is not
    monkeypatch.setattr(tiktoken.load, "read_file", lambda blobpath: Path(blobpath).read_bytes())
    path = small_folder / "tiktoken.model"
    assert read_bpe_ranks(path) == load_tiktoken_bpe(str(path))


# ---- user errors -------------------------------------------------------------------------------------------
def assert_one_line_error(folder: Path, file_name: str, words: str) -> None:
    with pytest.raises(KLError) as error:
        Tokenizer.from_folder(folder)
    message = str(error.value)
    assert file_name in message and words in message and "\n" not in message, message


def test_missing_bpe_file(broken_folder):
    (broken_folder / "tiktoken.model").unlink()
    assert_one_line_error(broken_folder, "tiktoken.model", "no tiktoken.model")


def test_a_tokenizer_saved_by_transformers_is_named_as_such(broken_folder):
    """transformers 5 saves tokenizer.json, chat_template.jinja and a slim tokenizer_config.json in place of the
    release's files: the refusal says what it found and which files to copy in, not to re-download."""
    (broken_folder / "tiktoken.model").unlink()
    edit_config(broken_folder, lambda c: (c.pop("added_tokens_decoder"), c.pop("chat_template")))
    (broken_folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    (broken_folder / "chat_template.jinja").write_text("{{ messages }}")
    assert_one_line_error(broken_folder, "tiktoken.model", "no tiktoken.model here, only a tokenizer.json that "
                          "transformers saved, which klconvert does not read; copy the release's tiktoken.model, "
                          f"tokenizer_config.json, special_tokens_map.json into {broken_folder}")


@pytest.mark.parametrize("bad_line, words", [
    (b"not-base64! 7", "line 3 is not"),
    (b"YWJj", "line 3 is not"),
    (b"YWJj seven", "line 3 is not"),
    (base64.b64encode(b"\x00") + b" 999", "repeated token"),
    (base64.b64encode(b"a token of its own") + b" 0", "line 3 holds rank 0, which line 1 already gives another token"),
])
def test_malformed_bpe_line(broken_folder, bad_line, words):
    path = broken_folder / "tiktoken.model"
    lines = path.read_bytes().splitlines()
    lines[2] = bad_line
    path.write_bytes(b"\n".join(lines))
    assert_one_line_error(broken_folder, "tiktoken.model", words)


def test_a_bpe_file_cut_short_at_a_line_end_is_refused(broken_folder):
    """The ranks it lacked below the first special token became reserved placeholders: a prompt read as other
    tokens, and the run went on at exit 0."""
    path = broken_folder / "tiktoken.model"
    path.write_bytes(b"\n".join(path.read_bytes().splitlines()[:300]) + b"\n")
    assert_one_line_error(broken_folder, "tiktoken.model", "no BPE token has id 300, below ")
    assert_one_line_error(broken_folder, "tiktoken.model", "special tokens begin; the file is cut short or damaged")


def test_missing_single_byte(broken_folder):
    path = broken_folder / "tiktoken.model"
    path.write_bytes(b"\n".join(path.read_bytes().splitlines()[1:]))
    assert_one_line_error(broken_folder, "tiktoken.model", "single bytes have no rank")


def test_bad_json(broken_folder):
    (broken_folder / "tokenizer_config.json").write_text('{"added_tokens_decoder": {')
    assert_one_line_error(broken_folder, "tokenizer_config.json", "not valid JSON")


def test_special_id_colliding_with_a_rank(broken_folder):
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"].update({"5": {"content": "<|clash|>"}}))
    assert_one_line_error(broken_folder, "tokenizer_config.json", "'<|clash|>' has id 5")


def test_eos_token_not_among_the_specials(broken_folder):
    edit_config(broken_folder, lambda c: c.update(eos_token="<|nowhere|>"))
    assert_one_line_error(broken_folder, "tokenizer_config.json", "eos_token '<|nowhere|>'")


def test_no_chat_template(broken_folder):
    edit_config(broken_folder, lambda c: c.pop("chat_template"))
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.decode(tokenizer.encode("still encodes")) == "still encodes"
    with pytest.raises(KLError, match=r"tokenizer_config.json: no chat_template"):
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])
def test_chat_template_that_fails_to_render(broken_folder, template, words):
    edit_config(broken_folder, lambda c: c.update(chat_template=template))
    tokenizer = Tokenizer.from_folder(broken_folder)
    with pytest.raises(KLError) as error:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    message = str(error.value)
    assert "tokenizer_config.json" in message and words in message and "\n" not in message, message


def test_ids_missing_from_added_tokens_decoder_still_decode(broken_folder):
    gap = SMALL_RANKS + 20
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"].pop(str(gap)))
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.vocab_size == SMALL_RANKS + 256
    assert tokenizer.decode([gap]) == f"<|reserved_token_{gap}|>"


def test_ids_past_the_last_named_one_decode_up_to_the_vocabulary(broken_folder):
    """The model's vocabulary may run past every id the tokenizer files name: each one it can sample decodes."""
    end = SMALL_RANKS + 256
    kept = SMALL_RANKS + 16
    edit_config(broken_folder, lambda c: (c.pop("pad_token"), c.pop("unk_token"), c.update(added_tokens_decoder={
        k: v for k, v in c["added_tokens_decoder"].items() if int(k) < kept})))
    assert Tokenizer.from_folder(broken_folder).vocab_size == kept                  # no config: what the files name
    tokenizer = Tokenizer.from_folder(broken_folder, vocab_size=end)
    assert tokenizer.vocab_size == end
    assert tokenizer.decode([end - 1]) == f"<|reserved_token_{end - 1}|>"


@pytest.mark.parametrize("vocab_size", [True, 1.5, -1, 0, 2**20 + 1, "4352"])
def test_from_folder_refuses_a_bad_vocab_size(small_folder, vocab_size):
    """True, 1.5 and -1 were blamed on the file ("tiktoken.model ... not this model's -- re-download the model")."""
    with pytest.raises(KLError, match=rf"^vocab_size {re.escape(repr(vocab_size))} should be a whole number from 1 "
                                      r"to 1,048,576 \(the model's vocabulary\), or None to take config\.json's$"):
        Tokenizer.from_folder(small_folder, vocab_size=vocab_size)
    assert Tokenizer.from_folder(small_folder, vocab_size=np.int64(SMALL_RANKS + 256)).vocab_size == SMALL_RANKS + 256


def test_a_special_token_of_a_megabyte_is_refused(broken_folder):
    """tiktoken compiles the special tokens' text into one regex: a 1 MB one fails there, a 5 MB one takes GBs."""
    first = SMALL_RANKS
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(first + 2)].update(content="x" * 1_000_000))
    with pytest.raises(KLError, match=rf"entry {first + 2} is 1,000,000 characters long, over the 256"):
        Tokenizer.from_folder(broken_folder)


def test_a_chat_template_that_renders_nothing_is_named(broken_folder):
    edit_config(broken_folder, lambda c: c.update(chat_template="{% for m in messages %}{% endfor %}"))
    with pytest.raises(KLError, match=r"tokenizer_config\.json: the chat template renders the conversation as no "
                                      r"text; fix the template, or send the prompt without --chat"):
        Tokenizer.from_folder(broken_folder).encode_chat([{"role": "user", "content": "hi"}])


def test_a_chat_template_in_the_config_is_bounded_like_the_file(broken_folder):
    """tokenizer_config.json may be 16 MB; the chat template inside it is held to chat_template.jinja's 1 MB."""
    edit_config(broken_folder, lambda c: c.update(chat_template="x" * (3 << 19)))
    assert_one_line_error(broken_folder, "tokenizer_config.json", "chat_template is 1,572,864 bytes, over the 1 MB")


@pytest.mark.parametrize("templates", [
    [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": KIMI_CHAT_TEMPLATE}],
    [{"name": "default", "template": "{{ 'first' }}"}, {"name": "default", "template": KIMI_CHAT_TEMPLATE}],
    {"default": KIMI_CHAT_TEMPLATE, "tool_use": "{{ 'tools' }}"},
], ids=["list", "named-twice", "map"])
def test_named_chat_templates_render_a_chat_with_the_default(small, broken_folder, templates):
    """transformers' list form of several templates ([{"name", "template"}], a {name: template} map once loaded),
    which it renders a chat with the one named "default" of -- the last so named: the folder was refused whole,
    "chat_template should be one jinja string, got list", a plain prompt and quantize too."""
    edit_config(broken_folder, lambda c: c.update(chat_template=templates))
    messages = [{"role": "user", "content": "hi <|im_end|>"}]
    assert Tokenizer.from_folder(broken_folder).encode_chat(messages) == small.encode_chat(messages)


@pytest.mark.parametrize("template, words", [
    ([{"name": "tool_use", "template": "x"}], "chat_template names its templates ['tool_use'], none of them 'default', "
                                              "the one a chat is rendered with; name the template to use 'default', or "
                                              "send the prompt without --chat"),
    ([], "chat_template names its templates [], none of them 'default'"),
    ({"tool_use": "x"}, "chat_template names its templates ['tool_use'], none of them 'default'"),
    ([{"name": "default"}], "chat_template[0] is {'name': 'default'}, not a named template {\"name\": ..., "
                            "\"template\": ...}; fix the file or re-download the model"),
    (["x"], "chat_template[0] is 'x', not a named template"),
    ([{"name": "default", "template": None}], "the chat_template named 'default' should be one jinja string, got "
                                              "NoneType; fix the file or re-download the model"),
    (5, "chat_template should be one jinja string, got int; fix the file or re-download the model"),
    ([{"name": "default", "template": "x" * (3 << 19)}], "the chat_template named 'default' is 1,572,864 bytes, over "
                                                          "the 1 MB"),
])
def test_a_chat_template_no_chat_can_be_rendered_with_is_refused_only_for_a_chat(broken_folder, template, words):
    """transformers loads such a folder and fails only where a chat asks for its template: the folder still reads
    plain text."""
    edit_config(broken_folder, lambda c: c.update(chat_template=template))
    tokenizer = Tokenizer.from_folder(broken_folder)
    assert tokenizer.decode(tokenizer.encode("still encodes")) == "still encodes"
    with pytest.raises(KLError) as error:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert str(error.value).startswith(f"{broken_folder / 'tokenizer_config.json'}: {words}"), str(error.value)


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word"])
def test_a_special_token_that_strips_or_stands_alone_is_refused(broken_folder, flag):
    """helper-155: transformers applies an added token's lstrip, rstrip and single_word, which klconvert does not: a
    folder of single_word <|im_end|> gave transformers' chat template other ids than encode_chat, and quantize copied
    the config beside a tokenizer.json that said otherwise."""
    def set_flag(config):
        entry = next(e for e in config["added_tokens_decoder"].values() if e["content"] == "<|im_end|>")
        entry[flag] = True

    edit_config(broken_folder, set_flag)
    assert_one_line_error(broken_folder, "tokenizer_config.json", f"sets {flag} true, which klconvert does not apply")


@pytest.mark.parametrize("flag", ["lstrip", "rstrip", "single_word", "normalized", "special"])
@pytest.mark.parametrize("value, said", [(None, "None"), (0, "0"), ("false", "'false'")])
def test_a_special_token_flag_that_is_no_bool_is_refused(broken_folder, flag, value, said):
    """h180's probe: quantize copied "lstrip": null, and transformers then failed to load the output's tokenizer
    ("TypeError: 'None' is not an instance of 'bool'")."""
    first = SMALL_RANKS
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(first + 2)].update({flag: value}))
    assert_one_line_error(broken_folder, "tokenizer_config.json",
                          f"entry {first + 2} sets {flag} to {said}, which is neither true nor false, so transformers "
                          "cannot load")


@pytest.mark.parametrize("field, value, words", [
    ("additional_special_tokens", ["<|im_end|>", 0], "additional_special_tokens[1] is 0, not a special token"),
    ("additional_special_tokens", [None], "additional_special_tokens[0] is None, not a special token"),
    ("additional_special_tokens", [{"content": "<|im_end|>"}], "[0] is {'content': '<|im_end|>'}, not a special"),
    ("additional_special_tokens", "<|im_end|>", "additional_special_tokens is '<|im_end|>', not a list of special"),
    ("additional_special_tokens", [{"__type": "AddedToken", "content": "<|im_end|>", "special": None}],
     "additional_special_tokens[0] sets special to None, which is neither true nor false"),
    ("additional_special_tokens", ["<|nope|>"],
     "additional_special_tokens[0] '<|nope|>' is not in added_tokens_decoder"),
    ("extra_special_tokens", [5], "extra_special_tokens[0] is 5, not a special token"),
    ("extra_special_tokens", {"end_token": 5}, "extra_special_tokens['end_token'] is 5, not a special token"),
])
def test_extra_special_tokens_transformers_cannot_load_are_refused(broken_folder, field, value, words):
    """h180's probe: quantize copied an int among additional_special_tokens, and transformers then failed to load the
    output's tokenizer ("Input must be a List[Union[str, AddedToken]]"); text no special token has it adds as a new
    id, past the model's vocabulary."""
    edit_config(broken_folder, lambda c: c.update({field: value}))
    assert_one_line_error(broken_folder, "tokenizer_config.json", words)


@pytest.mark.parametrize("field, value", [
    ("additional_special_tokens", None), ("additional_special_tokens", []),
    ("additional_special_tokens", [{"__type": "AddedToken", "content": "<|im_end|>", "special": True}]),
    ("extra_special_tokens", {"end_token": "<|im_end|>"}), ("extra_special_tokens", ["<|im_end|>"]),
])
def test_extra_special_tokens_in_each_form_transformers_loads_pass(broken_folder, field, value):
    edit_config(broken_folder, lambda c: c.update({field: value}))
    assert Tokenizer.from_folder(broken_folder).eos_id == SMALL_RANKS + 1


@pytest.mark.parametrize("change", [{"unk_token": None}, {"unk_token": "[EOS]"}, {"mask_token": "<|im_end|>"},
                                    {"think_token": "<|im_end|>"}, {"add_bos_token": False}, {"think_token": 5},
                                    {"unk_token": {"__type": "AddedToken", "content": "[EOS]", "lstrip": True}}])
def test_named_special_tokens_transformers_loads_pass(broken_folder, change):
    """A named token of the vocabulary's specials (its text, or a serialized AddedToken of it, whose flags transformers
    takes from added_tokens_decoder), or none; another "<name>_token" key that holds no text is no token to
    transformers (add_bos_token is a switch)."""
    edit_config(broken_folder, lambda c: (c.pop("unk_token", None), c.update(change)))
    assert Tokenizer.from_folder(broken_folder).eos_id == SMALL_RANKS + 1


@pytest.mark.parametrize("key", [f"0{SMALL_RANKS + 2}", f"00{SMALL_RANKS + 2}", "00"])
def test_special_token_ids_are_canonical_decimals(broken_folder, key):
    """A key with leading zeros ("01002") names the same id as another ("1002"): refused, not collided."""
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"].update({key: {"content": "<|twin|>"}}))
    assert_one_line_error(broken_folder, "tokenizer_config.json", f"entry {key!r} is not an id in plain decimal")


def test_a_special_token_with_an_unpaired_surrogate_is_refused(broken_folder):
    """JSON's "\\ud800" reads as a lone surrogate: tiktoken failed on it with a traceback."""
    first = SMALL_RANKS
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(first + 2)].update(content="\ud800x"))
    assert_one_line_error(broken_folder, "tokenizer_config.json", f"entry {first + 2} holds '\\ud800x', with an "
                                                                   "unpaired surrogate")


def test_a_special_token_named_as_another_ids_placeholder_is_refused(broken_folder):
    """The unnamed id would have had no name: decoding it failed mid-generation with a KeyError."""
    gap, other = SMALL_RANKS + 20, SMALL_RANKS + 30

    def edit(config):
        config["added_tokens_decoder"].pop(str(gap))
        config["added_tokens_decoder"][str(other)]["content"] = f"<|reserved_token_{gap}|>"
    edit_config(broken_folder, edit)
    assert_one_line_error(broken_folder, "tokenizer_config.json", f"'<|reserved_token_{gap}|>' has id {other}, but it "
                                                                   f"is the placeholder name of the unnamed id {gap}")


def test_special_tokens_text_is_bounded_in_all_not_only_each(tmp_path):
    """8,192 specials of 250 characters each, every one within its own bound, took 0.8 GB to build a tokenizer
    from, before the checkpoint was checked; the text of them all is now bounded too."""
    from klconvert.tokenizer import MAX_SPECIAL_TEXT_CHARS, MAX_SPECIAL_TOKEN_CHARS, read_special_tokens

    count = MAX_SPECIAL_TEXT_CHARS // MAX_SPECIAL_TOKEN_CHARS + 1
    config = {"added_tokens_decoder": {str(i): {"content": f"<|{i:06d}|" + "x" * (MAX_SPECIAL_TOKEN_CHARS - 10) + ">"}
                                       for i in range(count)}}
    with pytest.raises(KLError, match=rf"added_tokens_decoder's {count:,} special tokens hold [\d,]+ characters of "
                                      rf"text, over the {MAX_SPECIAL_TEXT_CHARS:,} klconvert takes"):
        read_special_tokens(config, tmp_path / "tokenizer_config.json", 1 << 20)
    del config["added_tokens_decoder"]["0"]
    assert len(read_special_tokens(config, tmp_path / "tokenizer_config.json", 1 << 20)) == count - 1


@pytest.mark.parametrize("key, value, words", [
    ("bos_token", "x" * 5_000_000, "is not in added_tokens_decoder"),
    ("eos_token", {"__type": "AddedToken", "content": "y" * 5_000_000}, "is not in added_tokens_decoder"),
    ("eos_token", {"content": "y" * 5_000_000}, "not a special token"),
    ("eos_token", ["[EOS]"] * 1_000_000, "not a special token")])
def test_a_huge_named_token_is_quoted_short(broken_folder, key, value, words):
    """The refusal quoted the value whole: a line of 5-9 MB."""
    edit_config(broken_folder, lambda c: c.update({key: value}))
    with pytest.raises(KLError, match=rf"{key} .*{words}") as error:
        Tokenizer.from_folder(broken_folder)
    assert len(str(error.value)) < 400, len(str(error.value))


def test_a_rank_of_thousands_of_digits_is_quoted_short(broken_folder):
    path = broken_folder / "tiktoken.model"
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2].split()[0] + b" " + b"9" * 4_299
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(KLError, match=r"line 3 holds rank an integer of 4,299 digits, outside") as error:
        Tokenizer.from_folder(broken_folder)
    assert len(str(error.value)) < 400


@pytest.mark.parametrize("content", [chr(ESCAPE + 1), f"<|{chr(ESCAPE)}|>", chr(ESCAPE_END - 1)])
def test_a_special_token_of_the_codes_klconvert_escapes_with_is_refused_for_a_chat_only(broken_folder, content):
    """encode_chat writes a message's special-token text as codes from U+20000: a special token whose text held such a
    code point matched inside them, and turned a user's plain text into a special id. Such a token holds real Han
    characters, though: the folder was refused whole, for run, eval and quantize too (h228's R1); only a chat is."""
    edit_config(broken_folder, lambda c: c["added_tokens_decoder"][str(SMALL_RANKS + 10)].update(content=content))
    tokenizer = Tokenizer.from_folder(broken_folder)   # a reserved token's text
    assert tokenizer.decode(tokenizer.encode("ROMEO. " + content)) == "ROMEO. " + content
    with pytest.raises(KLError, match=rf"^encode_chat: the special token .* holds a character of U\+{ESCAPE:X}\.\."
                       rf"U\+{ESCAPE_END - 1:X}, "
                       r"which klconvert escapes chat text with, so a chat cannot be encoded with this tokenizer; "
                       r"send the prompt as plain text \(without --chat\)$"):
        tokenizer.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling link"])
def test_a_chat_template_file_that_is_no_file_is_refused_not_passed_over(broken_folder, kind):
    """The config's template was used in its place, silently."""
    path = broken_folder / "chat_template.jinja"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(broken_folder / "gone.jinja")
    assert_one_line_error(broken_folder, "chat_template.jinja", "cannot read the chat template")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_bpe_file_that_is_no_file_says_to_re_download(broken_folder, kind):
    """It said to check the file's permissions."""
    path = broken_folder / "tiktoken.model"
    path.unlink()
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    what = "directory" if kind == "folder" else "FIFO"
    assert_one_line_error(broken_folder, "tiktoken.model", f"(not a regular file (a {what})); re-download the model")
