"""stack_kda_convs: rewrite a folder's KDA q/k/v_conv1d weights as transformers' one stacked conv1d (the workaround
for transformers 5.24, which cannot load a quantized folder that holds them separately)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import INDEX_FILE, MAX_INDEX_BYTES, MAX_INDEX_VALUES
from klconvert.checkpoint.name_map import STACKED_CONV, kda_conv_parts, with_stacked_convs
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.regular_file import open_regular, read_json
from klconvert.checkpoint.stored_tensor import read_stored
from klconvert.entry import note_change
from klconvert.errors import KLError


def stack_kda_convs(folder: str | Path) -> int:
    """Replace each KDA layer's q_conv1d/k_conv1d/v_conv1d weights by `self_attn.conv1d.weight` (q, k, v stacked
    on dim 0, as transformers' KimiLinear holds them), shard by shard, in place; returns the layers rewritten.

    klconvert reads the result as before (the name table maps conv1d back); vLLM 0.33 expects the separate
    weights, so make this change on a copy meant for transformers. The folder is read as a checkpoint first
    (open_checkpoint: config, index, shard names and headers checked, each file bounded), so every shard this
    rewrites is one the index names inside the folder. A call stopped partway (its shards are replaced one at a
    time, the index last) is finished by the next, which takes the layers already stacked as done; the result is
    the same bytes, and a call with nothing left to do writes nothing.
    """
    folder = Path(folder)
    checkpoint = open_checkpoint(folder, finish_stacking=True)
    headers, weight_map = checkpoint.headers, checkpoint.weight_map
    index_path = folder / INDEX_FILE
    index = read_json(index_path, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES) if index_path.is_file() else None
    layers = kda_conv_parts(weight_map)
    for prefix, shards in layers.items():
        if sorted(shards) != ["k", "q", "v"] or len(set(shards.values())) != 1:
            raise KLError(f"{folder}: {prefix}q/k/v_conv1d are not all in one shard ({shards}); stack them by hand")
    for shard in sorted({s for shards in layers.values() for s in shards.values()}):
        with open_regular(folder / shard) as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            tensors = {name: read_stored(f, headers[shard], name) for name in headers[shard].tensors}
        for prefix, shards in layers.items():
            if shards["q"] == shard:
                tensors[STACKED_CONV.format(prefix)] = torch.cat([tensors.pop(f"{prefix}{x}_conv1d.weight")
                                                                  for x in "qkv"])  # [3 * kda_dim, 1, kernel]
        tmp = folder / (shard + ".partial")
        note_change(tmp)   # save_file writes it in Rust, which Python's audit events do not show
        try:
            save_file(tensors, tmp, metadata=headers[shard].metadata or None)
            os.chmod(tmp, mode)   # the replaced shard's, not save_file's private 0600
            os.replace(tmp, folder / shard)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if index is not None:
        stacked = with_stacked_convs(weight_map, layers)   # the index's order, each layer's conv1d in q's place
        if list(index["weight_map"].items()) != list(stacked.items()):   # unchanged: no write, the same bytes
            index["weight_map"] = stacked
            write_atomically(index_path, (json.dumps(index, indent=2) + "\n").encode())
    return len(layers)
