"""A number the Python API was given -- Python's, numpy's, or a 0-d torch tensor -- read as a Python int or float,
without importing torch (~2 s of CPU): `klconvert quantize` checks its flags with it before it imports torch."""
from __future__ import annotations

import numbers
import sys


def as_number(value, whole: bool = False) -> int | float | None:
    """`value` as a Python int (`whole`) or float, or None when it is not one: Python, numpy and 0-d torch numbers
    are taken alike; bools (which count as 0 or 1), complex numbers, and floats where a whole number is asked (1.5 new
    tokens) are not. (A 0-d CUDA tensor is read once, here, not at every step.) A tensor is looked for only where
    torch is imported already: none can exist before."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        if whole and value.is_floating_point():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
        return None   # numpy's bool_ is no numbers.Number; its integer and float scalars are registered there
    try:
        return int(value) if whole else float(value)
    except OverflowError:   # an int past any float (10**400): no finite number
        return None
