"""QuantScheme (how one tensor is stored) and the compressed-tensors quantization_config for config.json."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from klconvert.errors import KLError, either, shown
from klconvert.quant.group_rules import CHANNEL, OBSERVERS, SUPPORTED_BITS, check_group_size, unsupported_observer

PACKED_FORMAT = "pack-quantized"  # compressed-tensors' format of the int weights klconvert writes and reads
COMPRESSED_TENSORS = "compressed-tensors"  # the quant_method of that format's configs
# the quantization_status of a folder whose weights are stored packed: transformers builds the packed layout
# (weight_packed, weight_scale) under this one only (CompressedTensorsConfig.is_quantization_compressed)
COMPRESSED_STATUS = "compressed"
# The compressed-tensors release whose config fields and packing klconvert writes: its `version` field, where
# compressed-tensors' own writer puts its release (tests/test_quantize.py holds the other fields to its output)
COMPRESSED_TENSORS_VERSION = "0.20.1"
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit / transformers' Linear4bit block size
# The one value nf4 (bitsandbytes' format) takes of each of QuantScheme's other fields, and the words for them
NF4_FIXED = {"bits": 4, "group_size": NF4_BLOCKSIZE, "symmetric": True, "observer": "minmax"}
NF4_SAID = f"nf4 is 4-bit, symmetric, in blocks of {NF4_BLOCKSIZE}, min-max"
GROUP_SIZE = 128  # an int scheme's input columns per scale unless told otherwise
KINDS = ("int", "nf4")  # QuantScheme's kinds: --scheme's and a recipe's `type:` choices


@dataclass(frozen=True)
class QuantScheme:
    """A weight format: `int` (compressed-tensors pack-quantized) or `nf4` (bitsandbytes 4-bit).

    group_size CHANNEL (-1) means one group per output row (compressed-tensors strategy "channel"); for nf4 it
    is the bitsandbytes block size, 64.
    """

    bits: int = 4
    group_size: int = GROUP_SIZE
    symmetric: bool = True
    kind: str = "int"
    observer: str = "minmax"  # how an int group's range is chosen: min-max, or shrunk to the least error ("mse")

    def __post_init__(self):
        if self.kind == "nf4":
            wrong = [name for name, fixed in NF4_FIXED.items() if getattr(self, name) != fixed]
            if wrong:
                raise KLError(f"{NF4_SAID}; got {', '.join(f'{n}={shown(getattr(self, n))}' for n in wrong)} -- pass "
                              f"{', '.join(f'{n}={shown(NF4_FIXED[n])}' for n in wrong)}")
        elif self.kind == "int":
            if self.observer not in OBSERVERS:
                raise KLError(unsupported_observer(self.observer))
            if self.bits not in SUPPORTED_BITS:
                raise KLError(f"integer quantization supports {either(SUPPORTED_BITS)} bits, got {shown(self.bits)}")
            check_group_size(self.group_size)
        else:
            raise KLError(f"quantization kind {shown(self.kind)} is unknown; use {either(map(repr, KINDS))}")

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == CHANNEL else "group"

    def describe(self) -> str:
        if self.kind == "nf4":
            return "nf4"
        g = "per-channel" if self.group_size == CHANNEL else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}" + ("" if self.observer == "minmax" else
                                                                              f" {self.observer}")

    def weights_args(self) -> dict:
        """The `weights:` entry of a config group / recipe, as compressed-tensors' QuantizationArgs spells it."""
        return {
            "num_bits": self.bits,
            "type": self.kind,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": None if self.group_size == CHANNEL else self.group_size,
            "dynamic": False,
            "observer": self.observer,
        }


def compressed_tensors_config(groups: Sequence[tuple[str, Sequence[str], QuantScheme]],
                              ignore: Sequence[str]) -> dict:
    """config.json's `quantization_config` for pack-quantized weights: one config group per
    (name, targets, scheme), and the modules left unquantized in `ignore` -- with every field compressed-tensors'
    own writer (ModelCompressor.update_config) puts beside them: no sparsity, transforms or KV-cache quantization."""
    config_groups = {}
    for name, targets, scheme in groups:
        if scheme.kind != "int":
            raise KLError(f"config group {name!r}: {scheme.describe()} cannot go in a compressed-tensors checkpoint; "
                          "do not mix nf4 and integer schemes in one recipe")
        config_groups[name] = {
            "targets": list(targets),
            "weights": scheme.weights_args(),
            "input_activations": None,
            "output_activations": None,
            "format": PACKED_FORMAT,
        }
    return {
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": COMPRESSED_TENSORS,
        "format": PACKED_FORMAT,
        "quantization_status": COMPRESSED_STATUS,
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "moe_sparsity_config": None,
    }
