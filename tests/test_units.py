"""How sizes and counts read in every line and card (klconvert/units.py): each unit from its first whole one."""
from __future__ import annotations

from klconvert.units import binary_size_text, count_text, counted, size_text, size_texts


def test_binary_sizes_switch_unit_at_a_whole_one():
    assert [binary_size_text(n) for n in (2**20 - 1, 2**20, 3 << 19, 2**30 - 2**20, 2**30, 3 << 29, 80 << 30)] == \
        ["1,048,575 B", "1.0 MiB", "1.5 MiB", "1,023.0 MiB", "1.00 GiB", "1.50 GiB", "80.00 GiB"]


def test_decimal_sizes_and_counts_switch_unit_where_they_say():
    assert [size_text(n) for n in (0, 1_000, 10**5 - 1, 10**5, 10**8 - 10**4, 10**8, 98_400_000_000)] == \
        ["0 bytes", "1,000 bytes", "99,999 bytes", "0.10 MB", "99.99 MB", "0.10 GB", "98.40 GB"]
    assert [count_text(n) for n in (999_999, 10**6, 10**9 - 10**4, 10**9, 48_310_000_000)] == \
        ["999,999", "1.00 M", "999.99 M", "1.00 B", "48.31 B"]


def test_sizes_set_side_by_side_never_read_alike():
    """'9.21 MB free but 9.21 MB of shards are left to write' (helper-131): two that round alike go in bytes."""
    assert size_texts(9_210_000, 5_000_000) == ["9.21 MB", "5.00 MB"]
    assert size_texts(9_211_000, 9_213_000) == ["9,211,000 bytes", "9,213,000 bytes"]
    assert size_texts(3 << 20, 2 << 20, text=binary_size_text) == ["3.0 MiB", "2.0 MiB"]   # a plan's figures
    assert size_texts(3 << 20, (3 << 20) - 1, text=binary_size_text) == ["3,145,728 bytes", "3,145,727 bytes"]


def test_a_count_is_singular_at_one():
    """bench said "1 layers" in its lines (h298's F5), run "1 tokens" in its."""
    assert [counted(n, "layer") for n in (1, 2, 27)] == ["1 layer", "2 layers", "27 layers"]
    assert [counted(n, "token") for n in (0, 1, 131072)] == ["0 tokens", "1 token", "131,072 tokens"]


def test_a_size_of_one_byte_is_singular():
    """A size under a tenth of a MB is said in bytes, and a refusal read "cpu has 1 bytes available"."""
    assert [size_text(n) for n in (0, 1, 2, 99_999)] == ["0 bytes", "1 byte", "2 bytes", "99,999 bytes"]
    assert size_texts(1, 1) == ["1 byte", "1 byte"]
