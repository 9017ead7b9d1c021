"""How sizes and counts read in every line and card (klconvert/units.py): each unit from its first whole one."""
from __future__ import annotations

from klconvert.units import binary_size_text, count_text, size_text


def test_binary_sizes_switch_unit_at_a_whole_one():
    assert [binary_size_text(n) for n in (2**20 - 1, 2**20, 3 << 19, 2**30 - 2**20, 2**30, 3 << 29, 80 << 30)] == \
        ["1,048,575 B", "1.0 MiB", "1.5 MiB", "1,023.0 MiB", "1.00 GiB", "1.50 GiB", "80.00 GiB"]


def test_decimal_sizes_and_counts_switch_unit_where_they_say():
    assert [size_text(n) for n in (10**8 - 10**4, 10**8, 98_400_000_000)] == ["99.99 MB", "0.10 GB", "98.40 GB"]
    assert [count_text(n) for n in (999_999, 10**6, 10**9 - 10**4, 10**9, 48_310_000_000)] == \
        ["999,999", "1.00 M", "999.99 M", "1.00 B", "48.31 B"]
