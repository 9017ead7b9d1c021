"""Writes a synthetic checkpoint's tokenizer files in the released Kimi format (tiktoken.model and the JSON)."""
from __future__ import annotations

import base64
import json
import random
from pathlib import Path

from klconvert.atomic_file import write_atomically
from klconvert.release import (NAMED_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS, PAD_TOKEN, RELEASED_CONFIG, UNK_TOKEN,
                               special_token_names)
from klconvert.tokenizer import BPE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE

# Merged first, one byte at a time, so that English (and some Chinese) encodes to multi-byte tokens even
# in a vocabulary of a few hundred; common pairs come before common words.
COMMON_PIECES = (
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is", "it",
    "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "ve", "co", "me", "de", "hi", "ri",
    " t", " a", " s", " w", " o", " i", " c", " b", " h", " m", " f", " p", " d", " l", " n", " T", " I", " A",
    ", ", ". ", "\n\n", "  ", "00", "ing", "ion", "tion", "ent", "ers", " the", " and", " of", " to", " in",
    " is", " that", " for", " it", " with", " as", " was", " on", " be", " are", " you", " this", " have",
    " not", " but", " from", " or", " by", " at", " we", " can", " an", " will", " all", " one", " there",
    " what", " so", " up", " out", " if", " about", " who", " which", " when", " make", " like", " time",
    " no", " just", " know", " take", " people", " into", " year", " your", " good", " some", " could",
    " them", " see", " other", " than", " then", " now", " look", " only", " come", " its", " over",
    " think", " also", " back", " after", " use", " two", " how", " our", " work", " first", " well",
    " way", " even", " new", " want", " because", " any", " these", " give", " day", " most", " us",
    " hello", " world", " Hello", " The", " It", " This", " quick", " brown", " fox", " assistant",
    " user", " system", "ly", "ed ", "'s", "'t", "Hello", "hello", "The", "This", "It", "What", "\uff0c", "\u3002",
    "\uff01", "\u4f60\u597d", "\u4e16\u754c", "\u7684", "\u662f",
    "\u4e0d", "\u4e86", "\u4eba", "\u6211", "\u5728", "\u6709", "\u4e2d", "\u5927", "\u6765", "\u4e0a",
    "\u56fd", "\u4e2a", "\u8bf4", "\u4eec", "\u4e3a", "\u548c", "\u4e5f", "\u65f6", "\u5b66", "\u6a21\u578b",
)
# The byte that extends a token in the seeded merges, repeated by rough English frequency.
EXTENSION_BYTES = (b"eeeeeeeeeeeettttttttaaaaaaaaooooooooiiiiiiinnnnnnnsssssshhhhhhrrrrrrdddddlllllcccuuummmwwfffgg"
                   b"yyppbbvk            ,.0123456789")
MAX_TOKEN_BYTES = 16  # keeps tiktoken.model for the real 163584 ranks at a few MB
# The seeded merges' seed: fixed, not synth's --seed (which seeds the weights), so that every synth of a vocabulary
# size has the same tokenizer and two seeds' folders compare in `klconvert eval`, whose ids must mean the same text
MERGES_SEED = 0

# The Kimi turn format; a system turn is added when the conversation has none, and a content given as a list of
# parts ([{"type": "text", "text": ...}, ...]) is the text of its parts one after the other, as the released template
# does (klconvert.tokenizer refuses parts that are not text before the template runs).
KIMI_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}<|im_system|>{{ message['role'] }}<|im_middle|>"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] is not none -%}{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def bpe_tokens(num_ranks: int) -> list[bytes]:
    """`num_ranks` distinct tokens by rank: the 256 bytes in byte order, then each one an earlier token plus
    one more earlier token (COMMON_PIECES first, then seeded merges)."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for piece in COMMON_PIECES:
        encoded = piece.encode("utf-8")
        for end in range(2, len(encoded) + 1):  # encoded[:end - 1] is already a token; add one byte
            if len(tokens) < num_ranks and encoded[:end] not in seen:
                tokens.append(encoded[:end])
                seen.add(encoded[:end])
    rng = random.Random(MERGES_SEED)
    while len(tokens) < num_ranks:
        left = tokens[rng.randrange(256, len(tokens))]
        # tokens[b] is the single byte b
        right = tokens[rng.choice(EXTENSION_BYTES)] if rng.random() < 0.9 else tokens[rng.randrange(len(tokens))]
        merged = left + right
        if len(merged) <= MAX_TOKEN_BYTES and merged not in seen:
            tokens.append(merged)
            seen.add(merged)
    return tokens


def tokenizer_config(num_ranks: int, num_specials: int) -> dict:
    """tokenizer_config.json, shaped like the released one."""
    added_tokens_decoder = {
        str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for token_id, content in special_token_names(num_ranks, num_specials).items()
    }
    return {
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": list(NAMED_SPECIAL_TOKENS[2:]),
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},  # never executed here
        "bos_token": "[BOS]",
        "chat_template": KIMI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": RELEASED_CONFIG["model_max_length"],
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": UNK_TOKEN,
    }


def write_tokenizer_files(out_dir: Path, num_ranks: int, num_specials: int = NUM_SPECIAL_TOKENS) -> None:
    """tiktoken.model, tokenizer_config.json and special_tokens_map.json for a vocabulary of
    num_ranks + num_specials ids (RELEASED_BPE_RANKS + NUM_SPECIAL_TOKENS for the real model), with made-up BPE
    tokens (the same ones for a num_ranks every time)."""
    if num_ranks < 256:
        raise ValueError(f"num_ranks={num_ranks}: a byte-level BPE needs at least the 256 single bytes")
    write_tiktoken_files(out_dir, bpe_tokens(num_ranks), num_specials)


def write_tiktoken_files(out_dir: Path, tokens: list[bytes], num_specials: int = NUM_SPECIAL_TOKENS) -> None:
    """The released tokenizer files for BPE `tokens` in rank order (token i has rank i), then `num_specials`
    reserved special ids."""
    if num_specials < len(NAMED_SPECIAL_TOKENS) + 2:
        raise ValueError(f"num_specials={num_specials}: needs room for {len(NAMED_SPECIAL_TOKENS)} named tokens, "
                         f"{UNK_TOKEN} and {PAD_TOKEN}")
    distinct = set(tokens)
    if len(distinct) != len(tokens) or any(bytes([b]) not in distinct for b in range(256)):
        raise ValueError("tokens must be distinct and include the 256 single bytes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks_text = b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens))
    write_atomically(out_dir / BPE_FILE, ranks_text)
    config = tokenizer_config(len(tokens), num_specials)
    write_atomically(out_dir / TOKENIZER_CONFIG_FILE,
                     json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8"))
    special_tokens_map = {key: config[key] for key in
                          ("additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token")}
    write_atomically(out_dir / SPECIAL_TOKENS_FILE,
                     json.dumps(special_tokens_map, indent=2, ensure_ascii=False).encode("utf-8"))
