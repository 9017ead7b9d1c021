"""stack_kda_convs: rewrite a folder's KDA q/k/v_conv1d weights as transformers' one stacked conv1d (the workaround
for transformers 5.24, which cannot load a quantized folder that holds them separately)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import INDEX_FILE, MAX_INDEX_BYTES, MAX_INDEX_VALUES
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.regular_file import open_regular, read_json
from klconvert.checkpoint.stored_tensor import read_stored
from klconvert.entry import note_change
from klconvert.errors import KLError

_CONV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)([qkv])_conv1d\.weight$")


def stack_kda_convs(folder: str | Path) -> int:
    """Replace each KDA layer's q_conv1d/k_conv1d/v_conv1d weights by `self_attn.conv1d.weight` (q, k, v stacked
    on dim 0, as transformers' KimiLinear holds them), shard by shard, in place; returns the layers rewritten.

    klconvert reads the result as before (the name table maps conv1d back); vLLM 0.33 expects the separate
    weights, so make this change on a copy meant for transformers. The folder is read as a checkpoint first
    (open_checkpoint: config, index, shard names and headers checked, each file bounded), so every shard this
    rewrites is one the index names inside the folder.
    """
    folder = Path(folder)
    headers = open_checkpoint(folder).headers
    weight_map = {name: shard for shard, header in headers.items() for name in header.tensors}
    index_path = folder / INDEX_FILE
    index = read_json(index_path, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES) if index_path.is_file() else None
    layers: dict[str, dict[str, str]] = {}
    for name, shard in weight_map.items():
        m = _CONV.match(name)
        if m:
            layers.setdefault(m[1], {})[m[2]] = shard
    for prefix, shards in layers.items():
        if sorted(shards) != ["k", "q", "v"] or len(set(shards.values())) != 1:
            raise KLError(f"{folder}: {prefix}q/k/v_conv1d are not all in one shard ({shards}); stack them by hand")
    for shard in sorted({s for shards in layers.values() for s in shards.values()}):
        with open_regular(folder / shard) as f:
            tensors = {name: read_stored(f, headers[shard], name) for name in headers[shard].tensors}
        for prefix, shards in layers.items():
            if shards["q"] == shard:
                tensors[f"{prefix}conv1d.weight"] = torch.cat([tensors.pop(f"{prefix}{x}_conv1d.weight")
                                                               for x in "qkv"])  # [3 * kda_dim, 1, kernel]
        tmp = folder / (shard + ".partial")
        note_change(tmp)   # save_file writes it in Rust, which Python's audit events do not show
        save_file(tensors, tmp, metadata=headers[shard].metadata or None)
        os.replace(tmp, folder / shard)
    if index is not None:
        for prefix, shards in layers.items():
            for x in "qkv":
                del weight_map[f"{prefix}{x}_conv1d.weight"]
            weight_map[f"{prefix}conv1d.weight"] = shards["q"]
        index["weight_map"] = weight_map  # the checked map (the file's own, as open_checkpoint held it to the headers)
        write_atomically(index_path, (json.dumps(index, indent=2) + "\n").encode())
    return len(layers)
