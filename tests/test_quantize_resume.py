"""An interrupted conversion resumes from its finished shards; --force replaces OUT or starts over."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tracemalloc

import pytest

from klconvert.checkpoint.safetensors_header import read_header
from klconvert.convert.output_folder import OUTPUT_RECORD, OutputFolder
from klconvert.hex_digests import HASH_CHUNK_BYTES
from klconvert.errors import KLError
from klconvert.hub import LOCAL_DIR_RECORD
from klconvert.quantize import quantize
from quantize_helpers import break_shard_write, count_quantize_calls, folder_files, modules_in_shards
from testkit import assert_one_line_error, run_cli, shown_lines

OPTIONS = dict(bits=4, group_size=32, max_shard_bytes=150_000, progress=False)


def shard_files(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_released, tmp_path_factory):
    """The folder a run that was never interrupted writes, to compare resumed runs with."""
    return quantize(tiny_released, tmp_path_factory.mktemp("fresh") / "q", **OPTIONS).path


@pytest.mark.slow
def test_disk_full_then_resume_redoes_only_unfinished_shards(tiny_released, uninterrupted, tmp_path, monkeypatch):
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    names = shard_files(uninterrupted)
    assert len(names) >= 5
    with monkeypatch.context() as m:
        break_shard_write(m, 3, OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(KLError, match=rf"disk full writing .*q\.partial/{names[2]} \(.* to write, .* free\); .* "
                                          rf"then rerun \(the same command resumes: 2 shards of {len(names)} "
                                          r"finished in .*q\.partial"):
            quantize(tiny_released, out, **OPTIONS)
    assert not out.exists()
    assert shard_files(partial) == names[:2] and not list(partial.glob("*.partial"))

    calls = count_quantize_calls(monkeypatch)
    result = quantize(tiny_released, out, **OPTIONS)
    assert result.shards_resumed == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(calls) == modules_in_shards(index, set(names[2:]))  # each module made once, only those left
    assert folder_files(out) == folder_files(uninterrupted)
    assert not partial.exists()


def test_running_out_of_memory_mid_run_says_what_is_kept_and_that_a_rerun_resumes(tiny_released, tmp_path, capsys,
                                                                                    monkeypatch):
    """A MemoryError past the first shards ended as the command line's generic line, which named neither the kept
    shards nor the rerun, and advised "a shorter context", which quantize does not take (helper-131)."""
    break_shard_write(monkeypatch, 3, MemoryError())
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "q", "--bits", "4", "--group-size", "32",
                           "--max-shard-size", "150000")
    line = assert_one_line_error(code, err, f"out of host memory (or the process's memory limit) quantizing "
                                            f"{tiny_released}: MemoryError;", "(2 shards of ",
                                 f" finished in {tmp_path / 'q.partial'}; a rerun with the same options "
                                 "resumes after them")
    assert "context" not in line, line
    assert len(shard_files(tmp_path / "q.partial")) == 2


def test_a_partial_folder_removed_mid_run_is_not_said_to_hold_finished_shards(tiny_released, tmp_path, monkeypatch):
    """The line counted the shards written, not whether OUT.partial still held them: "... q.partial is gone, removed
    while this ran; ..., then rerun (the same command resumes: 2 shards of 30 finished in .../q.partial)" (h213's
    F6)."""
    real_record = OutputFolder.record_finished

    def removed_after_the_second(folder, shard, sha256):
        real_record(folder, shard, sha256)
        if len(shard_files(folder.path)) == 2:
            shutil.rmtree(folder.path)   # someone else removes OUT.partial

    monkeypatch.setattr(OutputFolder, "record_finished", removed_after_the_second)
    partial = tmp_path / "q.partial"
    with pytest.raises(KLError) as refused:
        quantize(tiny_released, tmp_path / "q", **OPTIONS)
    line = str(refused.value)
    assert f"{partial} is gone, removed while this ran" in line and line.endswith(", then rerun"), line
    assert not partial.exists()


@pytest.mark.slow
def test_ctrl_c_then_rerun_via_the_cli(tiny_released, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "4", "--group-size", "32", "--max-shard-size", "150KB")
    with monkeypatch.context() as m:
        break_shard_write(m, 4, KeyboardInterrupt())
        code, _, err = run_cli(capsys, *args)
    assert code == 130 and shown_lines(err) == ["klconvert: interrupted"]
    assert not out.exists() and len(shard_files(tmp_path / "q.partial")) == 3

    calls = count_quantize_calls(monkeypatch)
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert stdout == f"{out}\n" and "3 kept from an interrupted run" in shown_lines(err)[-1]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(calls) == modules_in_shards(index, set(shard_files(out)[3:]))
    assert folder_files(out) == folder_files(uninterrupted)


@pytest.mark.slow
def test_a_damaged_finished_shard_is_written_again(tiny_released, uninterrupted, tmp_path, monkeypatch):
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    with monkeypatch.context() as m:
        break_shard_write(m, 3, OSError(errno.EIO, "Input/output error"))
        with pytest.raises(KLError, match=r"cannot write .*Input/output error.*then rerun \(the same command "
                                          "resumes: "):
            quantize(tiny_released, out, **OPTIONS)
    first = partial / shard_files(partial)[0]
    first.write_bytes(first.read_bytes()[:-10])
    result = quantize(tiny_released, out, **OPTIONS)
    assert result.shards_resumed == 1
    assert folder_files(out) == folder_files(uninterrupted)


@pytest.mark.slow
def test_other_options_refuse_to_resume_unless_force(tiny_released, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        break_shard_write(m, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, **OPTIONS)
    int8 = {**OPTIONS, "bits": 8}
    with pytest.raises(KLError, match=r"q.partial: holds an interrupted conversion with other options; pass --force "
                                          r"to start over"):
        quantize(tiny_released, out, **int8)
    calls = count_quantize_calls(monkeypatch)
    result = quantize(tiny_released, out, force=True, **int8)
    assert result.shards_resumed == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(calls) == modules_in_shards(index, set(index["weight_map"].values()))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == 8


def test_existing_out_is_refused_and_force_replaces_it_at_the_end(tiny_released, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    line = assert_one_line_error(*run_cli(capsys, *args)[::2], f"{out}: is not empty (it holds keep.txt); "
                                 "choose another output folder (or move it away)")
    assert "--force" not in line, line   # which would refuse it: below
    assert (out / "keep.txt").read_text() == "mine"

    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], "--force replaces only a folder klconvert wrote",
                          "holds other files")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "recipe.yaml").write_text("")
    os.mkfifo(out / "README.md")  # where a klconvert output keeps its card: read only when a regular file
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], "--force replaces only a folder klconvert wrote")
    (out / "README.md").unlink()
    (out / "recipe.yaml").unlink()

    (out / "keep.txt").unlink()  # an empty folder, then a klconvert output, are replaced
    code, _, err = run_cli(capsys, *args[:3], "--group-size", "32", "--force")
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no q.partial, no lock, no folder moved aside


def test_force_keeps_what_the_user_added_to_a_klconvert_output(tiny_released, tmp_path, capsys):
    """A folder klconvert wrote, with the user's own files beside its files (notes, a benchmark's JSON, an ONNX export
    in a subfolder): --force refuses it, naming them, and deletes nothing; without them it is replaced."""
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert run_cli(capsys, *args)[0] == 0
    record = json.loads((out / OUTPUT_RECORD).read_text())
    assert record == {"files": sorted(p.name for p in out.iterdir() if p.name != OUTPUT_RECORD)}
    (out / "notes.txt").write_text("mine")
    (out / "bench.json").write_text("{}")   # a name quantize's own side files could have: listed or not
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_text("mine")
    code, _, err = run_cli(capsys, *args, "--force")
    assert_one_line_error(code, err, "--force replaces only a folder klconvert wrote",
                          "also holds other files, which klconvert did not write: bench.json, notes.txt, onnx;")
    assert (out / "notes.txt").read_text() == "mine" and (out / "onnx" / "model.onnx").read_text() == "mine"
    assert (out / "bench.json").read_text() == "{}"

    (out / "notes.txt").unlink()
    (out / "bench.json").unlink()
    shutil.rmtree(out / "onnx")
    shard = next(out.glob("*.safetensors"))
    shard.unlink()
    shard.mkdir()   # a folder under a name the run wrote a file as: the user's
    (shard / "thesis.txt").write_text("mine")
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], f"which klconvert did not write: {shard.name};")
    assert (shard / "thesis.txt").read_text() == "mine"

    shutil.rmtree(shard)
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert sorted(json.loads((out / OUTPUT_RECORD).read_text())["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != OUTPUT_RECORD)


@pytest.mark.parametrize("record", [None, b"", b"[1, 2]", b'{"files": "config.json"}', b'{"files": [1]}',
                                    b"\xff" * 10, b"[" * 100_000, b" " * (2 << 20)])
def test_force_refuses_a_klconvert_output_whose_record_is_missing_or_not_one(tiny_released, tmp_path, capsys,
                                                                              record):
    """Without a readable record of what klconvert wrote (gone, garbage, deeply nested, past its bound) nothing in OUT
    is known to be klconvert's: --force deletes nothing."""
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert run_cli(capsys, *args)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    if record is None:
        (out / OUTPUT_RECORD).unlink()
    else:
        (out / OUTPUT_RECORD).write_bytes(record)
    said = "older than that record" if record is None else f"no {OUTPUT_RECORD} lists what klconvert wrote"
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], "--force replaces only a folder ", said)
    assert sorted(p.name for p in out.iterdir()) == sorted(set(before) - ({OUTPUT_RECORD} if record is None else set()))


def test_force_names_an_output_of_a_klconvert_older_than_its_record(tiny_released, tmp_path, capsys):
    """An OUT quantize wrote before 7fbe82f has no record of what it wrote: still refused, nothing deleted, but named
    as that, with the rm -r that clears it (helper-165: 'this holds other files' read as the user's files); a
    recipe.yaml of the user's own beside a config is not taken for one."""
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert run_cli(capsys, *args)[0] == 0
    (out / OUTPUT_RECORD).unlink()
    before = folder_files(out)
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], f"{out}: --force replaces only a folder whose "
                          f"{OUTPUT_RECORD} lists what klconvert wrote, and this is the output of a klconvert older "
                          f"than that record (its recipe.yaml is klconvert's), whose files --force cannot tell from "
                          f"yours; remove it yourself (rm -r {out}) and rerun")
    assert folder_files(out) == before
    recipe = out / "recipe.yaml"
    recipe.write_text(recipe.read_text().split("\n", 1)[1])
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], f"no {OUTPUT_RECORD} lists what klconvert wrote")


def test_force_replaces_a_synth_output(tiny_released, tmp_path, capsys):
    """`klconvert synth --out OUT` then `quantize SRC OUT --force` was refused (OUT 'a checkpoint folder ...; `klconvert
    synth` writes no such record'): synth wrote no record of its files, so klconvert's own output could not be told
    from the user's. Now it writes quantize's, and --force replaces it as it replaces a quantize output."""
    out = tmp_path / "q"
    assert run_cli(capsys, "synth", "--preset", "tiny", "--out", out)[0] == 0
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{out}: is not empty (it holds {OUTPUT_RECORD}, config.json, "
                          "generation_config.json and ", " more); choose another output folder, or pass --force to "
                          "replace it once the new one is complete")
    assert run_cli(capsys, *args, "--force")[0] == 0
    written = json.loads((out / OUTPUT_RECORD).read_text())["files"]
    assert "recipe.yaml" in written and sorted(p.name for p in out.iterdir()) == sorted([*written, OUTPUT_RECORD])


@pytest.mark.parametrize("made_by", ["synth", "export-onnx"])
def test_force_names_an_older_synth_or_export_output_it_cannot_replace(tiny_released, tmp_path, capsys, made_by):
    """A synth or export-onnx output of a klconvert before they wrote a record of their files: --force deletes
    nothing, and the line says what OUT is; without --force none is offered."""
    out = tmp_path / "q"
    if made_by == "synth":
        assert run_cli(capsys, "synth", "--preset", "tiny", "--out", out)[0] == 0
        (out / OUTPUT_RECORD).unlink()
    else:   # what export-onnx left: its genai_config.json beside the model's config.json (onnx is not needed here)
        out.mkdir()
        for name in ("genai_config.json", "config.json", "model.onnx"):
            (out / name).write_text("{}")
    before = folder_files(out)
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    line = assert_one_line_error(*run_cli(capsys, *args)[::2], f"{out}: is not empty (it holds config.json, ",
                                 "; choose another output folder (or move it away)")
    assert "--force" not in line, line
    what = ("a checkpoint folder (config.json is here): a download, or a `klconvert synth` output of a klconvert older "
            "than that record" if made_by == "synth" else
            "an ONNX export (genai_config.json is here) of a klconvert older than that record")
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], f"{out}: --force replaces only a folder klconvert "
                          f"wrote (or an empty one), and no {OUTPUT_RECORD} lists what klconvert wrote in this one, "
                          f"{what}, so --force cannot tell its files from yours; remove it yourself where you can "
                          f"spare it (rm -r {out}) and rerun, or choose another output folder")
    assert folder_files(out) == before


def test_force_refuses_a_record_that_is_a_fifo(tiny_released, tmp_path, capsys):
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert run_cli(capsys, *args)[0] == 0
    (out / OUTPUT_RECORD).unlink()
    os.mkfifo(out / OUTPUT_RECORD)   # opening it for reading would wait for a writer
    assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], f"no {OUTPUT_RECORD} lists what klconvert wrote")


def test_force_touches_nothing_beside_out(tiny_released, tmp_path, capsys):
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
    assert run_cli(capsys, *args)[0] == 0
    for beside in ("q.replaced", ".q.replaced"):   # names a replaced OUT might be moved to
        (tmp_path / beside).mkdir()
        (tmp_path / beside / "thesis.txt").write_text("mine")
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0, err
    assert (tmp_path / "q.replaced" / "thesis.txt").read_text() == "mine"
    assert (tmp_path / ".q.replaced" / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.replaced", "q", "q.replaced"]


def test_force_refuses_what_appeared_at_out_while_converting(tiny_released, tmp_path, monkeypatch):
    out = tmp_path / "q"
    finish = OutputFolder.finish

    def someone_writes_out(self):
        out.mkdir()
        (out / "thesis.txt").write_text("mine")
        return finish(self)

    monkeypatch.setattr(OutputFolder, "finish", someone_writes_out)
    with pytest.raises(KLError, match="--force replaces only a folder klconvert wrote.*holds other files"):
        quantize(tiny_released, out, force=True, **OPTIONS)
    assert (out / "thesis.txt").read_text() == "mine"


@pytest.mark.parametrize("theirs", [False, True])
def test_what_appeared_at_out_while_converting_is_offered_force_only_where_it_replaces_it(
        tiny_released, tmp_path, monkeypatch, theirs):
    """An OUT made while converting was told "or pass --force to replace it" whatever it held, and --force refuses a
    folder holding files klconvert did not write (h182)."""
    out = tmp_path / "q"
    finish = OutputFolder.finish

    def someone_makes_out(self):
        out.mkdir()
        if theirs:
            (out / "thesis.txt").write_text("mine")
        return finish(self)

    monkeypatch.setattr(OutputFolder, "finish", someone_makes_out)
    with pytest.raises(KLError, match="q: appeared while converting; move it away and rerun") as refused:
        quantize(tiny_released, out, **OPTIONS)
    assert ("or pass --force to replace it" in str(refused.value)) != theirs, refused.value


def test_out_inside_the_source_is_refused(tiny_copy, capsys):
    out = tiny_copy / "q"
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_copy, out)[::2], "inside the source folder")
    assert not out.exists() and not (tiny_copy / "q.partial").exists()



@pytest.mark.slow
def test_max_shard_size_sets_the_shard_count(tiny_released, uninterrupted, tmp_path, capsys):
    """--max-shard-size bounds every shard (a tensor larger than it would get a shard of its own) and is part of
    what a resume must match."""
    small, one = tmp_path / "q", tmp_path / "one"
    code, _, err = run_cli(capsys, "quantize", tiny_released, small, "--bits", "4", "--group-size", "32",
                           "--max-shard-size", "150KB")
    assert code == 0, err
    assert folder_files(small) == folder_files(uninterrupted)  # the library's max_shard_bytes=150_000
    headers = [read_header(p) for p in small.glob("*.safetensors")]
    assert len(headers) >= 5
    for h in headers:  # the tensors of each shard fit in 150 KB, or it holds one tensor larger than that
        assert len(h.tensors) == 1 or sum(e.nbytes for e in h.tensors.values()) <= 150_000
    code, _, err = run_cli(capsys, "quantize", tiny_released, one, "--bits", "4", "--group-size", "32",
                           "--max-shard-size", "1GiB")
    assert code == 0, err
    assert shard_files(one) == ["model-00001-of-00001.safetensors"]


@pytest.mark.parametrize("size", ["0", "5 parsecs", "-1GB"])
def test_a_bad_max_shard_size_is_one_line(tiny_released, tmp_path, capsys, size):
    out = tmp_path / "q"
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_released, out, "--max-shard-size", size)[::2],
                          f"--max-shard-size {size!r}")
    assert not out.exists() and not (tmp_path / "q.partial").exists()


def test_the_command_line_holds_a_shard_size_to_the_quantizers_minimum(tiny_released, tmp_path, capsys,
                                                                         monkeypatch):
    """One minimum: the command line checked its own (size < 1) beside the quantizer's."""
    import klconvert.quantize_options as quantize_options

    monkeypatch.setattr(quantize_options, "MIN_SHARD_BYTES", 1000)
    out = tmp_path / "q"
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_released, out, "--max-shard-size", "999B")[::2],
                          "--max-shard-size '999B': a shard holds at least 1,000 bytes; give a size such as 5GB or "
                          "500MB")
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.slow
def test_a_different_max_shard_size_does_not_resume_without_force(tiny_released, tmp_path, capsys):
    out = tmp_path / "q"
    args = ("quantize", tiny_released, out, "--bits", "4", "--group-size", "32")
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 2, KeyboardInterrupt())
        assert run_cli(capsys, *args, "--max-shard-size", "150KB")[0] == 130
    assert_one_line_error(*run_cli(capsys, *args, "--max-shard-size", "300KB")[::2], "q.partial: holds an "
                          "interrupted conversion", "--force")
    code, _, err = run_cli(capsys, *args, "--max-shard-size", "300KB", "--force")
    assert code == 0, err
    assert "kept from an interrupted run" not in err
    packed = [h for h in map(read_header, out.glob("*.safetensors")) if len(h.tensors) > 1]
    assert max(sum(e.nbytes for e in h.tensors.values()) for h in packed) > 150_000  # written at the new size


# no record; one nested past Python's stack; a FIFO (waited on forever if opened blocking); one past the bound (read
# no further than it: a sparse file of 4 GB); JSON that is no record of ours (a list: an AttributeError once)
@pytest.mark.parametrize("record", [None, "[" * 100_000, "fifo", "huge", "[1]", '{"source": 3}'])
def test_force_leaves_a_partial_folder_klconvert_did_not_write(tiny_released, tmp_path, record):
    """OUT.partial without a readable resume record is someone else's: refused with --force too, left as it was."""
    partial = tmp_path / "q.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    path = partial / ".klconvert-resume.json"
    if record == "fifo":
        os.mkfifo(path)
    elif record == "huge":
        with open(path, "wb") as f:
            f.truncate(4 << 30)
    elif record is not None:
        path.write_text(record)
    for force in (False, True):
        with pytest.raises(KLError, match=r"q\.partial: exists but holds no readable \.klconvert-resume\.json, so it "
                                          r"is not an interrupted klconvert run; move or delete it yourself"):
            quantize(tiny_released, tmp_path / "q", force=force, **OPTIONS)
    assert (partial / "notes.txt").read_text() == "mine" and not (tmp_path / "q").exists()


def test_a_local_source_rewritten_in_place_is_not_resumed(tiny_copy, tmp_path):
    """A folder with no hub commit is held to its shards' modification times: a fine-tune saved over it keeps every
    size and header, and resuming would mix the two models' shards."""
    out = tmp_path / "q"
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_copy, out, **OPTIONS)
    for shard in tiny_copy.glob("*.safetensors"):
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(KLError, match=rf"q.partial: holds an interrupted conversion of {tiny_copy} as its files were "
                                      r"then \(they have changed since\); pass --force to start over"):
        quantize(tiny_copy, out, **OPTIONS)
    elsewhere = shutil.copytree(tiny_copy, tmp_path / "elsewhere")
    with pytest.raises(KLError, match="q.partial: holds an interrupted conversion of another source and with other "
                                      "options; pass --force"):
        quantize(elsewhere, out, **{**OPTIONS, "bits": 8})
    assert quantize(tiny_copy, out, force=True, **OPTIONS).shards_resumed == 0


@pytest.mark.parametrize("version", ["older", "older-format", "newer"])
def test_a_partial_left_by_another_version_says_so(tiny_copy, tmp_path, capsys, version):
    """A record of another shape than this version writes (before 21bad3e a local source's shards had no mtime_ns,
    its format 1 still), or of another format, was read as the source's files changed since (helper-165)."""
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    args = ("quantize", tiny_copy, out, "--bits", "4", "--group-size", "32", "--max-shard-size", "150KB")
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 3, KeyboardInterrupt())
        assert run_cli(capsys, *args)[0] == 130
    path = partial / ".klconvert-resume.json"
    record = json.loads(path.read_text())
    if version == "older":
        for entry in record["source"]["shards"].values():
            del entry["mtime_ns"]
    record["format"] += {"older": 0, "older-format": -1, "newer": 1}[version]
    path.write_text(json.dumps(record))
    left = folder_files(partial)
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{partial}: holds an interrupted conversion left by "
                          f"{'a newer' if version == 'newer' else 'an older'} klconvert, whose resume record this one "
                          "cannot take up; pass --force to start over")
    assert folder_files(partial) == left and not out.exists()
    code, _, err = run_cli(capsys, *args, "--force")
    assert code == 0 and "kept from an interrupted run" not in err, err


@pytest.mark.parametrize("change", ["pulled", "pull record removed", "another klconvert version"])
def test_a_partial_of_this_version_is_not_said_to_be_another_versions(tiny_copy, tmp_path, capsys, change):
    """A record this version wrote was 'left by an older klconvert' where the source gained or lost a hub commit
    between the runs (a commit's shards have no mtime_ns), and one of another version string alone was 'with other
    options' (helper-167)."""
    out, partial, pulled = tmp_path / "q", tmp_path / "q.partial", tiny_copy / LOCAL_DIR_RECORD
    args = ("quantize", tiny_copy, out, "--bits", "4", "--group-size", "32", "--max-shard-size", "150KB")
    pulled.parent.mkdir()
    if change == "pull record removed":
        pulled.write_text(json.dumps({"repo": "moonshotai/Kimi-Linear-48B-A3B-Instruct", "commit": "a" * 40}))
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 3, KeyboardInterrupt())
        assert run_cli(capsys, *args)[0] == 130
    if change == "pulled":
        pulled.write_text(json.dumps({"repo": "moonshotai/Kimi-Linear-48B-A3B-Instruct", "commit": "a" * 40}))
    elif change == "pull record removed":
        pulled.unlink()
    path = partial / ".klconvert-resume.json"
    record = json.loads(path.read_text())
    if change == "another klconvert version":
        record["klconvert"], ours = "0.0.1", record["klconvert"]
        path.write_text(json.dumps(record))
        said = f"left by klconvert '0.0.1' (this is {ours}), whose resume record this one cannot take up; pass --force"
    else:
        said = f"of {tiny_copy} as its files were then (they have changed since); pass --force to start over"
    left = folder_files(partial)
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{partial}: holds an interrupted conversion {said}")
    assert folder_files(partial) == left and not out.exists()


def test_a_link_in_the_partial_folder_is_replaced_not_written_through(tiny_released, tmp_path):
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, **OPTIONS)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name in ("tiktoken.model", "config.json", "README.md.partial"):
        (partial / name).symlink_to(victim)
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 2
    assert victim.read_text() == "mine"
    assert not any(p.is_symlink() for p in out.iterdir())


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_partial_folder_that_is_not_a_folder_of_this_user_is_refused(tiny_released, tmp_path, kind):
    partial = tmp_path / "q.partial"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    partial.symlink_to(elsewhere) if kind == "link" else partial.write_text("mine")
    for force in (False, True):
        with pytest.raises(KLError, match=r"q\.partial: exists but is (a link|not a folder), so it is not an "
                                          r"interrupted klconvert run of yours"):
            quantize(tiny_released, tmp_path / "q", force=force, **OPTIONS)
    assert partial.is_symlink() if kind == "link" else partial.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's takes root (os.chown)")
def test_a_partial_folder_of_another_user_is_refused_even_with_force(tiny_released, tmp_path, capsys):
    """README: an `OUT.partial/` that is another user's is someone else's and is refused even with --force -- here
    an interrupted run's, resume record and all, which root could write into: neither resumed nor deleted."""
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, **OPTIONS)
    other = 65534   # nobody: not root, whose run this is
    try:
        for path in (partial, *partial.rglob("*")):
            os.lchown(path, other, -1)
    except PermissionError:
        pytest.skip("this root may not give files away (no CAP_CHOWN: a user namespace)")
    kept = folder_files(partial)
    args = ("quantize", tiny_released, out, "--bits", "4", "--group-size", "32", "--max-shard-size", "150KB")
    for force in ((), ("--force",)):   # the same options as the interrupted run: resumable, were it ours
        assert_one_line_error(*run_cli(capsys, *args, *force)[::2],
                              f"q.partial: exists but is owned by another user (uid {other}), so it is not an "
                              "interrupted klconvert run of yours")
    assert folder_files(partial) == kept and partial.stat().st_uid == other and not out.exists()


@pytest.mark.parametrize("replacing", [False, True])
def test_an_interrupt_while_finishing_leaves_a_folder_a_rerun_takes_up(tiny_released, uninterrupted, tmp_path,
                                                                        replacing):
    """The resume record goes only after the rename: an interrupt at the rename (replacing an older OUT or not)
    used to leave a whole OUT.partial with no record, which no rerun, even with --force, would take up."""
    out = tmp_path / "q"
    if replacing:
        quantize(tiny_released, out, **OPTIONS)
    with pytest.MonkeyPatch.context() as m:
        def interrupted(*_):
            raise KeyboardInterrupt
        m.setattr("klconvert.convert.output_folder.os.rename", interrupted)
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, force=replacing, **OPTIONS)
    result = quantize(tiny_released, out, force=replacing, **OPTIONS)
    assert result.shards_resumed == result.shards
    assert folder_files(out) == folder_files(uninterrupted)
    assert not (out / ".klconvert-resume.json").exists() and not (tmp_path / "q.partial").exists()


def test_an_interrupt_while_a_rerun_checks_its_finished_shards_keeps_them(tiny_released, uninterrupted, tmp_path,
                                                                             monkeypatch):
    """A rerun reads each finished shard through before it takes it (minutes for the release's 5 GB shards): an
    interrupt meanwhile deleted OUT.partial, finished shards and all, as a run that had finished none -- it counted
    only the shards this run had checked."""
    out = tmp_path / "q"
    kept = _interrupted_at_shard(tiny_released, out, 3)
    checked = OutputFolder.has_finished

    def interrupted_at_the_second(folder, shard, tensors):
        if shard == kept[1].name:
            raise KeyboardInterrupt
        return checked(folder, shard, tensors)

    with monkeypatch.context() as m:
        m.setattr(OutputFolder, "has_finished", interrupted_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, **OPTIONS)
    assert sorted((tmp_path / "q.partial").glob("*.safetensors")) == kept
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 2
    assert folder_files(out) == folder_files(uninterrupted)


def test_a_resume_record_that_cannot_be_written_is_one_line_and_blocks_no_rerun(tiny_released, tmp_path, capsys,
                                                                                 monkeypatch):
    """A traceback, and an empty OUT.partial left that every rerun refused, --force too (no readable record)."""
    args = ("quantize", tiny_released, tmp_path / "new" / "q", "--bits", "4", "--group-size", "32")
    with monkeypatch.context() as m:
        def too_large(path, data):
            raise OSError(errno.EFBIG, "File too large")

        m.setattr("klconvert.convert.output_folder.write_atomically", too_large)
        assert_one_line_error(*run_cli(capsys, *args)[::2],
                              f"cannot write {tmp_path / 'new' / 'q.partial'} (File too large): ", ", then rerun")
    assert list(tmp_path.iterdir()) == []
    assert run_cli(capsys, *args)[0] == 0


def test_too_little_space_is_said_in_readable_units(tiny_released, tmp_path, capsys, monkeypatch):
    """It said "0.00 GB free but 0.01 GB of shards are left to write"."""
    monkeypatch.setattr("klconvert.quantize.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 10_000))
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_released, tmp_path / "q")[::2],
                          "q.partial: 10,000 bytes free but ", " MB of shards are left to write")
    assert list(tmp_path.iterdir()) == []


def _interrupted_at_shard(tiny_released, out, shard_number):
    """OUT.partial as a run interrupted while writing its shard_number-th shard leaves it."""
    with pytest.MonkeyPatch.context() as m:
        break_shard_write(m, shard_number, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, **OPTIONS)
    return sorted((out.with_name(out.name + ".partial")).glob("*.safetensors"))


def _zeroed_data(data: bytes) -> bytes:
    start = 8 + int.from_bytes(data[:8], "little")
    return data[:start] + bytes(len(data) - start)


def _swapped_offsets(data: bytes) -> bytes:
    """The data offsets of a shard's first two tensors (of one size) swapped: the same header length and file size."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    first, second = [name for name in header if name != "__metadata__"][:2]
    header[first]["data_offsets"], header[second]["data_offsets"] = (header[second]["data_offsets"],
                                                                      header[first]["data_offsets"])
    raw = json.dumps(header, separators=(",", ":")).encode()
    return data[:8] + raw.ljust(length) + data[8 + length:]


def _other_metadata(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].replace(b'"format":"pt"', b'"format":"xx"')
    assert header != data[8:8 + length]
    return data[:8] + header + data[8 + length:]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_zeroed_data, _swapped_offsets, _other_metadata])
def test_a_finished_shard_whose_bytes_changed_is_written_again(tiny_released, uninterrupted, tmp_path, damage):
    """A finished shard was trusted by its header and size: one with zeroed data, swapped offsets or other metadata --
    the same size, the same tensors -- was kept and the finished OUT held it. Its sha256 is recorded and checked."""
    out = tmp_path / "q"
    second = _interrupted_at_shard(tiny_released, out, 3)[1]   # its first two tensors are norms of one size
    second.write_bytes(damage(second.read_bytes()))
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 1
    assert folder_files(out) == folder_files(uninterrupted)


@pytest.mark.slow
def test_a_finished_shard_with_a_swollen_header_is_written_again_unparsed(tiny_released, uninterrupted, tmp_path,
                                                                         monkeypatch):
    """A finished shard's header was parsed whole, with no bound on its JSON: 6 MB of empty lists took ~150 MB to
    find it was not the header the run writes. It is now compared with that header byte for byte, unparsed."""
    out = tmp_path / "q"
    second = _interrupted_at_shard(tiny_released, out, 3)[1]
    swollen = b'{"__metadata__":{"format":"pt"},"pad":[' + b"[]," * (2 << 20) + b"[]]}"
    second.write_bytes(len(swollen).to_bytes(8, "little") + swollen)
    peaks, checked = [], OutputFolder.has_finished

    def traced(folder, shard, tensors):
        tracemalloc.start()
        try:
            return checked(folder, shard, tensors)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    monkeypatch.setattr(OutputFolder, "has_finished", traced)
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 1
    assert max(peaks) < 2 * HASH_CHUNK_BYTES, f"{max(peaks):,} bytes traced"   # a finished shard's hash reads chunks
    assert folder_files(out) == folder_files(uninterrupted)


def test_a_kept_shard_copied_in_place_leaves_a_killed_finish_to_end(tiny_released, uninterrupted, tmp_path,
                                                                     monkeypatch):
    """A rerun ending a killed finish takes each shard for the file whose sha256 was recorded where it is unchanged
    since (its file_identity, not read again); a kept shard that is another file of the same bytes (a copy) is
    hashed as it is kept, and recorded as the file it is now, so that rerun still ends the finish."""
    out = tmp_path / "q"
    first = _interrupted_at_shard(tiny_released, out, 3)[0]
    copy = shutil.copy2(first, tmp_path / "copy")
    os.replace(copy, first)
    with monkeypatch.context() as m:
        def killed(_):   # as a SIGKILL after the rename: OUT holds its resume record
            raise SystemExit(-9)
        m.setattr("klconvert.convert.output_folder.end_finish", killed)
        with pytest.raises(SystemExit):
            quantize(tiny_released, out, **OPTIONS)
    assert (out / ".klconvert-resume.json").exists()
    result = quantize(tiny_released, out, **OPTIONS)
    assert result.shards_resumed == result.shards
    assert folder_files(out) == folder_files(uninterrupted)
    assert not (out / ".klconvert-resume.json").exists()


@pytest.mark.slow
def test_a_finished_shard_replaced_by_a_link_is_written_again(tiny_released, uninterrupted, tmp_path):
    """A link at a finished shard's name, even to its own bytes, stayed a link in the finished OUT."""
    out = tmp_path / "q"
    first = _interrupted_at_shard(tiny_released, out, 3)[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    first.rename(elsewhere)
    first.symlink_to(elsewhere)
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 1
    assert folder_files(out) == folder_files(uninterrupted)
    assert not any(p.is_symlink() for p in out.iterdir())


@pytest.mark.slow
def test_a_finished_shard_hard_linked_to_a_file_elsewhere_is_written_again(tiny_released, uninterrupted, tmp_path):
    """A hard link kept its inode in the finished OUT: a later change to the file elsewhere changed OUT."""
    out = tmp_path / "q"
    first = _interrupted_at_shard(tiny_released, out, 3)[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.link(first, elsewhere)
    assert quantize(tiny_released, out, **OPTIONS).shards_resumed == 1
    assert folder_files(out) == folder_files(uninterrupted)
    assert (out / first.name).stat().st_ino != elsewhere.stat().st_ino and elsewhere.stat().st_nlink == 1


@pytest.mark.slow
def test_files_in_the_partial_folder_the_run_does_not_write_are_refused(tiny_released, uninterrupted, tmp_path,
                                                                         capsys):
    """Anything else in OUT.partial was carried into OUT and listed in its record as klconvert's (a stray
    model.safetensors beside the sharded index): the resume names them and deletes nothing; without them it goes on."""
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    _interrupted_at_shard(tiny_released, out, 3)
    (partial / "model.safetensors").write_bytes(b"mine")
    (partial / "mine.partial").write_bytes(b"mine")   # named like a temporary file, but none this run makes: kept
    for folder in ("config.json", "notes.partial"):   # folders under a name the run writes, or removes as unfinished
        (partial / folder).mkdir()
    args = ("quantize", tiny_released, out, "--bits", "4", "--group-size", "32", "--max-shard-size", "150KB")
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{partial}: holds files this run does not write "
                          "(config.json, mine.partial, model.safetensors and 1 more) (a folder where the run writes a "
                          "file counts too); move them out of it and rerun to resume")
    assert (partial / "model.safetensors").read_bytes() == b"mine" and not out.exists()
    assert (partial / "mine.partial").read_bytes() == b"mine"
    (partial / "mine.partial").unlink()
    (partial / "model.safetensors").unlink()
    (partial / "config.json").rmdir()
    (partial / "notes.partial").rmdir()
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert folder_files(out) == folder_files(uninterrupted)


def test_files_that_appear_in_the_partial_folder_while_converting_are_refused(tiny_released, tmp_path, monkeypatch):
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    finish = OutputFolder.finish

    def someone_writes_into_the_partial_folder(self):
        (partial / "thesis.txt").write_text("mine")
        return finish(self)

    monkeypatch.setattr(OutputFolder, "finish", someone_writes_into_the_partial_folder)
    with pytest.raises(KLError, match=r"q\.partial: holds files this run does not write \(thesis\.txt\)"):
        quantize(tiny_released, out, **OPTIONS)
    assert (partial / "thesis.txt").read_text() == "mine" and not out.exists()


def test_force_replaces_an_out_a_run_killed_while_finishing_left_its_resume_record_in(tiny_released, tmp_path):
    """A kill between the rename and the record's removal left .klconvert-resume.json in OUT, and --force refused
    OUT as holding a file klconvert did not write."""
    out = tmp_path / "q"
    quantize(tiny_released, out, **OPTIONS)
    (out / ".klconvert-resume.json").write_text("{}")
    assert quantize(tiny_released, out, force=True, **OPTIONS).path == out
    assert not (out / ".klconvert-resume.json").exists()


def test_a_folder_where_a_side_file_goes_is_named_by_its_own_name(tiny_released, tmp_path, monkeypatch):
    """It was named by the temporary file renamed onto it."""
    out, partial = tmp_path / "q", tmp_path / "q.partial"
    write_text = OutputFolder.write_text

    def someone_makes_a_folder(self, name, text):
        if name == "config.json":
            (partial / "recipe.yaml").mkdir()
        write_text(self, name, text)

    monkeypatch.setattr(OutputFolder, "write_text", someone_makes_a_folder)
    with pytest.raises(KLError, match=rf"cannot write {partial / 'recipe.yaml'} \("):
        quantize(tiny_released, out, **OPTIONS)


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupted_discard_leaves_a_folder_a_rerun_still_takes(tiny_released, tmp_path, monkeypatch):
    """`--force` discarding an older OUT.partial, stopped after any file: the resume record goes last, so what is
    left is still known as klconvert's (helper-105: an OUT.partial left shards and all but without its record was
    refused by every rerun, --force too); one left empty is taken over."""
    from klconvert.convert.output_folder import RESUME_RECORD

    older = _interrupted_at_shard(tiny_released, tmp_path / "older", 4)[0].parent
    entries = len(os.listdir(older))
    assert entries >= 4 and (older / RESUME_RECORD).exists()
    real_unlink = os.unlink
    for stop_at in range(1, entries + 1):
        out = tmp_path / f"q{stop_at}"
        partial = shutil.copytree(older, out.with_name(out.name + ".partial"))
        calls: list = []

        def unlink_then_stop(path, *args, **kwargs):
            if "dir_fd" in kwargs or os.fspath(path).startswith(os.fspath(partial)):   # rmtree's, or ours
                calls.append(path)
                if len(calls) == stop_at:
                    raise KeyboardInterrupt
            return real_unlink(path, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(os, "unlink", unlink_then_stop)
            with pytest.raises(KeyboardInterrupt):
                quantize(tiny_released, out, force=True, **{**OPTIONS, "bits": 8})
        left = os.listdir(partial)
        assert RESUME_RECORD in left or left == [], (stop_at, left)
    (partial / RESUME_RECORD).unlink()   # the last stop: the record itself -- the folder is left empty
    assert os.listdir(partial) == []
    assert quantize(tiny_released, out, **{**OPTIONS, "bits": 8}).shards_resumed == 0
    assert not partial.exists() and (out / "config.json").exists()
