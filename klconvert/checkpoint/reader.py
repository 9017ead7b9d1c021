"""Checkpoint: a checkpoint folder opened lazily, its index and shards checked before anything runs."""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from klconvert.checkpoint.folder_files import (
    CONFIG_FILE,
    CONFIG_MISMATCH,
    GENAI_CONFIG,
    INDEX_FILE,
    MAX_FILE_NAME_BYTES,
    MAX_INDEX_BYTES,
    MAX_INDEX_VALUES,
    PICKLED_WEIGHTS,
    SINGLE_FILE,
    is_plain_file_name,
)
from klconvert.checkpoint.regular_file import file_identity, open_regular, read_json
from klconvert.checkpoint.name_map import (
    KDA_CONV_PART,
    STACKED_CONV,
    TensorSpec,
    canonical_pieces,
    expected_tensors,
    kda_conv_parts,
    sliced_shape,
    with_stacked_convs,
)
from klconvert.checkpoint.quantized import (
    PACKED_TENSOR_SUFFIXES,
    QuantizedSource,
    declared_schemes,
    dequantize,
    find_quantized,
    quant_method,
    refuse_act_order_index,
    refuse_floats_held_packed,
    refuse_unread_bnb_parts,
)
from klconvert.checkpoint.safetensors_header import SafetensorsHeader, read_header
from klconvert.checkpoint.size_bounds import check_model_size, max_header_bytes, max_header_values
from klconvert.checkpoint.stored_tensor import TORCH_DTYPES, index_span, read_stored
from klconvert.config import WEIGHT_DTYPES, KimiLinearConfig
from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.errors import (KLError, ValuesRefused, refuse_if_not_permitted, refuse_out_of_descriptors, shown,
                              unreadable_reason)
from klconvert.quant import QuantScheme
from klconvert.quant.pack_quantized import check_scales
from klconvert.units import counted

FLOAT_DTYPES = set(WEIGHT_DTYPES.values())
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}  # FP8-quantized weights: a form of the model klconvert does not read
FINITE_CHECK_ELEMENTS = 1 << 24  # checked a slice at a time: the bool temporaries stay at 16 MB


@dataclass(frozen=True)
class Source:
    """Where a canonical tensor lives: a shard, the tensor's name in it, and the index that cuts it out."""

    shard: str
    name: str
    index: tuple
    dtype: str


def _shard_path(folder: Path, shard: object, where: Path) -> Path:
    """A shard file named by untrusted JSON (the index at `where`): a plain file name (is_plain_file_name), nothing
    else."""
    if not is_plain_file_name(shard):
        raise KLError(f"{where}: shard name {shown(shard)} is not a plain file name in the checkpoint folder "
                      f"(printable, no folder, at most {MAX_FILE_NAME_BYTES} bytes); the index is corrupt -- "
                      f"{damaged_folder_remedy(folder, [where])}")
    return folder / shard


def _refuse_non_finite(tensor: torch.Tensor, path: Path, name: str, first: int, remedy: Callable[[], str]) -> None:
    """ValuesRefused when a floating-point tensor (tensor `name` of the shard at `path`, or the slice of it starting at
    its flat index `first`) holds a NaN or an infinity, naming the first by its flat index in `name` -- the tensor the
    line names (a slice's own index pointed at a healthy value of a transformers-layout stack); `remedy` ends the line
    (Checkpoint._remedy: what to do by the folder's origin).

    A slice's fp32 sum is finite when every value is (3x faster than isfinite); only a slice whose sum is not --
    a NaN, an infinity, or finite values summing past fp32's range -- is searched value by value.
    """
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHECK_ELEMENTS):
        part = flat[start:start + FINITE_CHECK_ELEMENTS]
        if bool(torch.isfinite(part.sum(dtype=torch.float32))):
            continue
        bad = (~torch.isfinite(part.float())).nonzero()   # float: torch has no isfinite for the float8 types
        if len(bad):
            at = start + int(bad[0, 0])
            raise ValuesRefused(f"{path}: tensor {name} holds {float(flat[at])} at flat index {first + at:,} (NaN or "
                                f"infinite weights); the checkpoint is damaged -- {remedy()}")


class Checkpoint:
    """A Kimi Linear checkpoint folder: its config, and every canonical tensor, read on demand.

    A quantized folder (compressed-tensors pack-quantized or bitsandbytes nf4) reads the same way: each
    packed weight comes back dequantized under its canonical name.
    """

    def __init__(self, folder: str | Path, flag: str = "--model", finish_stacking: bool = False):
        """flag: the option (or argument) that named the folder, for the message when it holds no config.json.
        finish_stacking: a folder a stopped stack_kda_convs left (`_stopped_stacking`) is read as its shards hold it
        (stack_kda_convs's own rerun); otherwise it is refused, the rerun named."""
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise KLError(f"{self.folder}: no such checkpoint folder; name a folder holding a Kimi Linear checkpoint "
                          "(config.json and safetensors weights): `klconvert pull` downloads one, `klconvert synth` "
                          "makes a random one")
        self.config = KimiLinearConfig.from_file(self.folder / CONFIG_FILE, flag)
        self.quant_method = quant_method(self.config.raw, str(self.folder / CONFIG_FILE))
        self.headers: dict[str, SafetensorsHeader] = {}
        self.sources: dict[str, Source | QuantizedSource] = {}
        self._files: dict[str, tuple[int, ...]] = {}   # shard -> file_identity when its header was read
        self._read_from: set[str] = set()   # shards a tensor was read from, checked again by refuse_changed
        weight_map = self._read_headers()
        stored = sum(e.nbytes for h in self.headers.values() for e in h.tensors.values())
        check_model_size(self.config, str(self.folder / CONFIG_FILE), stored)
        self.expected: dict[str, TensorSpec] = expected_tensors(self.config)
        self._check(weight_map, finish_stacking)

    # ---- checking ----------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index_path = self.folder / INDEX_FILE
        if not os.path.lexists(index_path):   # lexists: a link that leads nowhere is read, and refused as it is
            if os.path.lexists(self.folder / SINGLE_FILE):
                header = read_header(self.folder / SINGLE_FILE, max_header_bytes(self.config),
                                     max_header_values(self.config), self._remedy(SINGLE_FILE))
                return {name: SINGLE_FILE for name in header.tensors}
            if os.path.lexists(self.folder / GENAI_CONFIG):
                raise KLError(f"{self.folder}: an ONNX export ({GENAI_CONFIG}), not a safetensors checkpoint; run it "
                              "with `klconvert run --engine onnxruntime`, or name the checkpoint it was exported from")
            pickled = sorted(path.name for pattern in PICKLED_WEIGHTS for path in self.folder.glob(pattern))
            if pickled:   # named, never opened: unpickling a download runs whatever code it holds
                raise KLError(f"{self.folder}: holds pickled PyTorch weights ({pickled[0]:.80}) and no safetensors; "
                              "klconvert never unpickles .bin files -- convert them to safetensors first (e.g. "
                              "transformers' save_pretrained(out, safe_serialization=True)) and name that folder")
            raise KLError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} is here; the folder is "
                          f"incomplete -- {damaged_folder_remedy(self.folder)}")
        bound = max_header_bytes(self.config)   # an index is shorter than the headers it maps (~100 bytes a tensor)
        if os.path.isfile(index_path) and os.path.getsize(index_path) > bound:
            raise KLError(f"{index_path}: {os.path.getsize(index_path):,} bytes, more than the index of the tensors "
                          f"config.json declares can hold ({bound:,}); the index is corrupt -- "
                          f"{damaged_folder_remedy(self.folder, [index_path])}")
        try:
            index = read_json(index_path, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON, or a 4,300-digit int
            refuse_if_not_permitted(e, index_path)
            raise KLError(f"{index_path}: cannot read the index ({unreadable_reason(e)}); "
                          f"{damaged_folder_remedy(self.folder, [index_path])}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise KLError(f"{index_path}: no 'weight_map' object; the index is corrupt -- "
                          f"{damaged_folder_remedy(self.folder, [index_path])}")
        odd = next((name for name, shard in weight_map.items() if not isinstance(shard, str)), None)
        if odd is not None:
            raise KLError(f"{index_path}: weight_map gives {shown(odd)} a shard that is not a file name "
                          f"({type(weight_map[odd]).__name__}); the index is corrupt -- "
                          f"{damaged_folder_remedy(self.folder, [index_path])}")
        for shard in set(weight_map.values()):
            _shard_path(self.folder, shard, index_path)
        return weight_map

    def _read_headers(self) -> dict[str, str]:
        """Read every shard's header (checked against its file), all of them together no larger than the config's
        tensor count allows; return the weight map they agree with."""
        weight_map = self._weight_map()
        header_bytes_left = max_header_bytes(self.config)
        for shard in sorted(set(weight_map.values())):
            path = self.folder / shard
            if not os.path.lexists(path):
                names = [n for n, s in weight_map.items() if s == shard]
                raise KLError(f"{path}: shard is missing ({counted(len(names), 'tensor')}, e.g. {shown(names[0])}, "
                              f"{'is' if len(names) == 1 else 'are'} indexed in "
                              f"it); the folder is incomplete -- {damaged_folder_remedy(self.folder)}")
            self.headers[shard] = read_header(path, header_bytes_left, max_header_values(self.config),
                                              self._remedy(shard))
            self._files[shard] = file_identity(os.stat(path))
            header_bytes_left -= self.headers[shard].data_start - 8
        return weight_map

    def _check(self, weight_map: dict[str, str], finish_stacking: bool) -> None:
        index_where = str(self.folder / INDEX_FILE)
        stopped = _stopped_stacking(weight_map, self.headers)
        weight_map = with_stacked_convs(weight_map, stopped)   # held to the headers as strictly as any other
        for name, shard in weight_map.items():
            if name not in self.headers[shard].tensors:
                raise KLError(f"{index_where}: tensor {shown(name)} is indexed in {shard} but that shard does not hold "
                              f"it; the index and shards disagree -- {self._disagreement_remedy(shard)}")
        for shard, header in self.headers.items():
            for name in header.tensors:
                if weight_map.get(name) != shard:
                    raise KLError(f"{self.folder / shard}: holds tensor {shown(name)} that the index "
                                  f"{'places in ' + weight_map[name] if name in weight_map else 'does not list'}; "
                                  f"the index and shards disagree -- {self._disagreement_remedy(shard)}")
        self.weight_map = weight_map   # tensor -> shard, in the index's order (a stopped stacking's layers as done)

        refuse_unread_bnb_parts(weight_map, self.folder)
        declared = declared_schemes(self.quant_method, self.config, self.folder)
        if self.quant_method:
            self.sources.update(find_quantized(self.quant_method, declared, weight_map, self.headers, self.expected,
                                               self.config, self.folder))
            packed = {name for q in self.sources.values() for _, name in q.parts.values()}
            weight_map = {n: s for n, s in weight_map.items() if n not in packed}
        refuse_act_order_index(weight_map, self.folder)   # after the config's word on it, which names the field
        packed_name = next((name for name in weight_map if name.endswith(PACKED_TENSOR_SUFFIXES)), None)
        floats: list[tuple[str, tuple[int, ...], str]] = []   # each float tensor held whole, its shape, its line
        for source_name, shard in sorted(weight_map.items()):
            entry = self.headers[shard].tensors[source_name]
            where = f"{self.folder / shard}: tensor {shown(source_name)}"
            if entry.dtype in FP8_DTYPES:   # block-FP8 releases' (with weight_scale_inv), compressed-tensors' fp8
                raise KLError(f"{where} has dtype {entry.dtype}: the folder holds FP8-quantized weights, which "
                              "klconvert does not read; quantize from the bf16 release instead (`klconvert "
                              "pull-and-quantize` fetches it)")
            part = source_name.endswith(PACKED_TENSOR_SUFFIXES)   # one no method read: a float scale, say
            if part or (entry.dtype not in FLOAT_DTYPES and packed_name):
                said = (f"its quantization_config says {self.quant_method}, which does not pack them so"
                        if self.quant_method else "config.json has no quantization_config to say how they are packed")
                what = "is a part of a quantized weight" if entry.dtype in FLOAT_DTYPES else f"has dtype {entry.dtype}"
                raise KLError(f"{where} {what}: the folder holds quantized weights "
                              f"({packed_name:.120}), but {said}; put back the config.json the quantized weights came "
                              "with, or download the checkpoint again")
            if entry.dtype not in FLOAT_DTYPES:
                raise KLError(f"{where} has dtype {entry.dtype}, expected one of {sorted(FLOAT_DTYPES)}; the "
                              f"checkpoint is damaged or not a Kimi Linear one -- {self._remedy(shard)()}")
            pieces = canonical_pieces(source_name, self.config)
            for canonical, index in pieces:
                spec = self.expected.get(canonical)
                if spec is None:
                    raise KLError(f"{where} maps to nothing in a Kimi Linear model with this config "
                                  f"({counted(self.config.num_hidden_layers, 'layer')}, "
                                  f"{self.config.num_experts} experts); {CONFIG_MISMATCH}")
                shape = sliced_shape(entry.shape, index)
                if shape != spec.shape:
                    raise KLError(f"{where} has shape {list(entry.shape)}, which does not give "
                                  f"{canonical} its expected shape {list(spec.shape)}; {CONFIG_MISMATCH}")
                if canonical in self.sources:
                    raise KLError(f"{where} provides {canonical}, which tensor "
                                  f"{shown(self.sources[canonical].name)} provides too: the checkpoint holds that "
                                  "weight twice, in two layouts; download the checkpoint again, or rewrite it keeping "
                                  "one of the two")
                self.sources[canonical] = Source(shard, source_name, index, entry.dtype)
            used = sum(math.prod(self.expected[canonical].shape) for canonical, _ in pieces)
            if used != math.prod(entry.shape):  # a stacked tensor of more experts, or a fused one of more parts
                raise KLError(f"{where} has shape {list(entry.shape)}, but this config ({self.config.num_experts} "
                              f"experts) takes {used:,} of its {math.prod(entry.shape):,} values; {CONFIG_MISMATCH}")
            # a stack (transformers' routed experts, mlp.experts.gate_up_proj [experts, 2 x I, H]) is read as the
            # floats it holds whatever the config declares, as the runtimes that load its layout read it:
            # compressed-tensors and bitsandbytes quantize only nn.Linear (and nn.Embedding) modules, and transformers'
            # experts module is neither; vLLM 0.33 loads no transformers-layout folder (its KimiLinearForCausalLM maps
            # released names only: experts.E.w1/w2/w3, never experts.gate_up_proj)
            if pieces[0][1] == ():
                floats.append((source_name, entry.shape, where))
        # after every tensor is read: another method's packed parts are named as such, not floats its config packs
        refuse_floats_held_packed(declared, floats)
        if self.config.tie_word_embeddings:
            self._tie_lm_head()
        missing = [n for n in self.expected if n not in self.sources]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            # the line rests on the config.json asking for the tensors and every file they were looked for in: where a
            # pull verified them all, pulling again brings the same folder, as short
            looked_in = [CONFIG_FILE, *([INDEX_FILE] if os.path.lexists(self.folder / INDEX_FILE) else []),
                         *sorted(self.headers)]
            raise KLError(f"{self.folder}: tensor {missing[0]}{more} is missing from the checkpoint, which its "
                          f"config.json ({counted(self.config.num_hidden_layers, 'layer')}, "
                          f"{self.config.num_experts} experts) asks for; put back the config.json its weights came "
                          "with, else the checkpoint is "
                          f"incomplete -- {damaged_folder_remedy(self.folder, [self.folder / f for f in looked_in])}")
        if stopped:
            self._refuse_stacked_in_another_dtype(stopped)
        if stopped and not finish_stacking:   # the one disagreement, said once nothing else is wrong (a damaged
            stacked = STACKED_CONV.format(stopped[0])   # folder gets the damage's line): stack_kda_convs ends it
            raise KLError(f"{index_where}: names {stopped[0]}q/k/v_conv1d.weight in {self.weight_map[stacked]}, which "
                          f"holds them stacked as {stacked}: a stack_kda_convs on this folder stopped before it "
                          "rewrote the index; run stack_kda_convs on the folder again to finish it")

    def _refuse_stacked_in_another_dtype(self, stopped: list[str]) -> None:
        """KLError where the conv1d of a stopped stacking's layer (`stopped`) has another dtype than most of the
        folder's KDA convs: stack_kda_convs stacks a layer's q/k/v_conv1d in their own dtype, so that conv1d is none
        of its doing (a wrong shape is refused as any tensor's is, held to the config)."""
        convs = [src for name, src in self.sources.items() if KDA_CONV_PART.match(name) and isinstance(src, Source)]
        usual = Counter(src.dtype for src in convs).most_common(1)[0][0]
        for prefix in stopped:
            stacked = self.sources[f"{prefix}q_conv1d.weight"]   # q/k/v's source: the stacked conv1d
            if stacked.dtype != usual:
                raise KLError(f"{self.folder / stacked.shard}: tensor {shown(stacked.name)} has dtype {stacked.dtype}, "
                              f"while most of the folder's KDA convs are {usual}; it is not what a stopped "
                              "stack_kda_convs leaves in place of the indexed q/k/v_conv1d (that keeps their dtype): "
                              f"the checkpoint is damaged -- {self._remedy(stacked.shard)()}")

    def _tie_lm_head(self) -> None:
        """tie_word_embeddings: lm_head reads the embedding, as transformers ties them (and saves no lm_head)."""
        if "lm_head.weight" in self.sources:
            raise KLError(f"{self.folder / CONFIG_FILE}: tie_word_embeddings is true (lm_head is the embedding), "
                          "but the checkpoint also stores lm_head.weight; set it to false to use the stored lm_head, "
                          "or remove that tensor")
        if "model.embed_tokens.weight" in self.sources:
            self.sources["lm_head.weight"] = self.sources["model.embed_tokens.weight"]

    # ---- reading -----------------------------------------------------------------------------
    def _read(self, shard: str, name: str, index: tuple = ()) -> torch.Tensor:
        path = self.folder / shard
        try:
            with open_regular(path) as file:
                self._refuse_replaced(shard, os.fstat(file.fileno()))   # the file open is the one whose header was read
                self._read_from.add(shard)
                tensor = read_stored(file, self.headers[shard], name, index)
        except OSError as e:
            refuse_out_of_descriptors(e, path)
            refuse_if_not_permitted(e, path)
            self._refuse_replaced(shard)   # gone, or another file there now
            raise KLError(f"{path}: cannot read tensor {shown(name)} ({unreadable_reason(e)}); "
                          f"{self._remedy(shard)()}") from None
        _refuse_non_finite(tensor, path, name, index_span(self.headers[shard].tensors[name].shape, index)[0],
                           self._remedy(shard))
        return tensor

    def _refuse_replaced(self, shard: str, now: os.stat_result | None = None) -> None:
        """KLError unless `shard` (`now`: its stat, else stat again) is still the file whose header was read at open: a
        `quantize --force` replacing the folder under a reader had it decode the new int8 words by the old int4 header
        (garbage text, exit 0)."""
        path = self.folder / shard
        try:
            same = file_identity(now or os.stat(path)) == self._files[shard]
        except OSError:
            same = False
        if not same:
            raise KLError(f"{path}: the shard changed after this command opened the folder (another command replaced "
                          "or rewrote it) -- run again once that command is done")

    def refuse_changed(self) -> None:
        """KLError unless every shard read from is still the file whose header was read at open: a shard rewritten in
        place while open (`cp` over it) is checked at no reopen, and what was read from it mixes old and new
        weights. Called once the reads a result comes from are done, before it is declared whole. A rewrite that
        keeps size and modification time (`touch -r`) is seen by the inode's change time (file_identity)."""
        for shard in sorted(self._read_from):
            self._refuse_replaced(shard)

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor, read from the shards: as stored, or dequantized if packed."""
        src = self.sources[name]
        if isinstance(src, QuantizedSource):
            return dequantize(*self.packed(name), where=f"{self.folder}: {name}", shape=src.shape,
                              remedy=lambda: self._damage_remedy(src))
        return self._read(src.shard, src.name, src.index)

    def scale_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each packed int weight's scales are stored in, from the headers (no value read): the Triton
        repack keeps them so, whatever the compute dtype, and the memory plan sizes them so."""
        out = {}
        for name, src in self.sources.items():
            if isinstance(src, QuantizedSource) and src.scheme.kind == "int":
                shard, tensor = src.parts["weight_scale"]
                out[name] = TORCH_DTYPES[self.headers[shard].tensors[tensor].dtype]
        return out

    def packed(self, name: str) -> tuple[dict[str, torch.Tensor], QuantScheme] | None:
        """A quantized weight's stored parts (local name -> tensor) and scheme, or None if it is not packed."""
        src = self.sources[name]
        if not isinstance(src, QuantizedSource):
            return None
        parts = {part: self._read(shard, n) for part, (shard, n) in src.parts.items()}
        if "weight_shape" in parts and parts["weight_shape"].tolist() != list(src.shape):
            raise KLError(f"{self.folder}: {src.parts['weight_shape'][1]} says {parts['weight_shape'].tolist()}, but "
                          f"config.json makes {name} {list(src.shape)}; the checkpoint is damaged -- "
                          f"{self._damage_remedy(src)}")
        if src.scheme.kind == "int":  # every reader of packed parts -- dequantize, Triton, ONNX -- comes through here
            check_scales(parts, src.scheme, f"{self.folder}: {name}",
                         lambda: f"the checkpoint is damaged -- {self._damage_remedy(src)}")
        return parts, src.scheme

    def _remedy(self, shard: str) -> Callable[[], str]:
        """What a line about damage in `shard` says to do, by the folder's origin: asked only once a line is said."""
        return partial(damaged_folder_remedy, self.folder, [self.folder / shard])

    def _disagreement_remedy(self, shard: str) -> str:
        """What a line about the index and `shard` disagreeing says to do: either file may be the damaged one."""
        return damaged_folder_remedy(self.folder, [self.folder / INDEX_FILE, self.folder / shard])

    def _damage_remedy(self, src: QuantizedSource) -> str:
        """What a line about damage in a packed weight's parts says to do, by the folder's origin."""
        return damaged_folder_remedy(self.folder, [self.folder / shard for shard in src.shards])


def _stopped_stacking(weight_map: dict[str, str], headers: dict[str, SafetensorsHeader]) -> list[str]:
    """The KDA layers (prefixes) a stopped stack_kda_convs left half done: it replaces a shard at a time and the index
    last, so the index names the layer's q/k/v_conv1d in one shard, which holds none of them but, not indexed, their
    stacked conv1d."""
    stopped = []
    for prefix, shards in kda_conv_parts(weight_map).items():
        if sorted(shards) != ["k", "q", "v"] or len(set(shards.values())) != 1:
            continue
        stacked, held = STACKED_CONV.format(prefix), headers[shards["q"]].tensors
        if stacked in held and stacked not in weight_map and not any(f"{prefix}{x}_conv1d.weight" in held
                                                                     for x in "qkv"):
            stopped.append(prefix)
    return stopped


def open_checkpoint(folder: str | Path, flag: str = "--model", finish_stacking: bool = False) -> Checkpoint:
    """Open and check a checkpoint folder (released or transformers layout); `flag` and `finish_stacking` as
    Checkpoint takes them."""
    return Checkpoint(folder, flag, finish_stacking)
