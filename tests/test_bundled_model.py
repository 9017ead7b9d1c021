"""The bundled model (klconvert/bundled/, `--model tiny`): its files match the recorded checksums, its shape is
the released structure at small size, its greedy continuation, held-out perplexity and int4 KL match what
tools/record_bundled.py recorded, and every verb takes it by name."""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import record_bundled  # noqa: E402
import train_bundled  # noqa: E402

from klconvert.checkpoint.name_map import expected_tensors  # noqa: E402
from klconvert.checkpoint.reader import Checkpoint  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.convert.output_folder import RESUME_RECORD, partial_path  # noqa: E402
from klconvert.evaluate import _perplexity, run_model  # noqa: E402
from klconvert.models import BUNDLED_DIR, DEFAULT_MODEL_DIR  # noqa: E402
from klconvert.quantize import RESUME_FORMAT  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402
from testkit import assert_one_line_error, run_cli, shown_lines  # noqa: E402

RECORDED = json.loads(record_bundled.RECORDED.read_text())
MAX_BYTES = 25 * 10**6


def test_files_match_the_recorded_checksums():
    assert record_bundled.file_checksums() == RECORDED["files"]


def test_config_is_the_one_train_bundled_writes():
    """tools/train_bundled.py's BUNDLED_CONFIG (its token ids among it, built from the special-token table) is the
    committed config.json, byte for byte: a retrain writes the same file."""
    assert (BUNDLED_DIR / "config.json").read_text() == json.dumps(train_bundled.BUNDLED_CONFIG, indent=2) + "\n"


def test_released_structure_at_small_size():
    c = KimiLinearConfig.from_file(BUNDLED_DIR / "config.json")
    assert c.first_k_dense_replace == 1 and c.num_shared_experts == 1 and c.num_experts_per_token < c.num_experts
    assert len(c.full_attn_layers) >= 2 and len(c.kda_layers) == 3 * len(c.full_attn_layers)
    assert all(layer % 4 == 3 for layer in c.full_attn_layers[:-1])
    assert c.full_attn_layers[-1] == c.num_hidden_layers - 1
    for spec in expected_tensors(c).values():      # every linear input a multiple of the int kernels' 128
        if len(spec.shape) == 2 and not spec.name.endswith(("embed_tokens.weight", ".gate.weight")):
            assert spec.shape[1] % 128 == 0, spec
    assert set(Checkpoint(BUNDLED_DIR).sources) == set(expected_tensors(c))
    assert sum(p.stat().st_size for p in BUNDLED_DIR.iterdir()) <= MAX_BYTES


def bundled_column() -> dict[str, str]:
    """The README's bundled-model table, the bundled column's cell by row name."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    head = readme.index("| | bundled | released 48B |")
    rows = {}
    for line in readme[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def test_the_readmes_table_is_the_bundled_folder():
    """Each figure of the README's bundled column, recomputed from the folder's config.json, tiktoken.model, tensors
    and files."""
    c = KimiLinearConfig.from_file(BUNDLED_DIR / "config.json")
    stored = json.loads((BUNDLED_DIR / "config.json").read_text())
    kinds = ["KDA" if c.is_kda(layer) else "MLA" for layer in range(c.num_hidden_layers)]
    pattern = ", ".join(kind + (f" x{n}" if n > 1 else "")
                        for kind, n in ((kind, len(list(run))) for kind, run in itertools.groupby(kinds)))
    kda = stored["linear_attn_config"]
    ranks = len((BUNDLED_DIR / "tiktoken.model").read_text().splitlines())
    checkpoint = Checkpoint(BUNDLED_DIR)
    parameters = sum(math.prod(spec.shape) for spec in expected_tensors(c).values())
    fp32 = {name.rsplit(".", 1)[-1] for name, source in checkpoint.sources.items() if source.dtype != "BF16"}
    assert fp32 == {"A_log", "dt_bias", "e_score_correction_bias"} and stored["moe_router_activation_func"] == "sigmoid"
    shards = [p for p in BUNDLED_DIR.iterdir() if p.suffix == ".safetensors"]
    on_disk = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir())
    dense = range(c.first_k_dense_replace)
    assert bundled_column() == {
        "layers": f"{c.num_hidden_layers}: {pattern} (`full_attn_layers` {kda['full_attn_layers']})",
        "hidden": str(c.hidden_size),
        "KDA": f"{kda['num_heads']} heads x {kda['head_dim']}, short conv {kda['short_conv_kernel_size']}",
        "MLA (NoPE)": f"{c.num_attention_heads} heads, q/k {c.qk_nope_head_dim} + {c.qk_rope_head_dim} shared, "
                      f"v {c.v_head_dim}, `kv_lora_rank` {c.kv_lora_rank}",
        "FFN": f"layer {dense[-1]} dense ({c.intermediate_size}); layers {len(dense)}-{c.num_hidden_layers - 1} MoE: "
               f"{c.num_experts} experts of {c.moe_intermediate_size}, top {c.num_experts_per_token}, sigmoid + "
               f"correction bias, {c.num_shared_experts} shared expert",
        "vocabulary": f"{ranks:,} BPE ranks + {c.vocab_size - ranks} reserved specials",
        "parameters, on disk": f"{parameters / 1e6:.2f} M, {on_disk / 1e6:.1f} MB (bf16; A_log, dt_bias, correction "
                               f"biases fp32), {len(shards)} shards"}


def test_tokenizer_is_the_release_format_and_round_trips():
    tokenizer = Tokenizer.from_folder(BUNDLED_DIR)
    c = KimiLinearConfig.from_file(BUNDLED_DIR / "config.json")
    assert tokenizer.vocab_size == c.vocab_size
    assert tokenizer.bos_id == c.bos_token_id == c.vocab_size - 256     # specials reserved after the BPE ranks
    assert tokenizer.special_tokens["<|im_end|>"] in c.eos_token_ids
    assert tokenizer.special_tokens["[PAD]"] == c.pad_token_id
    text = record_bundled.held_out_text()[:20_000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(text) / len(ids) > 2.5     # BPE merges, not bytes
    chat = tokenizer.encode_chat([{"role": "user", "content": "Speak."}])
    assert chat[0] == tokenizer.special_tokens["<|im_system|>"]


def test_greedy_continuation_is_the_recorded_one():
    assert record_bundled.greedy_continuation() == RECORDED["greedy_ids"]


@pytest.fixture(scope="module")
def int4_result():
    return record_bundled.int4_eval(tokens=RECORDED["held_out_tokens"])


def test_held_out_perplexity_under_the_recorded_bound(int4_result):
    assert int4_result.tokens == RECORDED["held_out_tokens"]
    assert int4_result.reference_perplexity <= RECORDED["perplexity_bound"]
    assert math.isclose(int4_result.reference_perplexity, RECORDED["perplexity"], rel_tol=0.01)


def test_int4_kl_under_the_recorded_bound(int4_result):
    """Within 1% of the recorded KL (record_bundled.KL_SLACK): the bound was 1.5x it plus 0.001, which a 50% worse
    quantization passed."""
    assert 0 < int4_result.kl_mean <= RECORDED["int4_kl_bound"]
    assert math.isclose(int4_result.kl_mean, RECORDED["int4_kl_mean"], rel_tol=record_bundled.KL_SLACK - 1)


def readme_reference_perplexity() -> tuple[int, float]:
    """(held-out tokens, the bf16 model's perplexity over them) as the README's quality table states them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    stated = re.search(r"Held-out: ([\d,]+) tokens of the test split; reference bf16 perplexity ([\d.]+)\.", readme)
    return int(stated[1].replace(",", "")), float(stated[2])


@pytest.mark.slow
def test_held_out_perplexity_is_the_one_the_readme_states():
    """A floor record_bundled.py does not move: every value it records follows the weights it is run on, a 1-step
    run's too; the README's table states the bf16 model's perplexity over the test split's first 20,480 tokens (its
    other figures are measured against it), and a retrained model is a new table (about 90 s here on one core)."""
    tokens, stated = readme_reference_perplexity()
    ids = Tokenizer.from_folder(BUNDLED_DIR).encode(record_bundled.held_out_text())[:tokens]
    perplexity = _perplexity(run_model(BUNDLED_DIR, ids, "cpu", "float32").log_probs, ids)
    assert len(ids) == tokens and math.isclose(perplexity, stated, rel_tol=1e-3), (perplexity, stated)


def test_quantizes_output_is_the_one_recorded_with_its_resume_format():
    """A rerun resumes an interrupted quantize by keeping its finished shards where the record (RESUME_FORMAT among
    it) is the same: a change to quantize's output that left RESUME_FORMAT as it was would put old shards beside new
    ones (helper-165). Every version so far writes the recorded tensors, at RESUME_FORMAT 1."""
    hashes = record_bundled.quantized_tensors_sha256()
    assert hashes == RECORDED["quantized_tensors_sha256"] or RESUME_FORMAT != RECORDED["resume_format"], (
        f"quantize's output of the bundled model changed ({hashes}, recorded {RECORDED['quantized_tensors_sha256']} "
        f"at RESUME_FORMAT {RECORDED['resume_format']}): raise RESUME_FORMAT in klconvert/quantize.py, so that no "
        "rerun keeps an older run's shards, then run tools/record_bundled.py to record the new tensors with it")
    assert (hashes, RESUME_FORMAT) == (RECORDED["quantized_tensors_sha256"], RECORDED["resume_format"]), (
        f"RESUME_FORMAT is {RESUME_FORMAT}, recorded {RECORDED['resume_format']}: run tools/record_bundled.py to "
        "record quantize's output with it")


def test_run_without_model_runs_the_bundled_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)        # no ./Kimi-Linear-48B-A3B-Instruct-w4a16 here
    (tmp_path / "prompt.txt").write_text(RECORDED["prompt"])
    code, out, err = run_cli(capsys, "run", "--prompt-file", "prompt.txt", "--max-new-tokens", "8", "--device", "cpu")
    assert code == 0, err
    assert shown_lines(err)[0].startswith(f"klconvert: no {DEFAULT_MODEL_DIR} here: running the bundled model")
    tokenizer = Tokenizer.from_folder(BUNDLED_DIR)
    assert out == tokenizer.decode(RECORDED["greedy_ids"][:8]) + "\n"


@pytest.mark.parametrize("partial", ["a quantize's", "the user's"])
def test_run_without_model_names_a_quantize_into_the_48b_folder_not_finished(tmp_path, monkeypatch, capsys, partial):
    """A quantize into the 48B folder that has not finished (running, or stopped) leaves its .partial beside it: the
    line saying the bundled model runs told to make the 48B one with pull-and-quantize, as if none were begun (h191's
    brief); a folder of that name holding no resume record is no quantize's."""
    monkeypatch.chdir(tmp_path)
    partial_folder = partial_path(Path(DEFAULT_MODEL_DIR))
    partial_folder.mkdir()
    (partial_folder / (RESUME_RECORD if partial == "a quantize's" else "notes.txt")).write_text('{"source": {}}')
    code, _, err = run_cli(capsys, "run", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert code == 0, err
    said = shown_lines(err)[0]
    assert said.startswith(f"klconvert: no {DEFAULT_MODEL_DIR} here: running the bundled model"), said
    unfinished = (f"a quantize into the 48B one has not finished ({partial_folder}: running now, or stopped -- rerun "
                  "the same command to finish it)")
    assert said.endswith(unfinished if partial == "a quantize's" else "`klconvert pull-and-quantize --bits 4` makes "
                         "the 48B one"), said


def test_run_without_model_runs_the_48b_folder_when_it_is_here(tiny_released, tmp_path, monkeypatch, capsys):
    """README: no --model runs ./Kimi-Linear-48B-A3B-Instruct-w4a16 (where `pull-and-quantize --bits 4` writes) when
    it exists, saying so on stderr -- here the tiny random checkpoint under that name, whose continuation is not the
    bundled model's."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_released, tmp_path / Path(DEFAULT_MODEL_DIR).name)
    (tmp_path / "prompt.txt").write_text(RECORDED["prompt"])
    args = ("run", "--prompt-file", "prompt.txt", "--max-new-tokens", "8", "--device", "cpu")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert shown_lines(err)[0] == f"klconvert: running {DEFAULT_MODEL_DIR} (pass --model to choose another)"
    continuations = {name: run_cli(capsys, *args, "--model", name)[1] for name in (DEFAULT_MODEL_DIR, "tiny")}
    assert out == continuations[DEFAULT_MODEL_DIR] != continuations["tiny"]


@pytest.mark.parametrize("kind", ["file", "link to nothing"])
@pytest.mark.parametrize("verb", ["run", "export-onnx"])
def test_a_default_model_name_that_is_no_folder_is_refused_not_passed_over(tmp_path, monkeypatch, capsys, kind, verb):
    """A file of that name, or a link to a folder that is not there (a disk not mounted), was taken for no 48B folder:
    the bundled model ran instead, said only in a note."""
    monkeypatch.chdir(tmp_path)
    default, target = Path(DEFAULT_MODEL_DIR), tmp_path / "unmounted" / "Kimi-Linear-48B-A3B-Instruct-w4a16"
    if kind == "file":
        default.write_text("not a model")
    else:
        default.symlink_to(target)
    (tmp_path / "prompt.txt").write_text("hi")
    args = ["--prompt-file", "prompt.txt", "--max-new-tokens", "2", "--device", "cpu"] if verb == "run" else \
        ["--out", "onnx"]
    code, _, err = run_cli(capsys, verb, *args)
    what = "is a file, not a folder" if kind == "file" else f"is a link to {target}, which does not exist"
    assert_one_line_error(code, err, f"{DEFAULT_MODEL_DIR}: {what}", "pass --model")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("held", [[], ["model.safetensors.index.json"]])
@pytest.mark.parametrize("verb", ["run", "export-onnx"])
def test_a_default_model_folder_without_config_names_no_model_flag(tmp_path, monkeypatch, capsys, held, verb):
    """An empty (or half-copied) folder of that name was refused as "no config.json here; point --model at a Kimi
    Linear checkpoint folder" (h182): --model, never given, blamed; the line says which folder it is instead."""
    monkeypatch.chdir(tmp_path)
    Path(DEFAULT_MODEL_DIR).mkdir()
    for name in held:
        (Path(DEFAULT_MODEL_DIR) / name).write_text("{}")
    args = ["--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"] if verb == "run" else ["--out", "onnx"]
    code, _, err = run_cli(capsys, verb, *args)
    assert_one_line_error(code, err, f"{DEFAULT_MODEL_DIR}: holds no config.json -- the 48B folder used when no "
                          "--model is given; pass --model DIR, or --model tiny for the bundled model")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("dropped, said, verb", [
    (["tiktoken.model"], "not tiktoken.model --", "run"),   # export-onnx copies a tokenizer only where it is there
    *((dropped, said, verb) for dropped, said in [
        (["model-0000[24]-*"], "not model-00002-of-00004.safetensors, model-00004-of-00004.safetensors --"),
        (["model*"], "not model.safetensors.index.json or model.safetensors --")] for verb in ["run", "export-onnx"]),
], ids=["tokenizer-run", "shard-run", "shard-export-onnx", "weights-run", "weights-export-onnx"])
def test_a_half_copied_default_model_folder_says_what_it_lacks(tiny_released, tmp_path, monkeypatch, capsys, dropped,
                                                               said, verb):
    """A default folder holding config.json but not the rest was read as a checkpoint, and refused by the first
    reader to miss a file: "name a Kimi Linear checkpoint folder, or re-download the model" (h188), "pull the model
    again" -- no word of the folder taken without --model, nor of finishing or removing it."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_released, Path(DEFAULT_MODEL_DIR))
    for pattern in dropped:
        for path in Path(DEFAULT_MODEL_DIR).glob(pattern):
            path.unlink()
    args = ["--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"] if verb == "run" else ["--out", "onnx"]
    code, _, err = run_cli(capsys, verb, *args)
    assert_one_line_error(code, err, f"{DEFAULT_MODEL_DIR}: holds config.json but {said} the 48B folder used when no "
                          "--model is given is not whole", "finish copying it, or remove it", "pass --model DIR")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_a_default_folder_of_weights_alone_exports(tiny_released, tmp_path, monkeypatch, capsys):
    """export-onnx takes a folder of weights alone (it copies a tokenizer only where there is one): the default 48B
    folder so made was refused as a copy cut short (h197)."""
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_released, Path(DEFAULT_MODEL_DIR))
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (Path(DEFAULT_MODEL_DIR) / name).unlink()
    code, out, err = run_cli(capsys, "export-onnx", "--out", "onnx")
    assert code == 0 and out == "onnx\n", err


@pytest.mark.parametrize("args", [
    ["run", "--prompt", "hi", "--prompt-file", "prompt.txt"],
    ["run", "--device", "cuda", "--prompt", "hi"],      # on a machine without CUDA (made so below)
    ["run"],
    ["run", "--seed", "5", "--prompt", "hi"],
    ["export-onnx", "--out", "taken"],
])
def test_a_refusal_without_model_is_its_error_line_alone(tmp_path, monkeypatch, capsys, args):
    """The line saying the bundled model runs came first, before the options were checked: two lines."""
    monkeypatch.chdir(tmp_path)        # no ./Kimi-Linear-48B-A3B-Instruct-w4a16 here
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "prompt.txt").write_text(RECORDED["prompt"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(shown_lines(err)) == 1 and shown_lines(err)[0].startswith("klconvert: error: "), err


@pytest.mark.slow
def test_export_without_model_says_it_exported_the_bundled_one(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "export-onnx", "--out", "onnx")
    assert code == 0 and out == "onnx\n", err
    assert shown_lines(err)[0].startswith(f"klconvert: no {DEFAULT_MODEL_DIR} here: exported the bundled model "
                                          "`tiny`"), err


def test_a_bundled_model_missing_from_the_install_names_no_flag_a_verb_lacks(tmp_path, monkeypatch, capsys):
    """quantize takes SRC, not --model: the advice fits every verb that takes `tiny`."""
    monkeypatch.setattr("klconvert.models.BUNDLED_DIR", tmp_path / "gone")
    line = assert_one_line_error(*run_cli(capsys, "quantize", "tiny", tmp_path / "q")[::2],
                                 "the bundled model's files are missing from this install", "reinstall klconvert")
    assert "--model" not in line


@pytest.mark.slow
def test_tiny_names_it_for_quantize_pull_and_quantize_eval_and_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "pull-and-quantize", "--model", "tiny", "--device", "cpu")
    assert code == 0, err
    assert out == "tiny-w4a16\n" and Checkpoint(tmp_path / "tiny-w4a16").quant_method
    code, out, err = run_cli(capsys, "quantize", "tiny", "int8", "--bits", "8", "--device", "cpu")
    assert code == 0 and out == "int8\n", err
    (tmp_path / "text.txt").write_text(record_bundled.held_out_text()[:2000])
    code, out, err = run_cli(capsys, "eval", "--model", "tiny-w4a16", "--reference", "tiny", "--text-file",
                             "text.txt", "--max-tokens", "256", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("tiny-w4a16 against tiny\n") and "KL(reference || model)" in out   # the names typed
    code, out, err = run_cli(capsys, "plan", "--model", "tiny", "--max-context", "4096")
    assert code == 0 and out.startswith("Memory plan for tiny: "), err   # the name typed, as eval's


def test_tiny_is_a_name_and_anything_else_a_path(tmp_path, monkeypatch):
    from klconvert.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()                      # a folder of that name is reached as ./tiny
    assert resolve_model("tiny") == BUNDLED_DIR and resolve_model("./tiny") == Path("./tiny")
    assert resolve_model(Path("./tiny")) == Path("tiny")     # a Path is a path: Path("./tiny") prints as "tiny"
