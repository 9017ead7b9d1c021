"""How many tensors and parameters a config implies, in closed form from name_map's tables, checked before any
table of tensors is built from an untrusted config.json (and, for a checkpoint folder, against its shards)."""
from __future__ import annotations

import math

from klconvert.checkpoint.folder_files import JSON_CONTAINERS_SLACK
from klconvert.checkpoint.name_map import (
    DENSE_MLP,
    EVERY_LAYER,
    EXPERT,
    GLOBAL_TENSORS,
    KDA_LAYER,
    MLA_LAYER,
    MOE_BLOCK,
)
from klconvert.checkpoint.safetensors_header import MAX_HEADER_BYTES
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError

MAX_TENSORS = 1 << 18  # the released model has 20,253; a table of 262,144 specs is ~100 MB
MIN_STORED_BITS = 1  # no format stores a parameter in less than a bit (int4 and nf4 take 4 and more)
# A header entry takes ~120 bytes, and a packed weight up to 6 entries (nf4: ~650 bytes): 3x that a tensor. Parsed,
# headers take ~12x their bytes, so the released model's (20,493 tensors) stay near 0.5 GB; and a folder's headers
# together never take more than the format lets one file's (MAX_HEADER_BYTES).
HEADER_BYTES_PER_TENSOR = 2048
HEADER_BYTES_SLACK = 1 << 20  # __metadata__ and the like, whatever the model's size
# An entry holds at most 14 JSON values by json_values' count: 3 objects and arrays (itself, its shape and
# data_offsets) and 11 commas (between its keys, its entries, up to MAX_DIMS dimensions and its two offsets). Values
# parsed take many times their bytes (an empty list ~37x, a header padded with short strings or numbers to the
# released model's byte bound 0.9 GB), so a header of more is refused by their count, unparsed, past 6 entries a
# tensor.
HEADER_VALUES_PER_TENSOR = 6 * 14


def _params(table, c: KimiLinearConfig) -> int:
    return sum(math.prod(shape(c)) for _, shape, _ in table)


def tensor_and_param_count(c: KimiLinearConfig) -> tuple[int, int]:
    """(tensors, parameters) of the released layout for `c`: what name_map.expected_tensors would list."""
    kda = len(c.kda_layers)
    mla = c.num_hidden_layers - kda
    moe = c.num_hidden_layers - c.first_k_dense_replace
    dense = c.first_k_dense_replace
    counts = [(GLOBAL_TENSORS, 1), (EVERY_LAYER, c.num_hidden_layers), (KDA_LAYER, kda), (MLA_LAYER, mla),
              (DENSE_MLP, dense), (MOE_BLOCK, moe), (EXPERT, moe * c.num_experts)]
    return (sum(len(table) * n for table, n in counts),
            sum(_params(table, c) * n for table, n in counts))


def check_model_size(c: KimiLinearConfig, where: str, stored_bytes: int | None = None) -> None:
    """Refuse a config whose tensor table would be too large to build, or (given the bytes its shards hold)
    whose parameters could not fit in those shards at any supported precision."""
    tensors, params = tensor_and_param_count(c)
    if tensors > MAX_TENSORS:
        raise KLError(f"{where}: this config means {tensors:,} tensors ({c.num_hidden_layers:,} layers x "
                      f"{c.num_experts:,} experts), over the {MAX_TENSORS:,} klconvert reads; fix the config")
    if stored_bytes is not None and params * MIN_STORED_BITS > 8 * stored_bytes:
        raise KLError(f"{where}: this config means {params:,} parameters but the shards hold only {stored_bytes:,} "
                      "bytes of tensors; the config does not match the weights -- fix it or download both again")


def max_header_bytes(c: KimiLinearConfig) -> int:
    """The most bytes the safetensors headers of a checkpoint for `c` may hold in all its shards."""
    return min(HEADER_BYTES_PER_TENSOR * tensor_and_param_count(c)[0] + HEADER_BYTES_SLACK, MAX_HEADER_BYTES)


def max_header_values(c: KimiLinearConfig) -> int:
    """The most JSON values (json_values) one safetensors header of a checkpoint for `c` may hold."""
    return HEADER_VALUES_PER_TENSOR * tensor_and_param_count(c)[0] + JSON_CONTAINERS_SLACK
