"""tokenizer.json: a Tokenizer in the format of Hugging Face `tokenizers`, which transformers' AutoTokenizer (and so
vLLM) reads in place of tiktoken.model. Without it transformers converts tiktoken.model itself, splitting text with
its own default (cl100k-like) pattern, not Kimi's: " I'll" became " I" + "'ll", and a run of Han and kana one piece.

The file is TikTokenConverter's (transformers/convert_slow_tokenizer.py) with KIMI_PRETOKENIZE_PATTERN as the split
and the folder's special tokens at their ids, written from the ranks klconvert read -- transformers and tokenizers are
no dependencies of klconvert. It encodes as Tokenizer.encode does but where klconvert, as the released tokenizer,
cuts text before encoding it and `tokenizers` does not: every MAX_ENCODE_CHARS characters, and inside a run of more
than MAX_RUN_CHARS (pieces_for_tiktoken)."""
from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from pathlib import Path

from klconvert.errors import KLError, shown
from klconvert.tokenizer import BPE_FILE, KIMI_PRETOKENIZE_PATTERN, TRANSFORMERS_TOKENIZER_FILE, Tokenizer
from klconvert.verified_files import redownload_advice

# Bounds on the merges written, past which a tiktoken.model is refused (long tokens that split every way would take
# GBs): a BPE vocabulary splits into a few merges a token (the tests' synthetic 163,584 ranks: 202,763), so klconvert's
# largest, 2^20 ids, into some millions of ~15 characters.
MAX_MERGES = 1 << 22
MAX_MERGE_CHARS = 1 << 26


def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode as a list, the character that spells byte b at [b]: printable Latin-1 bytes as
    themselves, the rest as U+0100 onwards in byte order (what `tokenizers`' ByteLevel maps each byte of a piece to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, others = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + others)
            others += 1
    return [chars[b] for b in range(256)]


def bpe_vocab_and_merges(ranks: Mapping[bytes, int], where: Path) -> tuple[dict[str, int], list[str]]:
    """The BPE model's vocab ({token spelled byte-level: rank}, by rank) and merges ("left right": no byte is spelled
    as a space), as TikTokenConverter.extract_vocab_merges_from_model derives them: every split of a token into two
    ranked tokens, ordered by the merged token's rank, then by the left part's and the right part's, so `tokenizers`
    merges first the pair whose merged token ranks lowest, as tiktoken does. KLError naming `where` (tiktoken.model)
    past MAX_MERGES or MAX_MERGE_CHARS."""
    spelling = dict(enumerate(byte_chars()))   # Latin-1 decodes byte b to chr(b), which this maps to b's character

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(spelling)

    lengths = {len(token) for token in ranks}   # a split is tried only where both parts' lengths are some token's:
    by_rank = sorted(ranks.items(), key=operator.itemgetter(1))   # one long token costs no quadratic search
    merges, merge_chars = [], 0
    for token, rank in by_rank:
        size = len(token)
        splits = sorted((ranks[token[:i]], ranks[token[i:]], i) for i in range(1, size)
                        if i in lengths and size - i in lengths and token[:i] in ranks and token[i:] in ranks)
        merges += [f"{spell(token[:i])} {spell(token[i:])}" for _, _, i in splits]
        merge_chars += len(splits) * (size + 1)
        if len(merges) > MAX_MERGES or merge_chars > MAX_MERGE_CHARS:
            raise KLError(f"{where}: its tokens split into more than {MAX_MERGES:,} merges (or {MAX_MERGE_CHARS:,} "
                          f"characters of them) by {shown(token[:40])}, rank {rank}, and the tokenizer.json written "
                          "for transformers lists every split; a BPE vocabulary has a few a token, so this is none -- "
                          f"{redownload_advice(where)}")
    return {spell(token): rank for token, rank in by_rank}, merges


def refuse_ids_tokenizers_renumbers(vocab: Mapping[str, int], special_tokens: Mapping[str, int], where: Path) -> None:
    """KLError naming `where` (tiktoken.model) unless `tokenizers` reads these ids as klconvert does: it numbers the BPE
    vocab 0..n-1 and the added tokens on from n in order, and takes an added token whose text is a vocab token as that
    token -- so a rank among or above the specials, or a special spelled as a rank's token, shifted every special after
    it by one in transformers (its eos another token), while quantize went on. The specials themselves follow the ranks
    without a gap: Tokenizer requires ranks below the first and names each id between with a placeholder."""

    def advice() -> str:   # called on a refusal only: it reads the pull's record
        return ("a tokenizer.json cannot give transformers and vLLM the ids klconvert uses; fix the tokenizer files or "
                f"{redownload_advice(where)}")

    ranks = sorted(vocab.values())
    gap = next((i for i, rank in enumerate(ranks) if rank != i), None)
    if gap is not None:
        raise KLError(f"{where}: rank {ranks[gap]:,} follows rank {gap - 1:,} (its ranks are no run 0..n-1): "
                      f"{advice()}")
    spelled = next((text for text in special_tokens if text in vocab), None)
    if spelled is not None:
        raise KLError(f"{where}: holds the special token {shown(spelled)} (id {special_tokens[spelled]:,}) as rank "
                      f"{vocab[spelled]:,} too: {advice()}")


def tokenizer_json(tokenizer: Tokenizer, bpe_path: Path) -> bytes:
    """tokenizer.json for `tokenizer` (read from `bpe_path`, which a refusal names), the same bytes on every run: the
    byte-level BPE of its ranks, Kimi's split, and every special token (named and placeholder) as an added token at its
    id, special and unnormalized.

    ignore_merges: a piece that is a token whole is that token, as tiktoken takes it, whether or not merges reach it.
    The post-processor adds nothing (no BOS), as Tokenizer.encode adds none."""
    vocab, merges = bpe_vocab_and_merges(tokenizer.bpe_ranks, bpe_path)
    refuse_ids_tokenizers_renumbers(vocab, tokenizer.special_tokens, bpe_path)
    added = [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for text, token_id in sorted(tokenizer.special_tokens.items(), key=operator.itemgetter(1))]
    # the converter's: ByteLevel's pre-tokenizer only spells the bytes (Split has cut the pieces); its post-processor
    # and decoder with tokenizers' defaults, which add and strip no space
    spell_bytes = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    defaults = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": KIMI_PRETOKENIZE_PATTERN}, "behavior": "Isolated", "invert": False},
            spell_bytes]},
        "post_processor": {**defaults, "trim_offsets": False},
        "decoder": defaults,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


def written_tokenizer_json(tokenizer: Tokenizer | None, folder: Path) -> dict[str, bytes]:
    """{tokenizer.json: its bytes} for the tokenizer read from `folder` (check_tokenizer_if_any's; {} where the folder
    has none), which quantize and export-onnx write beside the tiktoken files they copy, in place of any tokenizer.json
    the folder holds: the file transformers (vLLM too) and `tokenizers` read before tiktoken.model. KLError for a chat
    template the copied tokenizer_config.json would keep transformers from loading the output with."""
    if tokenizer is None:
        return {}
    tokenizer.check_chat_template_loads()
    return {TRANSFORMERS_TOKENIZER_FILE: tokenizer_json(tokenizer, folder / BPE_FILE)}
