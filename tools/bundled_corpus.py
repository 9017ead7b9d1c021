"""The bundled model's corpus (tools/corpus/shakespeare.txt.xz) and its fixed split into train, validation and test.

The split is by whole works, named here, so it never moves: training sees only `train`; `validation` picks the
checkpoint and draws the held-out loss curve; `test` is for the numbers we publish (perplexity, the quality
table, the recorded test bounds) and is seen by nothing else.
"""
from __future__ import annotations

import lzma
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.txt.xz"
RECORD = "\x1e"  # starts each work: RECORD + name + "\n" + text
VALIDATION_WORKS = ("tempest",)
TEST_WORKS = ("julius_caesar", "twelfth_night")
SEPARATOR = "\n\n\n"  # between works inside one split


def works(path: Path = CORPUS) -> dict[str, str]:
    """{work name: text}, in the order stored."""
    data = lzma.decompress(path.read_bytes()).decode("ascii")
    out = {}
    for record in data.split(RECORD)[1:]:
        name, text = record.split("\n", 1)
        out[name] = text
    return out


def split(path: Path = CORPUS) -> dict[str, str]:
    """{"train", "validation", "test": text}: each split's works joined by SEPARATOR."""
    all_works = works(path)
    missing = [w for w in VALIDATION_WORKS + TEST_WORKS if w not in all_works]
    if missing:
        raise ValueError(f"{path}: works {missing} are not in the corpus")
    held = set(VALIDATION_WORKS) | set(TEST_WORKS)
    return {
        "train": SEPARATOR.join(text for name, text in all_works.items() if name not in held),
        "validation": SEPARATOR.join(all_works[w] for w in VALIDATION_WORKS),
        "test": SEPARATOR.join(all_works[w] for w in TEST_WORKS),
    }
