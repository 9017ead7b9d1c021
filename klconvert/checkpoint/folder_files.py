"""The files of a checkpoint folder found by name, and how large its index may be read (no torch here: the hub's
pull checks the index it downloaded too)."""
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # a checkpoint of one shard and no index
MAX_INDEX_BYTES = 64 << 20  # the released index is 2 MB for 20,253 tensors
