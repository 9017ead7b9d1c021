"""Reading quantized folders: compressed-tensors pack-quantized and bitsandbytes nf4 weights come back dequantized."""
from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from safetensors.torch import load_file, save_file

import klconvert
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.quant import compress_nf4, compress_weight, policy_from_options
from klconvert.quant.group_rules import CHANNEL
from testkit import assert_one_line_error, run_cli, shown_lines


def write_quantized(src_folder, out, **options):
    """A quantized copy of `src_folder` made with klconvert.quant directly (one shard, groups of 32 unless `options`
    say another group_size), and the packed tensors. Most tests here damage such a copy of the same source with the
    same options: the folder is quantized once for each (a quarter to over a second of compressing), and each call
    gets a copy of that one, its packed tensors cloned (a test may edit them)."""
    pristine, packed = _quantized_once(_folder_as_it_is(Path(src_folder)), tuple(sorted(options.items())))
    shutil.copytree(pristine, out)
    return {name: ({part: t.clone() for part, t in parts.items()}, scheme) for name, (parts, scheme) in packed.items()}


def _folder_as_it_is(folder: Path) -> tuple:
    """What tells one state of a source folder from another: its path and each file's name, size and change times
    (a folder edited in place between two calls is quantized again)."""
    return (folder.resolve(), *sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ctime_ns)
                                      for f in folder.iterdir()))


_QUANTIZED = tempfile.TemporaryDirectory(prefix="klconvert-test-quantized-")   # the folders _quantized_once wrote


@functools.cache
def _quantized_once(src_state: tuple, options: tuple) -> tuple[Path, dict]:
    """The quantized folder (under _QUANTIZED, never handed out to be edited) and packed tensors of the source whose
    state is `src_state` (_folder_as_it_is) under `options`."""
    src_folder, options = src_state[0], dict(options)
    src = open_checkpoint(src_folder)
    policy = policy_from_options(**{"group_size": 32, **options}).check_against(
        [(n, s.shape) for n, s in src.expected.items()])
    tensors, packed = {}, {}
    for name, spec in src.expected.items():
        scheme = policy.scheme_for(name, spec.shape)
        if scheme is None:
            tensors[name] = src.get(name)
            continue
        module = name.removesuffix(".weight")
        parts = compress_nf4(module, src.get(name)) if scheme.kind == "nf4" else \
            compress_weight(module, src.get(name), scheme)
        tensors.update(parts)
        packed[name] = (parts, scheme)
    out = Path(tempfile.mkdtemp(dir=_QUANTIZED.name)) / "q"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_folder / "config.json").read_text())
    config["quantization_config"] = policy.quantization_config()
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(src_folder / f, out / f)
    return out, packed


@pytest.mark.parametrize("options", [dict(bits=4, symmetric=False), dict(bits=8), dict(scheme="nf4")],
                         ids=["int4-asym", "int8-sym", "nf4"])
def test_packed_weights_read_back_dequantized(tiny_released, tmp_path, options):
    from klconvert.quant import decompress_nf4, decompress_weight

    packed = write_quantized(tiny_released, tmp_path / "q", **options)
    ckpt, src = open_checkpoint(tmp_path / "q"), open_checkpoint(tiny_released)
    assert ckpt.quant_method == ("bitsandbytes" if options.get("scheme") == "nf4" else "compressed-tensors")
    assert set(packed) == {n for n, s in ckpt.sources.items() if isinstance(s, QuantizedSource)}
    for name, (parts, scheme) in packed.items():
        want = decompress_nf4(parts) if scheme.kind == "nf4" else decompress_weight(parts, scheme)
        got = ckpt.get(name)
        assert got.shape == src.expected[name].shape and torch.equal(got, want), name
        err = ((got.float() - src.get(name).float()).norm() / src.get(name).float().norm()).item()
        assert err < {4: 0.15, 8: 0.01}[scheme.bits if scheme.kind == "int" else 4], (name, err)
    engine = klconvert.load(tmp_path / "q", device="cpu", max_context=64)
    logits = engine.forward(torch.arange(40).view(1, 40))
    assert torch.isfinite(logits).all()


def test_missing_scale_is_one_clear_error(tiny_released, tmp_path):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    victim = "model.layers.1.self_attn.q_proj.weight_scale"
    del tensors[victim]
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(klconvert.KLError, match=r"q_proj\.weight' lacks weight_scale"):
        open_checkpoint(tmp_path / "q")


def _damage(folder, edit) -> None:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


Q_PROJ = "model.layers.1.self_attn.q_proj"


def test_weight_shape_values_must_say_the_configs_shape(tiny_released, tmp_path):
    """weight_shape's values reach the unpacking (and the ONNX export): held to config.json's shape on reading."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight_shape", torch.tensor([128, 64])))
    ckpt = open_checkpoint(tmp_path / "q")
    with pytest.raises(klconvert.KLError, match=rf"{Q_PROJ}\.weight_shape says \[128, 64\], but config\.json makes "
                                                rf"{Q_PROJ}\.weight \[\d+, \d+\]; the checkpoint is damaged"):
        ckpt.get(f"{Q_PROJ}.weight")


def test_a_packed_weight_of_no_module_of_the_config_is_told_what_to_do(tiny_released, tmp_path, capsys):
    """It said 'maps to no linear weight of this model; the checkpoint does not match its config.json' and no more
    (h182)."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__("model.layers.1.self_attn.zzz.weight_packed",
                                                    torch.zeros(2, 2, dtype=torch.int32)))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {tmp_path / 'q'}: quantized weight 'model.layers.1.self_attn.zzz.weight' maps to no "
        "linear weight of this model (8 layers, 16 experts); the checkpoint does not match its config.json -- put "
        "back the config.json its weights came with, or download the checkpoint again")


@pytest.mark.parametrize("zero", [torch.zeros(3, 7, dtype=torch.int32), None], ids=["misshapen", "bf16"])
def test_a_zero_point_that_does_not_fit_its_scale_is_refused(tiny_released, tmp_path, zero):
    write_quantized(tiny_released, tmp_path / "q", bits=4, symmetric=False)
    name = f"{Q_PROJ}.weight_zero_point"
    _damage(tmp_path / "q", lambda t: t.__setitem__(name, zero if zero is not None else t[name].bfloat16()))
    with pytest.raises(klconvert.KLError, match=rf"{Q_PROJ}.*weight_zero_point .* does not fit its scale"):
        open_checkpoint(tmp_path / "q")


def test_zero_points_stored_unpacked_are_named_as_such(tiny_released, tmp_path, capsys):
    """An int8 zero point a row ([out, groups], as the pack-quantized format does not store it: it packs 32 / bits rows
    into each int32, the form vLLM's PackedvLLMParameter loads) was called one that does not fit its scale, to be
    converted again (h203's F2)."""
    write_quantized(tiny_released, tmp_path / "q", bits=4, symmetric=False)
    name = f"{Q_PROJ}.weight_zero_point"
    _damage(tmp_path / "q", lambda t: t.__setitem__(name, torch.zeros(128, 4, dtype=torch.int8)))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {tmp_path / 'q'}: quantized weight '{Q_PROJ}.weight': weight_zero_point I8 [128, 4] holds "
        "a zero point a row, unpacked, where the pack-quantized format packs 8 rows into each int32 (I32 [16, 4] "
        "here), as compressed-tensors 0.20.1 writes it and vLLM loads it -- save the model again with "
        "compressed-tensors 0.20.1 (llm-compressor's save_pretrained), or quantize the bf16 release with `klconvert "
        "quantize`")


@pytest.mark.parametrize("zero", [torch.zeros(128, 4, dtype=torch.int8), torch.zeros(16, 4, dtype=torch.int32)],
                         ids=["unpacked", "packed"])
def test_zero_points_under_a_symmetric_scheme_are_named_as_such(tiny_released, tmp_path, capsys, zero):
    """Zero points beside a weight whose group declares symmetric: stored unpacked, they were called zero points that
    do not fit their scale (h203's F2); in either form the line says that a symmetric scheme has none."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight_zero_point", zero))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"quantized weight '{Q_PROJ}.weight' is stored as int4 in groups of 32 inputs "
                          "with zero points, but quantization_config declares group_0 int4 g32 sym for it (its target "
                          "'Linear' selects it): it holds a weight_zero_point, which a symmetric scheme has none of")


def _stored_uncompressed(src_folder):
    """Every packed weight as llm-compressor's save_compressed=False writes it: the float weight (here the packed one
    dequantized, in bf16) with its weight_scale (and weight_zero_point) beside it, no weight_packed or weight_shape."""
    src = open_checkpoint(src_folder)

    def edit(t):
        for module in [n.removesuffix(".weight_packed") for n in t if n.endswith(".weight_packed")]:
            t[f"{module}.weight"] = src.get(f"{module}.weight").bfloat16()
            del t[f"{module}.weight_packed"], t[f"{module}.weight_shape"]
    return edit


def test_weights_stored_uncompressed_with_their_scales_are_named_as_such(tiny_released, tmp_path, capsys):
    """llm-compressor's save_compressed=False folder (format dense, status frozen, each weight a float with its
    weight_scale beside it) was told it 'lacks weight_packed, weight_shape; the conversion was cut short -- run it
    again' (h203's F2): it is whole, in a form klconvert does not read."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", _stored_uncompressed(tmp_path / "q"))
    _edit_quantization_config(tmp_path / "q", lambda qc: (qc.update(format="dense", quantization_status="frozen"),
                                                          qc["config_groups"]["group_0"].update(format="dense")))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, ".weight' is stored as floats with weight_scale beside it: compressed-tensors' "
                          "uncompressed form (llm-compressor's save_compressed=False, format 'dense'), which klconvert "
                          "does not read (it reads weights stored pack-quantized) -- save the model again compressed "
                          "(llm-compressor's save_pretrained with save_compressed=True), or quantize the bf16 release "
                          "with `klconvert quantize`")


def test_unknown_quant_method_is_refused(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(klconvert.KLError, match="'gptq' is not supported"):
        open_checkpoint(tiny_copy)
    config["quantization_config"] = {"quant_method": "q" * 500_000}   # quoted short: it was quoted whole
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(klconvert.KLError, match=f"quant_method '{'q' * 76}... is not supported"):
        open_checkpoint(tiny_copy)


@pytest.mark.parametrize("quantization_config, said", [
    ([1, 2], "is a list ([1, 2]), not an object naming its quant_method"),
    ("compressed-tensors", "is a string ('compressed-tensors'), not an object naming its quant_method"),
    (True, "is a boolean (True), not an object"),
    (4, "is a number (4), not an object"),
    ([{"quant_method": "compressed-tensors"}], "is a list ([{'quant_method': 'compressed-tensors'}]), not an object"),
    ({}, "has no quant_method"),
    ({"quant_method": None, "config_groups": {}}, "has no quant_method"),
], ids=["list", "string", "bool", "number", "list-of-config", "empty", "null-method"])
def test_a_quantization_config_naming_no_method_says_what_it_is(tiny_copy, capsys, quantization_config, said):
    """Each was 'quant_method None is not supported', as if it named one."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tiny_copy / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "plan", "--model", tiny_copy)
    assert_one_line_error(code, err, f"{tiny_copy}/config.json: quantization_config {said}",
                          "put back the config.json the weights came with")


def test_a_packed_config_over_float_weights_is_refused(tiny_copy, capsys):
    """A quantization_config copied over float weights ran as them and measured as lossless (eval: KL 0, top-1 100%)
    under a name that says int4, and loads nowhere else; a dense-format config (floats by its own word) stays read."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["quantization_config"] = policy_from_options(bits=4).quantization_config()
    (tiny_copy / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt", "hi", "--max-new-tokens", "1")
    assert_one_line_error(code, err, "config.json: quantization_config declares pack-quantized weights",
                          "no tensor here is stored packed", "delete its quantization_config")
    for group in config["quantization_config"]["config_groups"].values():
        group["format"] = "dense"
    config["quantization_config"]["format"] = "dense"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    assert not any(isinstance(s, QuantizedSource) for s in open_checkpoint(tiny_copy).sources.values())


@pytest.mark.parametrize("command", ["run", "eval"])
def test_a_bitsandbytes_config_over_float_weights_is_refused(tiny_copy, tiny_released, tmp_path, capsys, command):
    """The same config copied over float weights, bitsandbytes': read as the floats, eval measured the "nf4" folder
    as lossless (KL 0) and run ran it, where transformers looks for its 4-bit tensors and fails."""
    config = json.loads((tiny_copy / "config.json").read_text())
    config["quantization_config"] = policy_from_options(scheme="nf4").quantization_config()
    (tiny_copy / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    args = {"run": ("run", "--model", tiny_copy, "--prompt", "hi", "--max-new-tokens", "1"),
            "eval": ("eval", "--model", tiny_copy, "--reference", tiny_released, "--text-file", tmp_path / "text.txt")}
    code, _, err = run_cli(capsys, *args[command], "--device", "cpu")
    assert_one_line_error(code, err, "config.json: quantization_config declares bitsandbytes weights, but no tensor "
                          "here is stored packed (no *.weight.absmax)", "delete its quantization_config")


@pytest.mark.parametrize("stored, declared", [(dict(bits=4), "nf4"), (dict(scheme="nf4"), "int")])
def test_one_methods_config_over_the_others_weights_names_both(tiny_released, tmp_path, stored, declared):
    """Packed weights under the other method's config are packed -- not "no tensor stored packed": the refusal names
    a packed tensor and the method the config says."""
    write_quantized(tiny_released, tmp_path / "q", **stored)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = policy_from_options(scheme=declared).quantization_config()
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(klconvert.KLError, match=r"the folder holds quantized weights \(.*\), but its "
                                                r"quantization_config says (bitsandbytes|compressed-tensors), which "
                                                r"does not pack them so"):
        open_checkpoint(tmp_path / "q")


EXPERT = "model.layers.1.block_sparse_moe.experts.0.w1"


def _edit_quantization_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _groups_of_4(module: str):
    """Scales for groups of 4 inputs: a layout no scheme holds (groups are multiples of 8, or a whole row)."""
    def edit(t):
        rows, cols = (int(d) for d in t[f"{module}.weight_shape"])
        t[f"{module}.weight_scale"] = torch.full((rows, cols // 4), 0.01, dtype=torch.bfloat16)
    return edit


@pytest.mark.parametrize("module", [Q_PROJ, EXPERT])
def test_groups_that_no_scheme_holds_are_refused_naming_the_weight(tiny_released, tmp_path, capsys, module):
    """A scale of [128, 32] for a [128, 128] weight (groups of 4) once read as per-channel: `run` took it and
    `export-onnx` crashed or wrote a broken graph. Now refused when the folder is opened, naming the weight."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", _groups_of_4(module))
    with pytest.raises(klconvert.KLError, match=rf"{module}\.weight' is stored as int4 in groups of 4 inputs "
                                                r"without zero points, but quantization_config declares .*group_0 "
                                                r"int4 g32 sym"):
        open_checkpoint(tmp_path / "q")
    code, _, err = run_cli(capsys, "export-onnx", "--model", tmp_path / "q", "--out", tmp_path / "onnx")
    assert_one_line_error(code, err, f"{module}.weight' is stored as int4 in groups of 4 inputs")
    assert not (tmp_path / "onnx" / "genai_config.json").exists()


def _drop_zero_points(t):
    for name in [n for n in t if n.endswith(".weight_zero_point")]:
        del t[name]


@pytest.mark.parametrize("options, tensors, config, needle", [
    (dict(bits=4, symmetric=False), _drop_zero_points, None, "in groups of 32 inputs without zero points, but "
                                                             "quantization_config declares .*group_0 int4 g32 asym"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False),
     "without zero points, but quantization_config declares .*group_0 int4 g32 asym"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=64),
     "in groups of 32 inputs without zero points, but quantization_config declares .*group_0 int4 g64 sym"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=8),
     "is stored as int4 in groups of 32 inputs without zero points, but quantization_config declares .*group_0 int8"),
    (dict(bits=4), None, lambda qc: qc.pop("config_groups"), "quantization_config.config_groups is missing"),
    (dict(bits=4), None, lambda qc: [group.update(weights=None) for group in qc["config_groups"].values()],
     "quantization_config.config_groups declares no weight scheme"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=12),
     "config_groups.group_0.weights declares num_bits 4, type 'int', symmetric True, strategy 'group', group_size 12"),
    (dict(bits=4), None, lambda qc: qc["config_groups"].update(group_0=["Linear"]),   # was an AttributeError
     "quantization_config.config_groups.group_0 is not an object (targets, weights, ...)"),
    (dict(bits=8), None, lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     "quantization_config.config_groups.group_0.input_activations quantizes activations, which klconvert does not; "
     "klconvert reads pack-quantized int4 or int8 weights"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"].update(format="marlin-24"),
     "quantization_config.config_groups.group_0.format is 'marlin-24', a format klconvert does not read"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"].pop("targets"),   # was a TypeError
     "quantization_config.config_groups.group_0.targets is not a list of module names, re: patterns or 'Linear'"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"].update(targets="Linear"),   # not 6 names
     "quantization_config.config_groups.group_0.targets is not a list of module names, re: patterns or 'Linear'"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"].update(weights="int4"),   # was an AttributeError
     "quantization_config.config_groups.group_0.weights is not an object saying how the weights are stored"),
], ids=["zero-points-deleted", "declared-asym", "declared-g64", "declared-int8", "no-groups", "no-weight-scheme",
        "declared-g12", "group-not-an-object", "quantized-activations", "group-format", "no-targets",
        "targets-a-string", "weights-a-string"])
def test_stored_parts_must_be_what_quantization_config_declares(tiny_released, tmp_path, options, tensors, config,
                                                                needle):
    """A weight is read with a scheme quantization_config declares (as vLLM and transformers read it), the one whose
    parts it stores: zero points iff asymmetric, the bits, the group size; a config group klconvert cannot read is
    refused."""
    write_quantized(tiny_released, tmp_path / "q", **options)
    if tensors is not None:
        _damage(tmp_path / "q", tensors)
    if config is not None:
        _edit_quantization_config(tmp_path / "q", config)
    with pytest.raises(klconvert.KLError, match=re.escape(needle).replace(r"\.\*", ".*")):
        open_checkpoint(tmp_path / "q")


def _int_quantized(t):
    """Each packed weight as compressed-tensors' int-quantized format stores it (llm-compressor's W8A8): an int8
    `weight` beside its `weight_scale`, unpacked."""
    for module in [n.removesuffix(".weight_packed") for n in t if n.endswith(".weight_packed")]:
        rows, cols = (int(d) for d in t.pop(f"{module}.weight_shape"))
        t.pop(f"{module}.weight_packed")
        t[f"{module}.weight"] = torch.zeros(rows, cols, dtype=torch.int8)


def test_a_format_klconvert_does_not_read_is_named(tiny_released, tmp_path, capsys):
    """int-quantized weights (int8, unpacked) were called a conversion cut short (no weight_packed); the refusal names
    the format config.json declares and what klconvert reads. A mixed-precision folder of pack-quantized groups
    reads."""
    write_quantized(tiny_released, tmp_path / "q", bits=8)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(format="mixed-precision"))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()

    _damage(tmp_path / "q", _int_quantized)

    def w8a8(qc):
        qc["format"] = "int-quantized"
        for group in qc["config_groups"].values():
            group.update(format="int-quantized", input_activations={"num_bits": 8, "type": "int", "dynamic": True})
    _edit_quantization_config(tmp_path / "q", w8a8)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1")
    assert_one_line_error(code, err, "config.json: quantization_config.format is 'int-quantized', a format klconvert "
                          "does not read; klconvert reads pack-quantized int4 or int8 weights")
    assert "cut short" not in err


@pytest.mark.parametrize("top_format, said", [
    ("mixed-precision", "under the top-level format 'mixed-precision', which says each group names its own: vLLM "
                        "reads its weights as 'mixed-precision', for which it has no scheme"),
    (None, "nor does the top level: vLLM has no scheme for weights of no format"),
], ids=["mixed-precision", "no-top-level-format"])
def test_a_group_of_weights_naming_no_format_is_refused(tiny_released, tmp_path, capsys, top_format, said):
    """A group of weights that names no format, under a mixed-precision top level or none, ran, read as
    pack-quantized; vLLM reads the group as of the top-level format (or none) and has no scheme for it, so the folder
    is refused, naming the group (not group_1, which names its own)."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)

    def unnamed(qc):
        qc.pop("format")
        qc.update({} if top_format is None else {"format": top_format})
        qc["config_groups"]["group_0"].pop("format")
    _edit_quantization_config(tmp_path / "q", unnamed)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"{tmp_path / 'q'}/config.json: quantization_config.config_groups.group_0 names "
                          f"no format, {said}", 'add "format": "pack-quantized" to that group')

    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"].update(format="pack-quantized"))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


def test_parts_of_another_method_are_named_as_such(tiny_released, tmp_path):
    """NF4 parts inside a compressed-tensors folder: the config does say how weights are packed -- another way."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight.absmax", torch.zeros(4, dtype=torch.uint8)))
    with pytest.raises(klconvert.KLError, match="its quantization_config says compressed-tensors, which does not pack "
                                                "them so"):
        open_checkpoint(tmp_path / "q")


def test_read_schemes_are_the_declared_ones(tiny_released, tmp_path):
    packed = write_quantized(tiny_released, tmp_path / "q", bits=4, symmetric=False)
    sources = open_checkpoint(tmp_path / "q").sources
    assert {name: sources[name].scheme for name in packed} == {name: scheme for name, (_, scheme) in packed.items()}


def test_symmetric_omitted_is_read_as_compressed_tensors_default(tiny_released, tmp_path):
    """QuantizationArgs' symmetric defaults to True: a config that leaves it out declares a symmetric scheme."""
    packed = write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].pop("symmetric"))
    sources = open_checkpoint(tmp_path / "q").sources
    assert {name: sources[name].scheme for name in packed} == {name: scheme for name, (_, scheme) in packed.items()}
    assert all(scheme.symmetric for _, scheme in packed.values())


def test_group_size_minus_one_without_a_strategy_is_read_as_channel(tiny_released, tmp_path):
    """compressed-tensors' QuantizationArgs reads group_size -1 with no strategy as strategy channel: a per-channel
    folder whose config says it so reads as the per-channel folder it is, as transformers and vLLM read it."""
    packed = write_quantized(tiny_released, tmp_path / "q", bits=4, group_size=CHANNEL)

    def minus_one(qc):
        for group in qc["config_groups"].values():
            group["weights"].pop("strategy")
            group["weights"].update(group_size=-1)
    _edit_quantization_config(tmp_path / "q", minus_one)
    weights = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {QuantizationArgs.model_validate(g["weights"]).strategy for g in weights.values()} == {"channel"}
    sources = open_checkpoint(tmp_path / "q").sources
    assert {name: sources[name].scheme for name in packed} == {name: scheme for name, (_, scheme) in packed.items()}
    assert all(scheme.group_size == CHANNEL for _, scheme in packed.values())


@pytest.mark.parametrize("strategy", ["tensor_group", "tensor", "block"])
def test_a_group_size_under_another_strategy_than_group_is_refused(tiny_released, tmp_path, strategy):
    """Groups of 32 under strategy tensor_group (compressed-tensors' groups under one global scale, which klconvert
    does not read), tensor or block are not plain groups: refused naming the strategy, not read as strategy group."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        strategy=strategy))
    with pytest.raises(klconvert.KLError, match=rf"config_groups\.group_0\.weights declares num_bits 4, type 'int', "
                                                rf"symmetric True, strategy '{strategy}', group_size 32; klconvert "
                                                "reads pack-quantized int4 or int8 weights by group"):
        open_checkpoint(tmp_path / "q")


def _scale_at(module: str, value: float, zero_point: int | None = None):
    """The first group's scale set to `value` (and its zero point to `zero_point`, in [-8, 7], at int4)."""
    def edit(t):
        t[f"{module}.weight_scale"].view(-1)[0] = value
        if zero_point is not None:   # row 0's is the low nibble of the first word, stored as zero_point + 8
            t[f"{module}.weight_zero_point"][0, 0] = t[f"{module}.weight_zero_point"][0, 0] & ~0xF | zero_point + 8
    return edit


@pytest.mark.parametrize("options, value, zero_point", [
    (dict(bits=4), 3e38, None), (dict(bits=4), -3e38, None), (dict(bits=8), 3e36, None),
    (dict(bits=4, symmetric=False), 3e37, 7),   # codes -8 .. 7 less 7: 15 steps of 3e37 (8 steps would be finite)
    (dict(bits=4, symmetric=False), 3e37, -8),  # less -8: the top code's 15 steps (helper-124: qmax + zero passed)
], ids=["int4", "negative", "int8", "int4-asym", "int4-asym-low-zero"])
def test_scales_that_dequantize_past_the_dtype_are_refused(tiny_released, tmp_path, capsys, options, value,
                                                           zero_point):
    """A finite scale of 3e38 dequantized to infinity and `run` printed NUL bytes: now the weight is refused, named,
    when read -- dequantized, or as the packed parts Triton and the ONNX export's MatMulNBits take."""
    write_quantized(tiny_released, tmp_path / "q", **options)
    _damage(tmp_path / "q", _scale_at(Q_PROJ, value, zero_point))
    ckpt = open_checkpoint(tmp_path / "q")
    needle = rf"{Q_PROJ}\.weight: its scale -?\d\.\d+e\+3\d \(at flat index 0\) dequantizes a weight to .*, past the " \
             r"largest finite value 3\.39e\+38; the checkpoint is damaged"
    with pytest.raises(klconvert.KLError, match=needle):
        ckpt.get(f"{Q_PROJ}.weight")
    with pytest.raises(klconvert.KLError, match=needle):  # the parts the Triton kernels and the ONNX export take
        ckpt.packed(f"{Q_PROJ}.weight")
    code, out, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "The quick", "--max-new-tokens",
                             "4", "--device", "cpu")
    assert_one_line_error(code, err, f"{Q_PROJ}.weight: its scale")
    assert out == ""


@pytest.mark.parametrize("value", [0.0, -0.5, torch.finfo(torch.bfloat16).max / 8], ids=["zero", "negative", "edge"])
def test_zero_negative_and_largest_finite_scales_are_read(tiny_released, tmp_path, value):
    """A zero scale (an all-zero group) and a negative one are sound; so is one that dequantizes to bf16's largest."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", _scale_at(Q_PROJ, value))
    assert torch.isfinite(open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight")).all()


def _edit_nf4_state(module: str, edit):
    def damage(t):
        name = f"{module}.weight.quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(t[name].tolist()))
        edit(state)
        t[name] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return damage


@pytest.fixture(scope="module")
def nf4_folder(tiny_released, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "q"
    write_quantized(tiny_released, out, scheme="nf4")
    return out


def test_an_nf4_quant_state_field_bitsandbytes_does_not_know_is_refused(nf4_folder, tmp_path, capsys):
    """bitsandbytes asserts on a field it does not know: a traceback, now one line naming the weight."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _edit_nf4_state(Q_PROJ, lambda s: s.update(extra=1)))
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "The quick", "--max-new-tokens", "4",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"{Q_PROJ}.weight: NF4 quant state has fields extra beyond bitsandbytes' "
                                     "quant_type, blocksize, dtype, shape, nested_blocksize")


def _nan_as_float8(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0] = 0x7F                                # float8_e4m3fn's NaN
    return t.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("part, retype, said", [
    ("weight.absmax", lambda t: t.view(torch.int8), "NF4 quant state absmax is torch.int8, where bitsandbytes "
                                                    "writes torch.uint8"),
    ("weight.absmax", _nan_as_float8, "weight.absmax holds nan at flat index 0"),
    ("weight.nested_quant_map", lambda t: t.view(torch.int32), "NF4 quant state nested_quant_map is torch.int32, "
                                                               "where bitsandbytes writes torch.float32"),
    ("weight", lambda t: t.reshape(1, -1), "nf4 data U8 [1, 8192] does not fit its shape [128, 128]"),
    ("weight", lambda t: t.reshape(-1), "nf4 data U8 [8192] does not fit its shape [128, 128]"),
], ids=["absmax-int8", "absmax-float8", "map-int32", "weight-transposed", "weight-flat"])
def test_nf4_parts_of_another_dtype_or_layout_are_refused(nf4_folder, tmp_path, capsys, part, retype, said):
    """Sizes alone were checked: an int8 absmax or a float8 one was a traceback from bitsandbytes or torch, an int32
    code book read its bits as floats (exit 0, a wrong model), and a [1, n / 2] weight came back transposed."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, lambda t: t.update({f"{Q_PROJ}.{part}": retype(t[f"{Q_PROJ}.{part}"])}))
    code, out, err = run_cli(capsys, "run", "--model", folder, "--prompt", "The quick", "--max-new-tokens", "4",
                             "--device", "cpu")
    assert_one_line_error(code, err, said)
    assert out == ""


def test_an_nf4_quant_state_must_say_the_configs_shape(nf4_folder, tmp_path):
    """Its shape was held only to the packed size: [1, 16384] passed for a [128, 128] weight."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _edit_nf4_state(Q_PROJ, lambda s: s.update(shape=[1, s["shape"][0] * s["shape"][1]])))
    ckpt = open_checkpoint(folder)
    name = f"{Q_PROJ}.weight"
    with pytest.raises(klconvert.KLError, match=rf"{name}: NF4 quant state says shape \[1, 16384\], but config\.json "
                                                r"makes the weight \[128, 128\]"):
        ckpt.get(name)


def _nf4_as_floats(src_folder, module: str):
    """`module`'s weight stored as the source's floats, its NF4 data and quant state gone."""
    def edit(t):
        for name in [n for n in t if n.startswith(f"{module}.weight")]:
            del t[name]
        t[f"{module}.weight"] = open_checkpoint(src_folder).get(f"{module}.weight")
    return edit


def _skip(*entries):
    return lambda qc: qc["llm_int8_skip_modules"].extend(entries)


def test_a_float_weight_that_bitsandbytes_declares_4bit_is_refused(nf4_folder, tiny_released, tmp_path, capsys):
    """A bitsandbytes folder holding a weight as floats that its skip list does not list ran, read as floats, where
    transformers builds a Linear4bit for it and looks for its NF4 quant state: only compressed-tensors configs were
    asked what they declare. Refused naming the tensor and the module to list."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _nf4_as_floats(tiny_released, Q_PROJ))
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {folder}/model.safetensors: tensor '{Q_PROJ}.weight' is stored as floats, but "
        "quantization_config (bitsandbytes) declares it 4-bit NF4 (quantization_config.llm_int8_skip_modules does not "
        f"list it): transformers would look for its NF4 quant state and find none -- add '{Q_PROJ}' (or a "
        "pattern for every such module) to quantization_config.llm_int8_skip_modules, or quantize the model again "
        "with `klconvert quantize --scheme nf4`")
    with pytest.raises(klconvert.KLError, match=re.escape(f"tensor '{Q_PROJ}.weight' is stored as floats, but "
                                                          "quantization_config (bitsandbytes) declares it 4-bit")):
        klconvert.load(folder, device="cpu", max_context=64)


@pytest.mark.parametrize("edit, needle", [
    # transformers' should_convert_module: a pattern matches to a module boundary, and so does not skip q_proj
    (_skip(r"model\.layers\.1\.self_attn\.q_pro"), f"tensor '{Q_PROJ}.weight' is stored as floats, but "
                                                    "quantization_config (bitsandbytes) declares it 4-bit NF4"),
    # a null list skips transformers' default, lm_head, alone: the KDA projections the policy keeps are 4-bit
    (lambda qc: qc.update(llm_int8_skip_modules=None),
     "tensor 'model.layers.0.self_attn.f_b_proj.weight' is stored as floats, but quantization_config (bitsandbytes) "
     "declares it 4-bit NF4 (quantization_config gives no llm_int8_skip_modules, so transformers keeps only lm_head "
     "out of 4-bit)"),
    (lambda qc: qc.update(llm_int8_skip_modules="lm_head"),
     "config.json: quantization_config.llm_int8_skip_modules is 'lm_head', not a list of module names or patterns"),
    (_skip("(q_proj"), "config.json: quantization_config.llm_int8_skip_modules[4] '(q_proj' as transformers matches "
                       "it: 're:(?:(q_proj)"),
], ids=["pattern-to-a-boundary", "null-list", "not-a-list", "no-pattern"])
def test_a_bitsandbytes_skip_list_is_read_as_transformers_reads_it(nf4_folder, tiny_released, tmp_path, capsys,
                                                                    edit, needle):
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _nf4_as_floats(tiny_released, Q_PROJ))
    _edit_quantization_config(folder, edit)
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu")
    assert_one_line_error(code, err, needle)


LAYER_1_ATTENTION = r".*\.1\.self_attn"   # a parent module: all of layer 1's projections are kept out of 4-bit


@pytest.mark.parametrize("entry", [r"model\.layers\.1\.self_attn\.q_proj", LAYER_1_ATTENTION,
                                   "layers.1.self_attn.q_proj"], ids=["pattern", "pattern-of-a-parent", "suffix"])
def test_float_weights_a_bitsandbytes_skip_list_lists_are_read(nf4_folder, tiny_released, tmp_path, entry):
    """transformers' should_convert_module: a pattern from the name's start to a module boundary, or a suffix."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _nf4_as_floats(tiny_released, Q_PROJ))
    if entry == LAYER_1_ATTENTION:
        for projection in ("k_proj", "v_proj", "b_proj", "f_a_proj", "o_proj"):
            _damage(folder, _nf4_as_floats(tiny_released, f"model.layers.1.self_attn.{projection}"))
    _edit_quantization_config(folder, _skip(entry))
    assert torch.equal(open_checkpoint(folder).get(f"{Q_PROJ}.weight"),
                       open_checkpoint(tiny_released).get(f"{Q_PROJ}.weight"))


def test_nf4_weights_a_bitsandbytes_skip_list_lists_are_refused(nf4_folder, tmp_path, capsys):
    """An NF4 weight its config keeps out of 4-bit ran, dequantized, where transformers builds an unquantized Linear
    for it and finds 4-bit data."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _edit_quantization_config(folder, _skip(Q_PROJ))
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {folder}: quantized weight '{Q_PROJ}.weight' is stored as NF4, but "
        f"quantization_config.llm_int8_skip_modules lists it ('{Q_PROJ}'): transformers builds it as an unquantized "
        "Linear and finds no float weight to load -- the folder does not match its config.json; re-run the conversion "
        "if klconvert wrote it, or download it again")


def test_nf4_data_without_its_quant_state_is_named_so(nf4_folder, tmp_path, capsys):
    """NF4 data whose quant state tensors were all gone was called a float tensor of the wrong dtype ('has dtype U8,
    expected one of ...; not a Kimi Linear one')."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, lambda t: [t.pop(name) for name in list(t) if name.startswith(f"{Q_PROJ}.weight.")])
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {folder}: quantized weight '{Q_PROJ}.weight' lacks weight.absmax, weight.quant_map, "
        "weight.quant_state.bitsandbytes__nf4; the folder is incomplete -- re-run the conversion if klconvert wrote "
        "it, or download it again")


FP8_KV_CACHE = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


@pytest.mark.parametrize("edit", [lambda qc: qc.update(kv_cache_scheme=FP8_KV_CACHE),
                                  lambda qc: qc.update(kv_cache_scheme=FP8_KV_CACHE, config_groups={})],
                         ids=["beside-weights", "alone"])
def test_a_quantized_kv_cache_is_refused_by_name(tiny_released, tmp_path, capsys, edit):
    """A KV cache the source was calibrated to hold quantized (llm-compressor's kv_cache_scheme, fp8 scales beside
    the attention) ran unquantized here -- another model than the one calibrated -- unmentioned; a config of that
    alone was called one that declares no weight scheme."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1")
    assert_one_line_error(code, err, "q/config.json: quantization_config.kv_cache_scheme quantizes the KV cache "
                          "(num_bits 8, type 'float'), which klconvert does not",
                          "quantize the model again with `klconvert quantize`")


def test_a_kv_cache_scheme_of_compressed_tensors_defaults_is_refused(tiny_released, tmp_path):
    """kv_cache_scheme {} is not the null of no KV cache quantization: compressed-tensors reads it as QuantizationArgs'
    defaults, a KV cache held in int8, which klconvert would run in the model's dtype unmentioned."""
    assert QuantizationArgs.model_validate({}).num_bits == 8
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(kv_cache_scheme={}))
    with pytest.raises(klconvert.KLError, match=r"q/config\.json: quantization_config\.kv_cache_scheme quantizes "
                                                "the KV cache"):
        open_checkpoint(tmp_path / "q")


# transformers 5's BitsAndBytesConfig(load_in_8bit=True).to_dict(), as save_pretrained writes it into config.json
LLM_INT8_CONFIG = {"quant_method": "bitsandbytes", "_load_in_8bit": True, "_load_in_4bit": False,
                   "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
                   "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                   "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8", "load_in_4bit": False,
                   "load_in_8bit": True}


def write_llm_int8(src_folder, out, quantization_config):
    """An 8-bit copy of `src_folder` as transformers saves a model loaded with load_in_8bit=True (bitsandbytes'
    Linear8bitLt._save_to_state_dict): each linear NF4 would quantize becomes an int8 `weight`, its fp32 row scales
    `SCB` and a uint8 scalar `weight_format` (0: row-major). quantization_config None leaves config.json without one."""
    src = open_checkpoint(src_folder)
    policy = policy_from_options(scheme="nf4").check_against([(n, s.shape) for n, s in src.expected.items()])
    tensors = {}
    for name, spec in src.expected.items():
        w = src.get(name)
        if policy.scheme_for(name, spec.shape) is None:
            tensors[name] = w
            continue
        module = name.removesuffix(".weight")
        scales = w.float().abs().amax(dim=1).clamp(min=1e-8)
        tensors[name] = torch.round(w.float() / scales[:, None] * 127).to(torch.int8)
        tensors[f"{module}.SCB"] = scales
        tensors[f"{module}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_folder / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    for f in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(src_folder / f, out / f)


LLM_INT8 = "bitsandbytes 8-bit (LLM.int8) checkpoints are not supported"


@pytest.mark.parametrize("command", ["run", "quantize"])
def test_a_bitsandbytes_8bit_checkpoint_is_named_as_such(tiny_released, tmp_path, capsys, command):
    """A load_in_8bit folder (int8 weights, SCB, weight_format) was refused as one whose config.json "does not belong
    to these weights": now it is named for what it is, with the forms klconvert does read."""
    write_llm_int8(tiny_released, tmp_path / "q8", LLM_INT8_CONFIG)
    args = {"run": ("run", "--model", tmp_path / "q8", "--prompt", "hi", "--max-new-tokens", "1"),
            "quantize": ("quantize", tmp_path / "q8", tmp_path / "out", "--group-size", "32")}
    code, _, err = run_cli(capsys, *args[command], "--device", "cpu")
    assert_one_line_error(code, err, "q8/config.json: quantization_config.load_in_8bit is true: " + LLM_INT8,
                          "give the bf16 release (or its 4-bit NF4 form")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("declared", [None, policy_from_options(scheme="nf4").quantization_config()],
                         ids=["no-quantization-config", "nf4-config"])
def test_bitsandbytes_8bit_tensors_are_named_whatever_config_json_says(tiny_released, tmp_path, capsys, declared):
    """Without the config that says 8-bit, its tensors say it: the int8 weights were "damaged or not a Kimi Linear
    checkpoint", or under an NF4 config "no tensor here is stored packed"."""
    write_llm_int8(tiny_released, tmp_path / "q8", declared)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q8", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    line = assert_one_line_error(code, err, "q8/model.safetensors: tensor 'model.layers.", f".SCB': {LLM_INT8}")
    assert "damaged" not in line and "does not belong" not in line


@pytest.mark.parametrize("says_fp4", [True, False], ids=["config-says-fp4", "config-says-nf4"])
def test_a_bitsandbytes_fp4_checkpoint_is_named_as_such(tiny_released, tmp_path, capsys, says_fp4):
    """bitsandbytes' other 4-bit type (transformers' default bnb_4bit_quant_type, fp4) was taken for an NF4 folder
    cut short ("lacks ...quant_state.bitsandbytes__nf4"): its config, or else its quant states, name it."""
    write_quantized(tiny_released, tmp_path / "fp4", scheme="nf4")
    shard = tmp_path / "fp4" / "model.safetensors"
    save_file({n.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): t for n, t in load_file(shard).items()}, shard,
              metadata={"format": "pt"})
    if says_fp4:
        _edit_quantization_config(tmp_path / "fp4", lambda qc: qc.update(bnb_4bit_quant_type="fp4"))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "fp4", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    where = ("fp4/config.json: quantization_config.bnb_4bit_quant_type is 'fp4'" if says_fp4 else
             "fp4/model.safetensors: tensor 'model.layers.")
    assert_one_line_error(code, err, where, "bitsandbytes 4-bit FP4 checkpoints are not supported",
                          "klconvert reads bitsandbytes' 4-bit NF4 only")


# compressed-tensors' TransformConfig.model_dump() (0.20.1) of llm-compressor's QuIP rotations: `v` rotates each
# Linear's inputs online and fuses the inverse into its weight; `u` fuses into the weight and undoes it online
QUIP = {"config_groups": {
    "v": {"type": "hadamard", "apply": [
        {"targets": ["Linear"], "location": "weight_input", "inverse": True, "ignore": ["lm_head"]},
        {"targets": ["Linear"], "location": "input", "inverse": False, "ignore": ["lm_head"]}],
        "randomize": True, "requires_grad": False, "head_dim": None, "precision": "torch.float32"},
}}
# SpinQuant's R1 alone: every rotation fused into the weights (offline), nothing for a runtime to apply
FUSED_R1 = {"config_groups": {
    "R1": {"type": "hadamard", "apply": [
        {"targets": ["embed_tokens", "o_proj"], "location": "weight_output", "inverse": False, "ignore": []},
        {"targets": ["q_proj", "lm_head"], "location": "weight_input", "inverse": True, "ignore": []}],
        "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32"},
}}
# an older compressed-tensors' Sparse24BitMaskConfig.model_dump(), and the dense form of one (weights stored as is)
SPARSE_24 = {"format": "sparse-24-bitmask", "global_sparsity": 0.45, "ignore": ["lm_head"],
             "registry_requires_subclass": False, "sparsity_structure": "2:4", "targets": ["Linear"]}
DENSE_SPARSITY = {**SPARSE_24, "format": "dense"}


@pytest.mark.parametrize("field, content, needle", [
    ("transform_config", QUIP, "quantization_config.transform_config.config_groups.v.apply[1] applies a 'hadamard' "
                               "transform online (location 'input', at run time), which klconvert does not"),
    ("transform_config", {"config_groups": {"v": {"type": "hadamard", "apply": [{"location": "k_cache"}]}}},
     "quantization_config.transform_config.config_groups.v.apply[0] applies a 'hadamard' transform online "
     "(location 'k_cache'"),
    ("transform_config", {"rotations": ["R1"]}, "quantization_config.transform_config is not compressed-tensors' "
                                                "TransformConfig"),
    ("transform_config", {"config_groups": {"v": {"type": "hadamard", "apply": [{"targets": ["Linear"]}]}}},
     "quantization_config.transform_config is not compressed-tensors' TransformConfig"),
    ("sparsity_config", SPARSE_24, "quantization_config.sparsity_config stores weights sparse (format "
                                   "'sparse-24-bitmask'), which klconvert does not read"),
    ("sparsity_config", ["2:4"], "quantization_config.sparsity_config is not compressed-tensors' sparsity config"),
], ids=["quip-online", "k-cache", "transforms-malformed", "apply-without-location", "sparse-24-bitmask",
        "sparsity-malformed"])
def test_transforms_and_sparsity_klconvert_would_not_apply_are_refused(tiny_released, tmp_path, capsys, field,
                                                                       content, needle):
    """A compressed-tensors source whose config declares rotations applied at run time (QuIP, SpinQuant's R3/R4) or
    weights stored sparse was read as if it declared none: it ran another model than the one quantized."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update({field: content}))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"q/config.json: {needle}", "quantize again without")


def test_experts_pruned_or_merged_are_refused_by_name(tiny_released, tmp_path, capsys):
    """compressed-tensors 0.20's moe_sparsity_config (experts pruned by REAP or merged, per layer) declares another
    expert set than config.json's: named, not found missing tensor by tensor."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(moe_sparsity_config={"layers": {"1": [0, 3]}}))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, "q/config.json: quantization_config.moe_sparsity_config declares experts pruned "
                          "or merged, which klconvert does not read")


@pytest.mark.parametrize("field, content", [
    ("transform_config", None), ("transform_config", {}), ("transform_config", {"config_groups": {}}),
    ("transform_config", FUSED_R1), ("transform_config", {"config_groups": {"v": {"type": "hadamard", "apply": []}}}),
    ("transform_config", {"config_groups": {"v": {"type": "hadamard"}}}),   # compressed-tensors' default: apply []
    ("sparsity_config", None), ("sparsity_config", {}), ("sparsity_config", DENSE_SPARSITY),
], ids=["transforms-null", "transforms-empty", "no-transform-groups", "fused-only", "applied-nowhere",
        "apply-left-out", "sparsity-null", "sparsity-empty", "dense-sparsity"])
def test_transforms_fused_into_the_weights_and_dense_sparsity_are_read(tiny_released, tmp_path, field, content):
    """What changes nothing at run time is read: no transforms, rotations already fused into the weights (their
    every location weight_input or weight_output), a sparsity config whose weights are stored dense."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update({field: content}))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


GROUP_ACT_ORDER = "GPTQ activation ordering by group"


@pytest.mark.parametrize("actorder", ["group", "dynamic", "Group", True])
def test_act_order_by_group_is_refused_by_name(tiny_released, tmp_path, capsys, actorder):
    """llm-compressor's actorder "group" ("dynamic" its alias; True once meant it) stores each weight with a group index
    per input column (weight_g_idx) that klconvert does not read: the folder was refused as one whose int32 g_idx was
    a damaged float tensor. Now the config names it, with what to do."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        actorder=actorder))
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight_g_idx", torch.arange(128, dtype=torch.int32)
                                                    // 32))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    line = assert_one_line_error(code, err, "q/config.json: quantization_config.config_groups.group_0.weights."
                                 f"actorder is {actorder!r}: {GROUP_ACT_ORDER}", "weight_g_idx",
                                 "actorder null or 'weight'", "give the bf16 release to `klconvert quantize`")
    assert "damaged" not in line


def test_an_act_order_group_index_is_refused_whatever_config_json_says(tiny_released, tmp_path, capsys):
    """A weight_g_idx beside the packed weight under a config that declares no act order: named by the tensor."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", lambda t: t.__setitem__(f"{Q_PROJ}.weight_g_idx", torch.arange(128, dtype=torch.int32)
                                                    // 32))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    line = assert_one_line_error(code, err, f"q/model.safetensors: tensor '{Q_PROJ}.weight_g_idx': {GROUP_ACT_ORDER}",
                                 "give the bf16 release to `klconvert quantize`")
    assert "damaged" not in line and "dtype I32" not in line


@pytest.mark.parametrize("actorder", [None, False, "weight", "static"])
def test_act_order_by_weight_is_read(tiny_released, tmp_path, actorder):
    """actorder "weight" ("static" its alias) orders GPTQ's calibration only: the weight is stored in plain groups,
    with no group index, and reads as any other."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        actorder=actorder))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


@pytest.mark.parametrize("dynamic", [True, "local", "false", 0])
def test_weights_quantized_dynamically_are_refused(tiny_released, tmp_path, dynamic):
    """`dynamic` weights have their scales computed at run time (compressed-tensors registers none, vLLM takes no such
    weight scheme): the folder was read with the scales stored beside them. Only false (the default) is read."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        dynamic=dynamic))
    said = re.escape(repr(dynamic))
    with pytest.raises(klconvert.KLError, match=rf"config_groups\.group_0\.weights\.dynamic is {said}: weights whose "
                                                r"scales are computed at run time"):
        open_checkpoint(tmp_path / "q")
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        dynamic=False))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


def test_an_act_order_compressed_tensors_does_not_define_is_refused(tiny_released, tmp_path):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"]["group_0"]["weights"].update(
        actorder="sideways"))
    with pytest.raises(klconvert.KLError, match=r"config_groups\.group_0\.weights\.actorder is 'sideways', not an "
                                                r"activation ordering compressed-tensors defines"):
        open_checkpoint(tmp_path / "q")


def _drop_zero_point(module: str):
    return lambda t: t.pop(f"{module}.weight_zero_point")


def test_a_weight_is_held_to_the_group_that_targets_it(tiny_released, tmp_path, capsys):
    """An asymmetric int8 folder (group_0: Linear, int8 asym) missing one weight's zero points matched lm_head's group
    (int8 sym) by its parts and ran, dequantized about the wrong zero: KL 48x worse. The weight is held to group_0,
    whose target selects it, and refused naming the group and the part."""
    write_quantized(tiny_released, tmp_path / "q", bits=8, symmetric=False)
    _damage(tmp_path / "q", _drop_zero_point(Q_PROJ))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"quantized weight '{Q_PROJ}.weight' is stored as int8 in groups of 32 inputs "
                          "without zero points, but quantization_config declares group_0 int8 g32 asym for it "
                          "(its target 'Linear' selects it): it lacks weight_zero_point",
                          "the folder does not match its config.json")


@pytest.mark.parametrize("edit, needle", [
    # a name target wins over "Linear", whatever group lists it
    (lambda qc: qc["config_groups"].update(group_9={"targets": [Q_PROJ], "weights": {**qc["config_groups"][
        "group_0"]["weights"], "num_bits": 8}, "format": "pack-quantized"}),
     f"declares group_9 int8 g32 sym for it (its target '{Q_PROJ}' selects it)"),
    # a name target wins over a re: target of a group declaring the same weights (one of another scheme is refused:
    # test_name_targets_of_groups_declaring_other_weights_are_refused)
    (lambda qc: qc["config_groups"].update(
        group_8={"targets": [Q_PROJ], "weights": {**qc["config_groups"]["group_0"]["weights"], "num_bits": 8}},
        group_9={"targets": [r"re:.*\.1\.self_attn\.q_proj$"],
                 "weights": {**qc["config_groups"]["group_0"]["weights"], "num_bits": 8}}),
     f"declares group_8 int8 g32 sym for it (its target '{Q_PROJ}' selects it)"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False),
     "declares group_0 int4 g32 asym for it (its target 'Linear' selects it): it lacks weight_zero_point"),
    (lambda qc: qc["ignore"].append(Q_PROJ), f"but quantization_config.ignore lists it ('{Q_PROJ}')"),
    (lambda qc: qc["config_groups"]["group_0"].update(targets=["re:.*experts.*"]),
     "but no config group of quantization_config targets it"),
    # two groups name one target: the later one holds it, as compressed-tensors and vLLM read the config
    (lambda qc: qc["config_groups"].update(none={"targets": ["Linear"], "weights": None}),
     "but config group none, whose target 'Linear' selects it, quantizes no weights"),
], ids=["name-target-wins", "name-beats-re", "declared-asym", "ignored", "targeted-by-none", "later-group-wins"])
def test_a_weight_whose_group_declares_otherwise_is_refused_naming_it(tiny_released, tmp_path, edit, needle):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    with pytest.raises(klconvert.KLError, match=re.escape(needle)):
        open_checkpoint(tmp_path / "q")


@pytest.mark.parametrize("listed_first, storing_group_adds", [
    (r"re:.*layers\.1\.self_attn\.q_proj$", r"re:.*\.1\.self_attn\.q_proj$"),
    (r"re:.*layers\.1\.self_attn\.q_proj$", Q_PROJ),
], ids=["two-patterns", "pattern-then-name"])
def test_name_targets_of_groups_declaring_other_weights_are_refused(tiny_released, tmp_path, capsys, listed_first,
                                                                    storing_group_adds):
    """A module selected by the name targets of an int8 group listed first and of the int4 group that stores it ran,
    read as int4 (compressed-tensors' order: exact names, then re: patterns, sorted), where vLLM reads it as int8 (the
    first listed). Refused as a recipe is; groups declaring the same weights read it alike and stay read."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)

    def add_group(weights):
        def edit(qc):
            int4 = qc["config_groups"]["group_0"]
            int4["targets"].append(storing_group_adds)
            qc["config_groups"] = {"group_8": {**int4, "targets": [listed_first], "weights": weights(int4)},
                                   **qc["config_groups"]}
        return edit

    folder = shutil.copytree(tmp_path / "q", tmp_path / "same")
    _edit_quantization_config(folder, add_group(lambda int4: int4["weights"]))
    assert open_checkpoint(folder).get(f"{Q_PROJ}.weight").isfinite().all()
    _edit_quantization_config(tmp_path / "q", add_group(lambda int4: {**int4["weights"], "num_bits": 8}))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    line = assert_one_line_error(code, err, f"{Q_PROJ} is selected by ", "runtimes disagree on which wins -- keep it "
                                 "in one group's targets", "or quantize the model again with `klconvert quantize`")
    assert "of group_8 (" in line and "of group_0 (" in line and "config_groups.group_0.targets[1]" in line, line


F_B_PROJ = "model.layers.0.self_attn.f_b_proj"  # kept as floats by the default policy (defaults.KEEP)


def _unignore(pattern: str):
    """quantization_config.ignore without its entries naming `pattern` (every entry, for "")."""
    return lambda qc: qc.update(ignore=[e for e in qc["ignore"] if pattern not in e] if pattern else [])


@pytest.mark.parametrize("edit", [_unignore("f_b|g_a|g_b"), _unignore("")], ids=["kda-entry-dropped", "no-ignore"])
def test_a_float_weight_that_a_packed_group_selects_is_refused(tiny_released, tmp_path, capsys, edit):
    """h180's F1: with quantization_config.ignore (or its f_b|g_a|g_b entry) gone, the folder ran, its float f_b_proj
    read as floats, where transformers found no weight_packed for it and initialised one at random (vLLM, which
    builds f_b_proj with the config's scheme, looks for it too). Refused naming the tensor, the group and target."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {tmp_path / 'q'}/model.safetensors: tensor '{F_B_PROJ}.weight' is stored as floats, but "
        "config group group_0 of quantization_config, whose target 'Linear' selects it, declares it packed (int4 g32 "
        "sym, pack-quantized) and ignore does not list it: transformers and vLLM would look for its weight_packed and "
        f"weight_scale and find none -- add '{F_B_PROJ}' (or a re: pattern for every such module) to "
        "quantization_config.ignore, or quantize the model again with `klconvert quantize`")
    with pytest.raises(klconvert.KLError, match=re.escape(f"tensor '{F_B_PROJ}.weight' is stored as floats, but "
                                                          "config group group_0")):
        klconvert.load(tmp_path / "q", device="cpu", max_context=64)


def test_a_float_weight_ignore_lists_by_its_name_in_memory_only_is_refused_for_vllm(tiny_released, tmp_path, capsys):
    """h197's F7: a recipe's ignore entry may name a module as transformers holds it in memory (llm-compressor
    matches those), but quantization_config.ignore is matched against the names the folder holds, as vLLM matches it:
    refused, saying so, where the refusal said transformers would look for packed parts it does not."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(ignore=[
        *(e for e in qc["ignore"] if "f_b|g_a|g_b" not in e), "re:.*\\.(g_a|g_b)_proj$",
        "re:.*\\.forget_gate\\.f_b_proj$"]))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {tmp_path / 'q'}/model.safetensors: tensor '{F_B_PROJ}.weight' is stored as floats, but "
        "config group group_0 of quantization_config, whose target 'Linear' selects it, declares it packed (int4 g32 "
        "sym, pack-quantized) and ignore lists it only by another layout's name ('re:.*\\\\.forget_gate\\\\.f_b_proj$' "
        "lists 'model.layers.0.self_attn.forget_gate.f_b_proj'), which vLLM does not match: it matches the names the "
        f"folder holds, and would look for its weight_packed and weight_scale and find none -- add '{F_B_PROJ}' (or a "
        "re: pattern for every such module) to quantization_config.ignore, or quantize the model again with "
        "`klconvert quantize`")


SMALL_KDA = r"re:.*\.(f_b|g_a|g_b)_proj$"  # the ignore entry of the KDA projections the default policy keeps


@pytest.mark.parametrize("unignored, group", [
    # the router and the convs: vLLM builds them unquantized whatever the config says, transformers' are no Linear
    ("gate", None),
    ("conv1d", None),
    # a group that quantizes no weights, or stores its weights as plain floats, holds the KDA projections as floats
    ("f_b|g_a|g_b", {"targets": [SMALL_KDA], "weights": None}),
    ("f_b|g_a|g_b", {"targets": [SMALL_KDA], "format": "dense", "weights": {"num_bits": 4, "group_size": 32}}),
], ids=["router", "convs", "weights-null", "dense"])
def test_float_weights_that_no_packed_group_holds_are_read(tiny_released, tmp_path, unignored, group):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", _unignore(unignored))
    if group is not None:
        _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"].update(floats=group))
    assert open_checkpoint(tmp_path / "q").get(f"{F_B_PROJ}.weight").isfinite().all()


def _experts_stacked_as_floats(src_folder, layer: int):
    """Layer `layer`'s routed experts as transformers 5 stores the MoE, in place of their packed per-expert tensors:
    floats, stacked into mlp.experts.gate_up_proj [experts, 2 x I, H] (w1 over w3) and down_proj [experts, H, I]."""
    src = open_checkpoint(src_folder)
    experts, prefix = range(src.config.num_experts), f"model.layers.{layer}.block_sparse_moe.experts"

    def edit(t):
        for name in [n for n in t if n.startswith(prefix + ".")]:
            del t[name]
        t[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([src.get(f"{prefix}.{e}.w1.weight"), src.get(f"{prefix}.{e}.w3.weight")]) for e in experts])
        t[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([src.get(f"{prefix}.{e}.w2.weight")
                                                                        for e in experts])
    return edit


def _experts_as_floats(src_folder, layer: int):
    """Layer `layer`'s routed experts stored as the source's per-expert floats, their NF4 data and quant states gone."""
    prefix = f"model.layers.{layer}.block_sparse_moe.experts."
    src = open_checkpoint(src_folder)

    def edit(t):
        for name in [n for n in t if n.startswith(prefix)]:
            del t[name]
        t.update({name: src.get(name) for name in src.expected if name.startswith(prefix)})
    return edit


@pytest.mark.parametrize("store", [_experts_stacked_as_floats, _experts_as_floats], ids=["stacked", "per-expert"])
def test_routed_experts_as_floats_under_bitsandbytes_are_read(nf4_folder, tiny_released, tmp_path, store):
    """transformers never makes a Linear4bit of a routed expert (KimiLinearExperts holds them as 3-D parameters, no
    nn.Linear) and saves them as floats whatever llm_int8_skip_modules says: a folder it wrote itself was refused as
    floats that quantization_config declares 4-bit NF4."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, store(tiny_released, 1))
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    assert torch.equal(open_checkpoint(folder).get(name), open_checkpoint(tiny_released).get(name))


def test_nf4_routed_experts_a_bitsandbytes_skip_list_names_are_read(nf4_folder, tmp_path):
    """The skip list says nothing of the routed experts, which transformers never converts: an entry naming them kept
    klconvert's own NF4 experts from running ('is stored as NF4, but quantization_config.llm_int8_skip_modules lists
    it')."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _edit_quantization_config(folder, _skip(r".*\.experts\.\d+\.w[123]"))
    name = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    assert torch.equal(open_checkpoint(folder).get(name), open_checkpoint(nf4_folder).get(name))


SHARED = "model.layers.1.block_sparse_moe.shared_experts"   # as released; transformers' in memory: mlp.shared_experts


def _shared_experts_as_floats(src_folder):
    def edit(t):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            _nf4_as_floats(src_folder, f"{SHARED}.{projection}")(t)
    return edit


def test_a_bitsandbytes_skip_list_is_matched_against_transformers_in_memory_names(nf4_folder, tiny_released,
                                                                                   tmp_path, capsys):
    """transformers matches llm_int8_skip_modules against the names its load gives the modules
    (model.layers.1.mlp.shared_experts), not the released ones the folder holds: an entry naming the shared experts
    as transformers does was refused as not listing them, and one naming them as released was taken, where
    transformers builds them as Linear4bit and finds no quant state."""
    folder = shutil.copytree(nf4_folder, tmp_path / "q")
    _damage(folder, _shared_experts_as_floats(tiny_released))
    _edit_quantization_config(folder, _skip(SHARED))
    code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1", "--device",
                           "cpu")
    assert_one_line_error(code, err, f"tensor '{SHARED}.down_proj.weight' is stored as floats, but quantization_config "
                          "(bitsandbytes) declares it 4-bit NF4 (quantization_config.llm_int8_skip_modules does not "
                          "list it): transformers would look for its NF4 quant state and find none -- add "
                          "'model.layers.1.mlp.shared_experts.down_proj' (or a pattern")
    _edit_quantization_config(folder, lambda qc: qc.update(llm_int8_skip_modules=[
        *qc["llm_int8_skip_modules"][:-1], "model.layers.1.mlp.shared_experts"]))
    name = f"{SHARED}.gate_proj.weight"
    assert torch.equal(open_checkpoint(folder).get(name), open_checkpoint(tiny_released).get(name))


@pytest.mark.parametrize("ignored", [None, r"re:.*\.mlp\.experts\..*"], ids=["unlisted", "ignored-as-held"])
def test_experts_stacked_as_floats_are_read_whatever_the_config_declares(tiny_released, tmp_path, ignored):
    """Routed experts stored as transformers' 3-D float stacks under a config whose "Linear" group declares int4 were
    refused ('transformers and vLLM would look for each one's weight_packed'), and an ignore entry naming the stack as
    the folder holds it was refused again (h203's F1): transformers 5.25 loads such a folder with the stacks as the
    floats they are (compressed-tensors quantizes only nn.Linear and nn.Embedding modules; its experts module is
    neither), and vLLM 0.33 loads no transformers-layout folder. They are read as the floats they hold."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _damage(tmp_path / "q", _experts_stacked_as_floats(tiny_released, 1))
    if ignored is not None:
        _edit_quantization_config(tmp_path / "q", lambda qc: qc["ignore"].append(ignored))
    w2 = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    assert torch.equal(open_checkpoint(tmp_path / "q").get(w2), open_checkpoint(tiny_released).get(w2))
    klconvert.load(tmp_path / "q", device="cpu", max_context=64)


def test_a_float_weight_two_groups_name_is_told_to_be_ignored(tiny_released, tmp_path, capsys):
    """A float weight that the name targets of an int4 and an int8 group both select was told to stay in the group
    "whose scheme its packed tensors are stored with": it has none. The line says it is stored as floats and to list
    it in ignore."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)

    def two_groups(qc):
        _unignore("f_b|g_a|g_b")(qc)
        int4 = qc["config_groups"]["group_0"]
        int4["targets"].append(SMALL_KDA)
        qc["config_groups"]["group_8"] = {**int4, "targets": [F_B_PROJ], "weights": {**int4["weights"], "num_bits": 8}}
    _edit_quantization_config(tmp_path / "q", two_groups)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {F_B_PROJ} is selected by '{F_B_PROJ}' of group_8 ({tmp_path / 'q'}/config.json: "
        f"quantization_config.config_groups.group_8.targets[0]) and by {SMALL_KDA!r} of group_0 ({tmp_path / 'q'}"
        "/config.json: quantization_config.config_groups.group_0.targets[1]); runtimes disagree on which wins -- it is "
        f"stored as floats: add '{F_B_PROJ}' to quantization_config.ignore, or quantize the model again with "
        "`klconvert quantize`")


def test_an_extra_zero_point_is_named(tiny_released, tmp_path):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    write_quantized(tiny_released, tmp_path / "asym", bits=4, symmetric=False)
    zero_points = {n: t for n, t in load_file(tmp_path / "asym" / "model.safetensors").items()
                   if n == f"{Q_PROJ}.weight_zero_point"}
    _damage(tmp_path / "q", lambda t: t.update(zero_points))
    with pytest.raises(klconvert.KLError, match=re.escape(
            f"{Q_PROJ}.weight' is stored as int4 in groups of 32 inputs with zero points, but quantization_config "
            "declares group_0 int4 g32 sym for it (its target 'Linear' selects it): it holds a weight_zero_point, "
            "which a symmetric scheme has none of")):
        open_checkpoint(tmp_path / "q")


def test_hostile_target_patterns_are_refused_in_one_line_in_bounded_time(tiny_released, tmp_path, capsys,
                                                                         monkeypatch):
    """The groups' targets and ignore list are regular expressions from the download, run over each packed weight's
    name as compressed-tensors runs them: one that does not compile (or nests 499 deep: RecursionError) is refused
    naming where it is, one that backtracks without end stops at the matching budget, a group of no weight scheme that
    selects no packed weight declares nothing to hold them to."""
    import time

    import klconvert.quant.policy as policy_module

    # seven .* before four backreferences (tests/quant/test_policy_regex_bounds.py): seconds a name
    backtracking = r"re:(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6\5\4[Q-Z]"

    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["config_groups"].update(
        no_weights={"targets": ["re:.*\\.nothing$"], "weights": None, "input_activations": None}))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()
    for pattern, needle in [("re:(", "is not a valid regular expression"),
                            ("re:" + "(" * 499 + "x" + ")" * 499, "is not a valid regular expression"),
                            (backtracking, "backtracks without end")]:
        folder = shutil.copytree(tmp_path / "q", tmp_path / f"q{len(pattern)}")
        _edit_quantization_config(folder, lambda qc: qc["ignore"].append(pattern))
        monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.2)
        start = time.perf_counter()
        code, _, err = run_cli(capsys, "run", "--model", folder, "--prompt", "hi", "--max-new-tokens", "1",
                               "--device", "cpu")
        line = assert_one_line_error(code, err, f"{folder}/config.json: quantization_config.ignore[3]: ", needle)
        assert "recipe" not in line and "YAML" not in line
        assert time.perf_counter() - start < 30


def test_a_config_of_more_entries_than_a_policy_needs_is_refused_before_they_are_read(tiny_released, tmp_path,
                                                                                      capsys):
    """A download's config.json may hold millions of ignore entries (32 MiB of them), each tried on every packed
    weight's name: refused by count, as a recipe's are."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc["ignore"].extend(f"x{i}" for i in range(1000)))
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, f"{tmp_path / 'q'}/config.json: quantization_config.config_groups and ignore "
                                     "hold 1,005 target and ignore entries, past the 1,000 a quantizer writes")


@pytest.mark.parametrize("edit, field", [
    (lambda qc: [g.update(format="dense") for g in [qc, *qc["config_groups"].values()]], "config_groups.group_"),
    (lambda qc: [qc.update(format="dense")] + [g.pop("format") for g in qc["config_groups"].values()], "format"),
    (lambda qc: qc["config_groups"]["group_0"].update(format="dense"), "config_groups.group_0"),
], ids=["everywhere", "top-level-alone", "one-group"])
def test_a_dense_format_over_packed_weights_is_refused(tiny_released, tmp_path, capsys, edit, field):
    """The mirror of a packed config over float weights: `format: dense` (weights stored as plain floats) over
    pack-quantized tensors ran, where vLLM and transformers would read them as the floats they are not."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert_one_line_error(code, err, "quantized weight '", ".weight' is stored packed (pack-quantized), "
                          f"but quantization_config.{field}", "format is 'dense' (weights stored as plain floats)",
                          "the folder does not match its config.json")


def test_a_groups_own_format_wins_over_the_top_level_one(tiny_released, tmp_path):
    """As vLLM reads it: a group's format, where it names one, is its weights'; the top-level one only stands in."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(format="dense"))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


def _packed_by_name(module: str, kind: str):
    """`module`'s float weight stored packed as `kind` (int8 g32 sym, or nf4) and, for int, a config group that targets
    it by name (and out of ignore, which lists the router): a folder consistent in every other way."""
    from klconvert.quant import QuantScheme

    def edit_tensors(t):
        weight = t.pop(f"{module}.weight")
        t.update(compress_nf4(module, weight) if kind == "nf4" else compress_weight(module, weight, QuantScheme(8, 32)))

    def edit_config(qc):
        if kind != "nf4":
            qc["config_groups"]["group_9"] = {**qc["config_groups"]["group_0"], "targets": [module]}
            qc["ignore"] = [entry for entry in qc["ignore"] if not entry.endswith(r"\.gate$")]
    return edit_tensors, edit_config


@pytest.mark.parametrize("module, what", [("model.embed_tokens", "the token embedding"),
                                          ("model.layers.1.block_sparse_moe.gate", "the MoE router")])
@pytest.mark.parametrize("options", [dict(bits=8), dict(scheme="nf4")], ids=["int8", "nf4"])
def test_a_packed_embedding_or_router_is_refused_by_name(tiny_released, tmp_path, capsys, module, what, options):
    """The embedding and the router stay in high precision: vLLM builds both unquantized (a packed one it cannot load)
    and no recipe packs them. Stored packed, `run` read them dequantized on either path, but export-onnx wrote them
    as zeros (the graph's placeholders for packed weights); every command refuses them now, naming the weight."""
    write_quantized(tiny_released, tmp_path / "q", **options)
    edit_tensors, edit_config = _packed_by_name(module, options.get("scheme", "int"))
    _damage(tmp_path / "q", edit_tensors)
    _edit_quantization_config(tmp_path / "q", edit_config)
    needles = (f"quantized weight '{module}.weight' is stored packed, but it is {what}, which Kimi Linear keeps in "
               "high precision", "vLLM builds it unquantized")
    for command in (("run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"),
                    ("export-onnx", "--model", tmp_path / "q", "--out", tmp_path / "onnx")):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("how", ["replaced", "rewritten in place", "removed"])
def test_a_shard_changed_after_the_folder_was_opened_is_refused(tiny_released, tmp_path, how):
    """helper-106's race: `quantize OUT --force` (int8) replaced OUT's shard while `run --model OUT` had read its
    int4 headers; the new words were decoded by the old scheme, and run printed garbage with exit status 0."""
    import os

    from klconvert.errors import KLError

    packed = write_quantized(tiny_released, tmp_path / "q4", bits=4)
    write_quantized(tiny_released, tmp_path / "q8", bits=8)
    ckpt = open_checkpoint(tmp_path / "q4")
    shard, other = tmp_path / "q4" / "model.safetensors", tmp_path / "q8" / "model.safetensors"
    if how == "replaced":
        os.replace(shutil.copy(other, tmp_path / "new"), shard)
    elif how == "removed":
        shard.unlink()
    else:
        shard.write_bytes(other.read_bytes())
    with pytest.raises(KLError, match=r"model.safetensors: the shard changed after this command opened the folder"):
        ckpt.get(next(iter(packed)))


CUT_SHORT_AFTER_A_READ = """
import os, sys
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.errors import KLError
ckpt = open_checkpoint(sys.argv[1])
shard = max(ckpt.headers, key=lambda s: len(ckpt.headers[s].tensors))
header = ckpt.headers[shard]
first, last = (min(header.tensors, key=lambda n: header.tensors[n].begin * sign) for sign in (1, -1))
ckpt.get(first)
os.truncate(ckpt.folder / shard, header.data_start + header.tensors[last].begin)
try:
    ckpt.get(last)
except KLError as e:
    print(e)
"""


def test_a_shard_cut_short_after_a_read_from_it_is_one_line(tiny_released, tmp_path):
    """A shard truncated while its folder is open (a copy or download restarted over it): safetensors had mapped it
    at the first read, and a read past its new end killed the command with SIGBUS (exit status 135, no line)."""
    import subprocess
    import sys

    src = shutil.copytree(tiny_released, tmp_path / "src")
    done = subprocess.run([sys.executable, "-c", CUT_SHORT_AFTER_A_READ, str(src)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert re.fullmatch(rf"{re.escape(str(src))}/model-\d+-of-\d+\.safetensors: the shard changed after this "
                        r"command opened the folder .*\n", done.stdout), done.stdout


@pytest.mark.parametrize("mtime", ["moved", "kept"])
@pytest.mark.parametrize("command", ["quantize", "export-onnx", "run"])
def test_a_shard_rewritten_in_place_while_read_is_refused_before_the_result(tiny_released, tmp_path, capsys,
                                                                             monkeypatch, command, mtime):
    """helper-139: `cp OTHER/shard SRC/shard` (the same inode, other bytes, a new mtime) while quantize read SRC gave
    an OUT made of old and new weights, with exit status 0: the identity check ran only as a shard was (re)opened.
    Every shard read from is checked again before the result is written whole (or printed)."""
    import os
    import time

    from klconvert.checkpoint.reader import Checkpoint

    src = shutil.copytree(tiny_released, tmp_path / "src")
    read, rewritten = Checkpoint._read, []

    def read_then_rewrite(self, shard, name, index=()):
        tensor = read(self, shard, name, index)
        if not rewritten:   # after the first tensor, the shard still open: its tail rewritten, as `cp` over it does
            path = self.folder / shard
            found = path.stat()
            time.sleep(0.05)   # past the kernel's coarse clock, which stamps the inode's change time
            with open(path, "r+b") as f:
                f.seek(-2, os.SEEK_END)
                f.write(b"\0\0")
            # moved: as cp leaves it; kept: as `touch -r` sets it back (helper-155), seen by the change time alone
            os.utime(path, ns=(found.st_atime_ns, found.st_mtime_ns + (10**9 if mtime == "moved" else 0)))
            rewritten.append(shard)
        return tensor

    monkeypatch.setattr(Checkpoint, "_read", read_then_rewrite)
    out = tmp_path / "out"
    args = {"quantize": ("quantize", src, out, "--bits", "8"),
            "export-onnx": ("export-onnx", "--model", src, "--out", out),
            "run": ("run", "--model", src, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu")}[command]
    code, stdout, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, f"{src / rewritten[0]}: the shard changed after this command opened the folder")
    assert stdout == "" and not out.exists() and not (tmp_path / "out.partial").exists()


ARGS_KEYS = ("num_bits, type, symmetric, group_size, strategy, block_structure, dynamic, actorder, scale_dtype, "
             "zp_dtype, observer, observer_kwargs")
REFUSED_BY_COMPRESSED_TENSORS = ("so transformers and vLLM refuse the config -- correct it, or quantize the model "
                                 "again with `klconvert quantize`")


def _renamed(key: str, to: str):
    def edit(qc):
        weights = qc["config_groups"]["group_0"]["weights"]
        weights[to] = weights.pop(key)
    return edit


CT = "compressed-tensors 0.20.1's"   # the version whose validator the table states


@pytest.mark.parametrize("edit, said", [
    (_renamed("dynamic", "DYNAMIC"), f"config_groups.group_0.weights.DYNAMIC is a key {CT} QuantizationArgs does not "
     f"define (it has {ARGS_KEYS}), so transformers and vLLM refuse the config -- correct or remove it, or quantize "
     "the model again with `klconvert quantize`"),
    (_renamed("type", "typex"), f"config_groups.group_0.weights.typex is a key {CT} QuantizationArgs does not define "
     f"(it has {ARGS_KEYS}), so transformers and vLLM refuse the config -- correct or remove it, or quantize the "
     "model again with `klconvert quantize`"),
    (lambda qc: qc["config_groups"]["group_0"].update({"input-activations": None}),
     f"config_groups.group_0.input-activations is a key {CT} QuantizationScheme does not define (it has targets, "
     "weights, input_activations, output_activations, format), so transformers and vLLM refuse the config -- correct "
     "or remove it, or quantize the model again with `klconvert quantize`"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(observer=4294967296),
     f"config_groups.group_0.weights.observer is 4294967296, not a string or null as {CT} QuantizationArgs requires, "
     f"{REFUSED_BY_COMPRESSED_TENSORS}"),
    (lambda qc: qc.update(quantization_status="packed"), "quantization_status is 'packed', not one of initialized, "
     f"calibration, frozen, compressed, decompressed as {CT} QuantizationConfig requires, "
     f"{REFUSED_BY_COMPRESSED_TENSORS}"),
    (lambda qc: qc.update(global_compression_ratio={}), "global_compression_ratio is {}, not a number or null as "
     f"{CT} QuantizationConfig requires, {REFUSED_BY_COMPRESSED_TENSORS}"),
    (lambda qc: qc.update(global_compression_ratio="\u0663"), "global_compression_ratio is '\u0663', not a number or "
     f"null as {CT} QuantizationConfig requires, {REFUSED_BY_COMPRESSED_TENSORS}"),
    (lambda qc: qc.update(global_compression_ratio=10 ** 400), "global_compression_ratio is an integer of 401 digits, "
     f"not a number or null as {CT} QuantizationConfig requires, {REFUSED_BY_COMPRESSED_TENSORS}"),
], ids=["DYNAMIC", "typex", "input-activations", "observer-int", "status", "ratio-object", "ratio-arabic-digit",
        "ratio-past-float"])
def test_a_config_compressed_tensors_refuses_is_refused_naming_the_key(tiny_released, tmp_path, capsys, edit, said):
    """compressed-tensors' validator (QuantizationConfig.model_validate, run by transformers and vLLM as they load a
    folder) refuses a key its QuantizationScheme or QuantizationArgs does not define, and a value of a type a field
    does not take; klconvert took the default for the key it did not find and ran the folder (h180's F7)."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    with pytest.raises(ValueError):   # pydantic's ValidationError: the folder is one transformers cannot load
        QuantizationConfig.model_validate(config["quantization_config"])
    line = f"{tmp_path / 'q'}/config.json: quantization_config.{said}"
    with pytest.raises(klconvert.KLError) as refused:
        klconvert.load(tmp_path / "q", device="cpu", max_context=64)
    assert str(refused.value) == line
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert code == 2 and shown_lines(err) == [f"klconvert: error: {line}"], err


@pytest.mark.parametrize("edit", [
    lambda qc: qc.update(global_compression_ratio="1.5", version=3, notes={}),
    lambda qc: qc.update(global_compression_ratio=True),
    lambda qc: qc["config_groups"]["group_0"]["weights"].update(observer=None, observer_kwargs={}, scale_dtype=None,
                                                               zp_dtype="torch.int8", block_structure=None),
], ids=["ratio-text-unknown-top-level", "ratio-bool", "args-defaults"])
def test_a_config_compressed_tensors_takes_is_read(tiny_released, tmp_path, edit):
    """What compressed-tensors' validator takes is read: a top-level key it does not define (it ignores them: its
    writer puts version and sparsity_config there), a ratio as text or true (pydantic's lax float), null fields."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", edit)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    QuantizationConfig.model_validate(config["quantization_config"])
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


@pytest.mark.parametrize("status", ["frozen", "initialized", "decompressed", None])
def test_packed_weights_under_another_status_than_compressed_are_refused(tiny_released, tmp_path, capsys, status):
    """compressed-tensors' validator takes any of its statuses, but transformers 5.25 builds the packed layout only
    under "compressed" (quantizer_compressed_tensors.py: compress_model when is_quantization_compressed): under
    another it initialised each packed module's weight at random and dropped its weight_packed as unexpected, where
    klconvert ran the folder without a word (h203's F3). An absent status is compressed-tensors' "initialized"."""
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(quantization_status=status) if status else
                              qc.pop("quantization_status"))
    said = f"quantization_status is '{status}'" if status else \
        "has no quantization_status (compressed-tensors reads 'initialized')"
    code, _, err = run_cli(capsys, "run", "--model", tmp_path / "q", "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {tmp_path / 'q'}/config.json: quantization_config {said}, but the folder holds packed "
        "weights ('lm_head.weight_packed'): transformers builds their packed layout only under "
        "'compressed', and under any other status would run those weights at random values -- set "
        "quantization_status to 'compressed'")
    _edit_quantization_config(tmp_path / "q", lambda qc: qc.update(quantization_status="compressed"))
    assert open_checkpoint(tmp_path / "q").get(f"{Q_PROJ}.weight").isfinite().all()


def _under_two_names(t):
    """EXPERT's packed parts also under the per-expert name transformers uses for it (gate_proj for w1)."""
    for part in ("weight_packed", "weight_scale", "weight_shape"):
        t[f"{EXPERT.removesuffix('.w1')}.gate_proj.{part}"] = t[f"{EXPERT}.{part}"].clone()


def _a_row_short(name: str):
    return lambda t: t.__setitem__(name, t[name][:-1].clone())


@pytest.mark.parametrize("options, edit_tensors, edit_config, said", [
    (dict(bits=4), _under_two_names, None,
     "quantized weight 'model.layers.1.block_sparse_moe.experts.0.w1.weight' and "
     "'model.layers.1.block_sparse_moe.experts.0.gate_proj.weight' both provide "
     "model.layers.1.block_sparse_moe.experts.0.w1.weight; the checkpoint holds one weight under two layouts' names "
     "-- keep one"),
    (dict(bits=4), _a_row_short(f"{Q_PROJ}.weight_packed"), None,
     f"quantized weight '{Q_PROJ}.weight': packed tensors I32 [127, 16] / scale BF16 [128, 4] do not fit its shape "
     "[128, 128]; re-run the conversion if klconvert wrote it, or download it again"),
    (dict(bits=4), _a_row_short(f"{Q_PROJ}.weight_scale"), None,
     f"quantized weight '{Q_PROJ}.weight': packed tensors I32 [128, 16] / scale BF16 [127, 4] do not fit its shape "
     "[128, 128]; re-run the conversion if klconvert wrote it, or download it again"),
    (dict(bits=4, symmetric=False), _a_row_short(f"{Q_PROJ}.weight_zero_point"), None,
     f"quantized weight '{Q_PROJ}.weight': weight_zero_point I32 [15, 4] does not fit its scale [128, 4] at 4 bits; "
     "re-run the conversion if klconvert wrote it, or download it again"),
    (dict(bits=4), None, lambda qc: qc["config_groups"]["group_0"].update(format="dense"),
     "quantized weight 'model.layers.0.mlp.down_proj.weight' is stored packed (pack-quantized), but "
     "quantization_config.config_groups.group_0.format is 'dense' (weights stored as plain floats): vLLM and "
     "transformers would look for its float weight and find none -- the folder does not match its config.json; put "
     "back the one its weights came with (format 'pack-quantized')"),
], ids=["two-names", "packed-shape", "scale-shape", "zero-point-shape", "dense"])
def test_a_damaged_quantized_folder_is_one_whole_line_and_nothing_is_written(tiny_released, tmp_path, capsys, options,
                                                                             edit_tensors, edit_config, said):
    """h182's item 7: reading refusals no test quoted whole; export-onnx, which writes a folder, leaves none."""
    write_quantized(tiny_released, tmp_path / "q", **options)
    if edit_tensors is not None:
        _damage(tmp_path / "q", edit_tensors)
    if edit_config is not None:
        _edit_quantization_config(tmp_path / "q", edit_config)
    code, out, err = run_cli(capsys, "export-onnx", "--model", tmp_path / "q", "--out", tmp_path / "onnx")
    assert assert_one_line_error(code, err) == f"klconvert: error: {tmp_path / 'q'}: {said}"
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
