"""Train the bundled model's byte-level BPE on the corpus's train split and write it in the released format.

Hugging Face `tokenizers` learns the merges (a tool dependency, not the package's), splitting text first with
the Kimi pre-tokenizer pattern that klconvert/tokenizer.py carries. The result is written as tiktoken ranks:
the 256 single bytes, then each merge's token in merge order, so tiktoken's lowest-rank-pair-first merging
replays the learned merges; then the 256 reserved special ids, the chat template and tokenizer_config.json of the
release (klconvert/synth/tokenizer_files.py). It checks that klconvert's own tokenizer reproduces `tokenizers`'
encoding on the test split and round-trips it. OUT is written whole, once checked, or not at all
(klconvert.whole_folder); to make it the bundled tokenizer, copy its files into klconvert/bundled and train the
model again on it (tools/train_bundled.py, whose BPE_RANKS must be --vocab).

    python tools/train_tokenizer.py --out OUT [--vocab 4096] [--force]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import run_tool  # noqa: E402

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import bundled_corpus  # noqa: E402

from klconvert.errors import KLError  # noqa: E402
from klconvert.release import NUM_SPECIAL_TOKENS  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.synth.tokenizer_files import write_tiktoken_files  # noqa: E402
from klconvert.tokenizer import KIMI_PRETOKENIZE_PATTERN, TOKENIZER_FILES  # noqa: E402
from klconvert.tokenizer import Tokenizer as KimiTokenizer  # noqa: E402
from klconvert.tokenizer_json import byte_chars  # noqa: E402
from klconvert.units import counted  # noqa: E402
from klconvert.whole_folder import Replaceable, refuse_taken, whole_folder  # noqa: E402


def _is_a_tokenizer_file(entry: Path) -> bool:
    return entry.name in TOKENIZER_FILES and entry.is_file() and not entry.is_symlink()


# What --force replaces: an earlier run's output, never a folder holding anything else (the bundled model's weights)
EARLIER_TOKENIZER = Replaceable("an earlier tokenizer's files", _is_a_tokenizer_file)


def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which `tokenizers`' ByteLevel uses to spell bytes as characters."""
    return {char: b for b, char in enumerate(byte_chars())}


def train_bpe(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes included) learned on `text`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KIMI_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(text.split(bundled_corpus.SEPARATOR), trainer=trainer)  # one work at a time
    return tokenizer


def ranked_tokens(tokenizer: Tokenizer) -> list[bytes]:
    """The 256 single bytes in byte order, then each merge's result in merge order."""
    decode = byte_decoder()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    tokens = [bytes([b]) for b in range(256)]
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        tokens.append(bytes(decode[ch] for ch in left + right))
    return tokens


def check_written(folder: Path, hf: Tokenizer, tokens: list[bytes], test: str) -> str:
    """SystemExit unless klconvert's tokenizer read from `folder` round-trips the test split and encodes it as
    `tokenizers` does (the files say what it learned only then); returns the line that says how they compare."""
    ours = KimiTokenizer.from_folder(folder)
    rank = {t: i for i, t in enumerate(tokens)}
    ids = ours.encode(test)
    # built once: built for each character, it took 11 of a 300-rank run's 14 s of CPU (the test split's 231,097)
    decode = byte_decoder()
    hf_ids = [rank[bytes(decode[c] for c in piece)] for piece in hf.encode(test).tokens]
    same = sum(a == b for a, b in zip(ids, hf_ids)) if len(ids) == len(hf_ids) else 0
    if ours.decode(ids) != test:
        raise SystemExit("round trip failed: decode(encode(test)) != test")
    if ids != hf_ids:
        raise SystemExit(f"the written tiktoken files encode the test split other than tokenizers does ({same:,} "
                         f"of {counted(len(hf_ids), 'token')} equal by position, {counted(len(ids), 'token')})")
    return (f"{len(tokens)} ranks + {NUM_SPECIAL_TOKENS} specials; test split: {len(test):,} chars, "
            f"{counted(len(ids), 'token')} ({len(test) / len(ids):.2f} chars/token), as tokenizers encodes it")


def main() -> None:
    parser = argparse.ArgumentParser(description=script_summary(__file__))
    parser.add_argument("--vocab", type=int, default=4096, help="BPE ranks (the 256 bytes included).")
    parser.add_argument("--out", type=Path, required=True,
                        help="Where tiktoken.model and the token configs go: a new folder, or an empty one (written "
                             "under a hidden name beside it, renamed once checked).")
    parser.add_argument("--force", action="store_true", help="Replace an OUT that holds only tokenizer files.")
    args = parser.parse_args()
    if args.vocab <= 256:
        parser.error(f"--vocab {args.vocab}: the 256 byte tokens come first; give more ranks than that")
    try:
        refuse_taken(args.out, args.force, EARLIER_TOKENIZER)   # before the training, not after it
        splits = bundled_corpus.split()
        hf = train_bpe(splits["train"], args.vocab)
        tokens = ranked_tokens(hf)
        with whole_folder(args.out, args.force, EARLIER_TOKENIZER) as folder:
            write_tiktoken_files(folder, tokens, NUM_SPECIAL_TOKENS)
            summary = check_written(folder, hf, tokens, splits["test"])
    except KLError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"{summary} -> {args.out}")


if __name__ == "__main__":
    run_tool(main)
