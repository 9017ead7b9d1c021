"""tools/quality_table.py counts a folder quantized elsewhere the way `klconvert quantize` counts its own: stored
bytes over the source's parameters, so a row of --folder and a row it quantizes compare."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import quality_table  # noqa: E402

from klconvert.models import resolve_model  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402


@pytest.mark.parametrize("bits", [4, 8])
def test_folder_bits_per_weight_equal_what_quantize_reports(tmp_path, bits):
    source = resolve_model("tiny")
    result = quantize(source, tmp_path / "q", bits=bits, device="cpu", progress=False)
    written, _ = quality_table.stored(result.path)
    _, params = quality_table.stored(source)
    assert (written, params) == (result.totals.bytes_out, result.totals.params)
