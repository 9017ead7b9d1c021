"""klconvert: pull, quantize and run Moonshot AI's Kimi Linear on one GPU."""
from klconvert.errors import KLError
from klconvert.runtime.engine import Engine, load

__all__ = ["Engine", "KLError", "load"]
