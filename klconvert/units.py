"""How sizes and counts are written for people, in every line and card that states one."""
from __future__ import annotations

from collections.abc import Callable


def size_text(n: int) -> str:
    """Bytes in decimal units: 98.40 GB, 9.21 MB; under a tenth of a MB, in bytes (a 1 KB file read "0.00 MB")."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else counted(n, "byte")


def size_texts(*sizes: int, text: Callable[[int], str] = size_text) -> list[str]:
    """`text` (size_text; binary_size_text where a memory plan's figures are said) of each of sizes set side by side,
    or where two would read alike (9.21 MB free but 9.21 MB to write), each in bytes."""
    texts = [text(n) for n in sizes]
    return texts if len(set(texts)) == len(texts) else [counted(n, "byte") for n in sizes]


def binary_size_text(n: int) -> str:
    """Bytes in binary units, as memory plans and GPUs count them: 80.00 GiB, 22.5 MiB, 57,568 B."""
    if n < 2**20:
        return f"{n:,} B"
    if n < 2**30:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**30:,.2f} GiB"


def count_text(n: int) -> str:
    """A parameter count at three significant figures or more: 48.31 B, 11.76 M, 8,192."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def counted(n: int, noun: str) -> str:
    """A count of a thing whose plural takes an s, singular for one: 1 layer, 27 layers, 1 token, 2,048 tokens."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
