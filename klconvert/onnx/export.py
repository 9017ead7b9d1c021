"""export_onnx: a checkpoint folder -> an ONNX folder onnxruntime runs (model.onnx, genai_config.json, config.json,
the tokenizer files and a tokenizer.json written from them). One graph prefills and decodes: input_ids [batch,
sequence], position [batch], logits_to_keep [] and the state in; logits [batch, kept_sequence, vocab] (the last
logits_to_keep positions', 0 every position's) and the updated state out. The graph is fp32; packed int4/int8 weights
stay packed (MatMulNBits, QMoE), the rest are the bound model's float weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import EncodeError
from onnx import helper

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import CONFIG_FILE, GENAI_CONFIG, copied_side_file, refuse_unfit_side_files
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import Checkpoint
from klconvert.convert.output_folder import refuse_out_over_source
from klconvert.disk_space import writing
from klconvert.errors import KLError, refuse_non_bool
from klconvert.models import resolve_model
from klconvert.onnx.export_folder import (ATTENTION_KEY_BLOCK, DATA_FILE, LOGITS_SHAPE, LOGITS_TO_KEEP, ONNX_FILE,
                                         state_spec)
from klconvert.onnx.ffn import moe_layer, swiglu_mlp
from klconvert.onnx.graph import FLOAT, INT64, MS_DOMAIN, GraphBuilder
from klconvert.onnx.kda import kda_layer
from klconvert.onnx.linears import Linears, as_numpy
from klconvert.onnx.mla import KEY_BLOCK, mla_layer
from klconvert.runtime import model as M
from klconvert.runtime.bind import bind
from klconvert.runtime.host_memory import exhausted
from klconvert.scalars import as_number
from klconvert.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, TRANSFORMERS_TOKENIZER_FILE, check_tokenizer_if_any
from klconvert.tokenizer_json import written_tokenizer_json
from klconvert.user_paths import given_path
from klconvert.whole_folder import Replaceable, refuse_taken, whole_folder

PROTOBUF_LIMIT = 2 << 30           # a protobuf message holds at most 2 GB: past it the weights go to DATA_FILE
MIN_OPSET = 18                     # the oldest opset of the ops the graph takes (MIN_OPSET_OPS)
MIN_OPSET_OPS = "ReduceMean and Split with axes and sizes as inputs, ScatterND with a reduction"
DEFAULT_OPSET = MIN_OPSET
MS_OPSET = 1                       # com.microsoft's version (MatMulNBits, QMoE)
# The lowest onnxruntime the [onnx] extra allows (pyproject.toml's floor: tests/test_onnx_export.py holds them equal)
# and the newest IR version it loads: a newer opset's graph (IR 14 from opset 28) it refuses to load at all
LOWEST_ONNXRUNTIME, LOWEST_ONNXRUNTIME_IR = "1.30", 13
COPIED_TOKENIZER_FILES = (*TOKENIZER_FILES, CHAT_TEMPLATE_FILE)  # each where the model folder has it
EXPORT_FILES = {ONNX_FILE, DATA_FILE, GENAI_CONFIG, CONFIG_FILE, *COPIED_TOKENIZER_FILES,
                TRANSFORMERS_TOKENIZER_FILE}   # all an export writes


def _present_shape(shape: list) -> list:
    return ["total_sequence" if d == "past_sequence" else d for d in shape]


def _kept_positions(g: GraphBuilder, x: str) -> str:
    """x [B, T, D] -> its last logits_to_keep rows: a Slice from -logits_to_keep, which -0 makes row 0 and a count
    past the sequence clamps to it, so 0 and any count over the tokens keep every row."""
    start = g.op("Unsqueeze", g.op("Neg", LOGITS_TO_KEEP), g.const([0]))
    return g.op("Slice", x, start, g.const([np.iinfo(np.int64).max]), g.const([1]))


def build_graph(model: M.KimiLinear, linears: Linears, opset: int):
    """The bound model as one ONNX ModelProto (weights inside)."""
    c = model.config
    proto = make_model(onnx.GraphProto(), opset)
    g = GraphBuilder(proto.graph)   # each weight written once, into the model's own graph
    spec = {(s["layer"], s["kind"]): s for s in state_spec(c)}
    embed = g.weight("model.embed_tokens.weight", as_numpy(model.model.embed_tokens.weight))
    x = g.op("Gather", embed, "input_ids", axis=0)                                      # [B, T, D]
    outputs = {}
    for layer, block in enumerate(model.blocks):
        prefix = f"model.layers.{layer}"
        h = g.rms_norm(x, g.weight(f"{prefix}.input_layernorm.weight", as_numpy(block.input_layernorm.weight)),
                       block.input_layernorm.eps)
        mixer = block.self_attn
        if isinstance(mixer, M.KDAMixer):
            s, t = spec[layer, "kda_state"], spec[layer, "conv_state"]
            h, outputs[s["present"]], outputs[t["present"]] = kda_layer(
                g, h, mixer, f"{prefix}.self_attn", linears, s["past"], t["past"])
        else:
            s = spec[layer, "mla_latent"]
            h, outputs[s["present"]] = mla_layer(g, h, mixer, f"{prefix}.self_attn", linears, s["past"], "position")
        x = g.op("Add", x, h)
        if layer == len(model.blocks) - 1:
            # past the last mixer (whose state takes every token) only the kept positions' rows are used: the last
            # FFN -- a layer's MoE -- runs on those alone, as the final norm and lm_head do
            x = _kept_positions(g, x)
        norm = block.post_attention_layernorm
        h = g.rms_norm(x, g.weight(f"{prefix}.post_attention_layernorm.weight", as_numpy(norm.weight)), norm.eps)
        if isinstance(block.ffn, M.MoE):
            h = moe_layer(g, h, block.ffn, f"{prefix}.block_sparse_moe", linears)
        else:
            h = swiglu_mlp(g, h, block.ffn, f"{prefix}.mlp", linears)
        x = g.op("Add", x, h)
    x = g.rms_norm(x, g.weight("model.norm.weight", as_numpy(model.model.norm.weight)), model.model.norm.eps)
    outputs = {"logits": linears.module(g, x, "lm_head", model.lm_head), **outputs}
    for name, value in outputs.items():
        g.nodes.append(helper.make_node("Identity", [value], [name]))
    states = state_spec(c)
    inputs = [helper.make_tensor_value_info("input_ids", INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("position", INT64, ["batch"]),
              helper.make_tensor_value_info(LOGITS_TO_KEEP, INT64, [])]
    inputs += [helper.make_tensor_value_info(s["past"], FLOAT, s["shape"]) for s in states]
    outs = [helper.make_tensor_value_info("logits", FLOAT, [*LOGITS_SHAPE, c.vocab_size])]
    outs += [helper.make_tensor_value_info(s["present"], FLOAT, _present_shape(s["shape"])) for s in states]
    # merged beside the initializers, the rest of the graph (nodes, inputs, outputs, name) is copied, the weights not
    proto.graph.MergeFrom(helper.make_graph(g.nodes, "kimi_linear", inputs, outs))
    helper.set_model_props(proto, {ATTENTION_KEY_BLOCK: str(KEY_BLOCK)})   # the graph's own, as onnxruntime reads it
    return proto


def make_model(graph, opset: int):
    """`graph` as a model of ONNX `opset` and com.microsoft's, declaring the lowest IR version the opset allows --
    not the installed onnx's newest: onnx 1.23 stamps IR 14, which onnxruntime 1.30 refuses to load ("max supported
    IR version: 13") although it runs every op here."""
    return helper.make_model(graph, producer_name="klconvert", opset_imports=_opset_ids(opset),
                             ir_version=ir_version(opset))


def _opset_ids(opset: int) -> list:
    return [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, MS_OPSET)]


def ir_version(opset: int) -> int:
    """The lowest IR version a model of ONNX `opset` (and com.microsoft's) may declare."""
    return helper.find_min_ir_version_for(_opset_ids(opset), ignore_unknown=True)


def newest_opset() -> tuple[int, str]:
    """The newest opset export-onnx writes, and why no newer: the installed onnx's newest, or the newest whose IR
    version the lowest onnxruntime allowed loads."""
    top = onnx.defs.onnx_opset_version()
    loadable = max(o for o in range(MIN_OPSET, top + 1) if ir_version(o) <= LOWEST_ONNXRUNTIME_IR)
    if loadable < top:
        return loadable, (f"opset {loadable + 1} needs IR version {ir_version(loadable + 1)}, which onnxruntime "
                          f"{LOWEST_ONNXRUNTIME}, the lowest the [onnx] extra allows, cannot load")
    return top, "the installed onnx's newest"


def genai_config(config, opset: int, external: bool, tokenizer_files: list[str]) -> dict:
    """What a runner needs beside the graph: its file, inputs and outputs (names, dtypes, shapes), how each state
    input maps to its output, the cached rows its MLA layers attend at once in a call of more than one token per
    sequence (its scores are [batch, heads, sequence, attention_key_block]; a decode step's, [batch, heads, rows]),
    and the tokenizer files."""
    states = state_spec(config)
    return {
        "model": {
            "type": "kimi_linear", "file": ONNX_FILE, "external_data": DATA_FILE if external else None,
            "opset": opset, "vocab_size": config.vocab_size, "context_length": config.model_max_length,
            ATTENTION_KEY_BLOCK: KEY_BLOCK,
            "bos_token_id": config.raw.get("bos_token_id"), "eos_token_id": config.raw.get("eos_token_id"),
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                       {"name": "position", "dtype": "int64", "shape": ["batch"],
                        "meaning": "position of input_ids[:, 0] in each sequence: where its latent rows are "
                                   "written; a token attends to the rows up to its own position"},
                       {"name": LOGITS_TO_KEEP, "dtype": "int64", "shape": [],
                        "meaning": "the last positions of input_ids whose logits are computed, 0 every position's: a "
                                   "prefill that samples only the next token gives 1, so lm_head runs on one row"}]
            + [{"name": s["past"], "dtype": s["dtype"], "shape": s["shape"]} for s in states],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [*LOGITS_SHAPE, config.vocab_size]}]
            + [{"name": s["present"], "dtype": s["dtype"], "shape": _present_shape(s["shape"])} for s in states],
            "state": states,
        },
        "tokenizer": {"files": tokenizer_files},
    }


def _unfilled_where_packed(model: M.KimiLinear, checkpoint: Checkpoint) -> M.KimiLinear:
    """Give each parameter that the graph takes packed (every checkpoint weight behind it stored int: MatMulNBits,
    QMoE) a zero-stride placeholder, so bind -- which fills only what is still on `meta` -- never dequantizes it:
    the export holds the float weights and the packed parts, not the model dequantized."""
    def stored_int(name: str) -> bool:
        source = checkpoint.sources[name]
        return isinstance(source, QuantizedSource) and source.scheme.kind == "int"

    for pname, p in list(model.named_parameters()):
        if all(stored_int(name) for name, _ in M.canonical_names(model.config, pname)):
            owner, _, leaf = pname.rpartition(".")
            placeholder = torch.zeros((), dtype=torch.float32, device="cpu").expand(p.shape)
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(placeholder, requires_grad=False))
    return model


def _is_an_export_file(path: Path) -> bool:
    """Whether `path`, in a folder --force would replace, is one of an export's files (EXPORT_FILES, a regular
    file): a folder of only these is an export of a klconvert that wrote no OUTPUT_RECORD (whole_folder), or what
    one killed part way left in a folder it wrote into."""
    return path.name in EXPORT_FILES and not path.is_symlink() and path.is_file()


# --force replaces any folder klconvert wrote (a synth or quantize output too), and an export of a klconvert before the
# record by its files
EARLIER_EXPORT = Replaceable("an ONNX export an older klconvert wrote", _is_an_export_file, any_klconvert_output=True)


def export_onnx(model_dir: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, force: bool = False) -> Path:
    """Export the checkpoint in `model_dir` (`tiny`: the bundled model) to the folder `out` (new or empty; with
    `force`, an earlier export, replaced only once the new one is whole), written whole or not at all; returns the
    model.onnx path. onnx.checker checks the written model."""
    refuse_non_bool(force, "force", "--force")
    top, why = newest_opset()
    # a numpy or 0-d torch integer taken as the API's other numbers are (as_number); 18.0, "18" and True are not
    number = as_number(opset, whole=True)
    if number is None or not MIN_OPSET <= number <= top:   # the repr shows which was given
        # why no newer (opset 28's IR) was said of every value, 17 and "18" too: each is told its own reason (h319)
        if number is None:
            why = "a whole number"
        elif number < MIN_OPSET:
            why = f"the graph's {MIN_OPSET_OPS} need opset {MIN_OPSET}"
        raise KLError(f"--opset {opset!r}: choose {MIN_OPSET} to {top} ({why})")
    opset = number
    model_dir, out = resolve_model(model_dir), given_path(out, "out")
    refuse_out_over_source(model_dir, out, "export")
    refuse_taken(out, force, EARLIER_EXPORT)
    checkpoint = Checkpoint(model_dir)
    # for onnxruntime's users, who encode prompts with `tokenizers` (a source's own is replaced, not copied)
    made = written_tokenizer_json(check_tokenizer_if_any(model_dir, checkpoint.config), model_dir)
    copied = [name for name in (CONFIG_FILE, *COPIED_TOKENIZER_FILES) if (model_dir / name).is_file()]
    refuse_unfit_side_files(model_dir, (model_dir / name for name in copied))
    # read before the export's minutes of work, as quantize reads them; without an auto_map naming Python files
    # the export has not
    side_files = {name: copied_side_file(model_dir / name) for name in copied} | made
    with whole_folder(out, force, EARLIER_EXPORT, last=GENAI_CONFIG) as folder:
        _write_export(checkpoint, folder, opset, side_files)
    return out / ONNX_FILE


def _write_export(checkpoint: Checkpoint, folder: Path, opset: int, side_files: dict[str, bytes]) -> None:
    """export_onnx's writing, into the folder that becomes OUT: model.onnx (checked), the side files (name ->
    bytes), genai_config.json."""
    model = bind(_unfilled_where_packed(M.KimiLinear(checkpoint.config), checkpoint), checkpoint.get,
                 checkpoint.packed, {}, torch.device("cpu"), torch.float32, triton=False, restack=False)
    proto = build_graph(model, Linears(checkpoint.config, checkpoint.packed), opset)
    del model   # the graph holds copies of its weights: the bound model's go before save_model serializes it
    checkpoint.refuse_changed()   # every weight is read now, and none from a shard rewritten while open
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > PROTOBUF_LIMIT
    path = folder / ONNX_FILE
    try:
        onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    except EncodeError as e:   # protobuf's serializing, which a graph under PROTOBUF_LIMIT fails only for memory
        raise exhausted(f"writing {path.name}", e) from None   # (under ulimit -v: a traceback, helper-131)
    except OSError:   # onnx writes DATA_FILE whole before it opens model.onnx, whose size is then the proto's
        with writing(path, proto.ByteSize()) if path.exists() or not external else writing(folder / DATA_FILE):
            raise
    del proto   # check_model reads the written file into memory: without the graph's copy beside it
    onnx.checker.check_model(str(path))
    for name, data in side_files.items():
        write_atomically(folder / name, data)
    config = genai_config(checkpoint.config, opset, external, [n for n in side_files if n != CONFIG_FILE])
    write_atomically(folder / GENAI_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
