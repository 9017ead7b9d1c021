"""NF4 through bitsandbytes: a module's 4-bit tensors as transformers saves them, and its quantization_config."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from klconvert.checkpoint.regular_file import parse_json
from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.errors import KLError, ValuesRefused, unreadable_reason
from klconvert.extras import require
from klconvert.quant.pack_quantized import SOURCE_OUT_OF_RANGE, largest_dequantized, local_names
from klconvert.quant.scheme import NF4_BLOCKSIZE
from klconvert.quant.stored import NF4_DATA, NF4_NESTED_PARTS, NF4_PARTS, NF4_REQUIRED, NF4_STATE, nf4_parts
from klconvert.units import counted

# The absmax of each block double-quantized (bitsandbytes' compress_statistics): what klconvert writes, what
# quantization_config declares, and what stored.nf4_parts sizes; a folder without it is read too
NF4_DOUBLE_QUANT = True
BITSANDBYTES = "bitsandbytes"  # the quant_method of bitsandbytes' configs
SKIP_MODULES = "llm_int8_skip_modules"  # the modules a bitsandbytes config keeps out of 4-bit
NF4_READ = "reading an NF4 checkpoint"  # what needs bitsandbytes, as a missing extra's line says


def _bnb(feature: str):
    return require("bitsandbytes.functional", feature)


def load_nf4_reader() -> None:
    """Import what reading an NF4 checkpoint imports (bitsandbytes, with triton, numpy and sympy): on the CPU 126 MB of
    the host mapped, which a memory plan measuring the host before the first read did not count -- a 15,514-token
    prompt of the bundled model at nf4 planned to fit under ulimit -d 600-700 MB and ran out mid-prefill (h291)."""
    _bnb(NF4_READ)


@torch.no_grad()
def compress_nf4(prefix: str, w: torch.Tensor, double_quant: bool = NF4_DOUBLE_QUANT) -> dict[str, torch.Tensor]:
    """Quantize module `prefix`'s weight w [out, in] to NF4 (blocks of 64) with bitsandbytes, on w's device.

    Returns {prefix.weight: uint8 [out*in/2, 1], prefix.weight.absmax, .quant_map,
    (.nested_absmax, .nested_quant_map when double_quant), .quant_state.bitsandbytes__nf4}.
    """
    if w.ndim != 2 or not w.is_floating_point():
        raise KLError(f"{prefix}.weight: shape {list(w.shape)} {w.dtype} is not a 2-D float linear weight; "
                      "leave it out of the recipe's targets")
    if w.numel() % NF4_BLOCKSIZE:
        raise KLError(f"{prefix}.weight: {w.numel():,} elements do not fill whole NF4 blocks of {NF4_BLOCKSIZE}; "
                      "leave it out of the recipe's targets")
    if not bool(torch.isfinite(w).all()):
        raise ValuesRefused(f"{prefix}.weight: the weight holds NaN or Inf values; the checkpoint is damaged -- "
                            "re-download it")
    bnbf = _bnb("--scheme nf4 (or use --scheme int)")
    with torch.device("cpu"):   # bitsandbytes makes its JSON state on the default device: the host, not an app's
        packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=double_quant,
                                           quant_type="nf4", quant_storage=torch.uint8)
        _refuse_out_of_range(f"{prefix}.weight", w, state)
        parts = state.as_dict(packed=True)
    out = {f"{prefix}.weight": packed}
    for key, t in parts.items():
        # clone: quant_map is bitsandbytes' shared code book, and safetensors refuses shared storage
        out[f"{prefix}.weight.{key}"] = t.clone().contiguous()
    return out


def _refuse_out_of_range(where: str, w: torch.Tensor, state) -> None:
    """ValuesRefused naming `where` when bitsandbytes' quant `state` of the finite weight `w` dequantizes a weight past
    largest_dequantized (check_scales' refusal, for NF4) or to NaN: double quantization stores each block's absmax less
    their mean, which is inf once they sum past fp32's range (two blocks near bf16's largest value), and writes the
    nested absmax and offset as inf -- a folder its reader calls damaged. A block's largest weight is its absmax times
    the code book's largest code."""
    absmax = state.absmax
    if state.nested:   # as bitsandbytes' dequantize_4bit rebuilds them
        absmax = _bnb("--scheme nf4").dequantize_blockwise(state.absmax, state.state2) + state.offset
    blocks = absmax.float().abs()
    reached = float(blocks.amax()) * float(state.code.abs().amax())
    limit = largest_dequantized(w.dtype)
    if reached <= limit:   # False for NaN too
        return
    if not math.isfinite(reached):
        raise ValuesRefused(f"{where}: its NF4 quant state overflows: bitsandbytes' double quantization stores each "
                            f"block's largest value less their mean, and these (up to {float(w.abs().amax()):.4g}) "
                            f"sum past fp32's range: the int scheme holds them (leave out --scheme nf4)")
    raise ValuesRefused(f"{where}: its NF4 block {int(blocks.argmax()):,} (of {NF4_BLOCKSIZE} values) dequantizes a "
                        f"weight to {reached:.4g}, past the largest finite value {limit:.4g}; {SOURCE_OUT_OF_RANGE}")


@torch.no_grad()
def decompress_nf4(tensors: Mapping[str, torch.Tensor], where: str = "an NF4 weight",
                   shape: tuple[int, int] | None = None,
                   remedy: Callable[[], str] = damaged_folder_remedy) -> torch.Tensor:
    """Rebuild one module's weight (in the dtype it was quantized from) from its NF4 tensors; `where` names it in
    errors, `shape` (config.json's, when known) is the one its quant state must say, and `remedy`, asked only for a
    line, says what to do about a damaged one (damaged_folder_remedy: a reader's by its folder's origin)."""
    found = local_names(tensors, NF4_PARTS)
    missing = [n for n in NF4_REQUIRED if n not in found]
    if missing:
        raise KLError(f"nf4 tensors {sorted(tensors)[:4]} lack {missing}; the checkpoint is incomplete -- {remedy()}")
    bnbf = _bnb(NF4_READ)
    _check_state(found, where, shape, remedy)
    packed = found.pop(NF4_DATA)
    with torch.device("cpu"):   # bitsandbytes makes the nested offset on the default device: the host, not an app's
        state = bnbf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in found.items()},
                                          device=packed.device)
    w = bnbf.dequantize_4bit(packed, state)
    if not bool(torch.isfinite(w).all()):
        raise ValuesRefused(f"{where}: its NF4 tensors dequantize to NaN or Inf; the checkpoint is damaged -- "
                            f"{remedy()}")
    return w


_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' kernels take
_FIELDS = ("quant_type", "blocksize", "dtype", "shape")  # QuantState.as_dict's fields that are not tensors
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")  # and those of double quantization
_DTYPES = ("bfloat16", "float16", "float32")
# bitsandbytes holds nested_offset as an fp32 tensor; compared, not converted (an int of 400 digits overflows a float),
# and NaN fails the comparison
_FLOAT32_MAX = torch.finfo(torch.float32).max
MAX_STATE_BYTES = 4096  # the quant state's JSON: seven short fields


def _block_size(value) -> bool:
    return type(value) is int and value in _BLOCKSIZES


def _check_state(found: Mapping[str, torch.Tensor], where: str, weight_shape: tuple[int, int] | None,
                 remedy: Callable[[], str]) -> None:
    """Hold the untrusted quant state to the packed tensor, and to `weight_shape` when given, before bitsandbytes
    reads it (its kernels trust every size: an absmax cut short is read past its end; a field it does not know fails
    an assert)."""
    def bad(what: str):
        return KLError(f"{where}: NF4 quant state {what}; the checkpoint is damaged -- {remedy()}")

    blob = found[NF4_STATE]
    if blob.numel() > MAX_STATE_BYTES:
        raise bad(f"is {blob.numel():,} bytes, far more than its few fields")
    try:
        state = parse_json(bytes(blob.to(torch.uint8).tolist()).decode())
    except (ValueError, RecursionError, TypeError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(f"is not JSON ({unreadable_reason(e, 120)})") from None
    nested = NF4_NESTED_PARTS[0] in found   # its nested absmax: double-quantized
    if not isinstance(state, dict):
        raise bad("is not a JSON object")
    fields = _FIELDS + (_NESTED_FIELDS if nested else ())
    unknown = sorted(set(state) - set(fields))
    if unknown:
        raise bad(f"has fields {', '.join(unknown)[:100]} beyond bitsandbytes' {', '.join(fields)}")
    if weight_shape is not None and state.get("shape") != list(weight_shape):
        raise bad(f"says shape {json.dumps(state.get('shape'))[:40]}, but config.json makes the weight "
                  f"{list(weight_shape)}")
    shape, n = state.get("shape"), 2 * found[NF4_DATA].numel()
    fields_ok = (state.get("quant_type") == "nf4" and _block_size(state.get("blocksize"))
                 and state.get("dtype") in _DTYPES and isinstance(shape, list) and len(shape) == 2
                 and all(type(d) is int and d > 0 for d in shape) and shape[0] * shape[1] == n)
    if nested:
        offset = state.get("nested_offset")
        fields_ok = fields_ok and _block_size(state.get("nested_blocksize")) and \
            state.get("nested_dtype") in _DTYPES and type(offset) in (int, float) and abs(offset) <= _FLOAT32_MAX
    if not fields_ok:
        raise bad(f"fields {json.dumps(state)[:200]} do not describe its {n:,} packed values")
    # the parts the state's block sizes make (the packed data's own uint8 [n / 2, 1] is held at the header)
    parts = [part for part in nf4_parts(tuple(shape), state["blocksize"], state["nested_blocksize"] if nested else None)
             if part[0] != NF4_DATA]
    for name, _, size in parts:
        if name not in found or found[name].numel() != math.prod(size):
            got = counted(found[name].numel(), "value") if name in found else "none"
            raise bad(f"{name.removeprefix('weight.')} holds {got} where its shape needs "
                      f"{counted(math.prod(size), 'value')}")
    # in the dtypes QuantState.as_dict(packed=True) writes: bitsandbytes reads another dtype's bits as these (a code
    # book of int32s) or refuses it in a traceback
    for name, dtype, _ in parts:
        if found[name].dtype != dtype:
            raise bad(f"{name.removeprefix('weight.')} is {found[name].dtype}, where bitsandbytes writes {dtype}")


def bnb_quantization_config(skip_modules: Sequence[str]) -> dict:
    """config.json's `quantization_config` for a pre-quantized bitsandbytes NF4 checkpoint.

    transformers converts every nn.Linear not matched by `llm_int8_skip_modules` (regexes from the
    start of the module name up to a '.', or name suffixes), and adds no default skips once the
    list is given -- so every linear left in high precision must be listed.
    """
    return {
        "quant_method": BITSANDBYTES,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_use_double_quant": NF4_DOUBLE_QUANT,
        "bnb_4bit_quant_storage": "uint8",
        SKIP_MODULES: list(skip_modules),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
