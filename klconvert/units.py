"""How sizes and counts are written for people, in every line and card that states one."""
from __future__ import annotations


def size_text(n: int) -> str:
    """Bytes in decimal units: 98.40 GB, 9.21 MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def count_text(n: int) -> str:
    """A parameter count at three significant figures or more: 48.31 B, 11.76 M, 8,192."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"
