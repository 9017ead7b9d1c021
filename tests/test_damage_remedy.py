"""What a line about a damaged quantized folder says to do follows where the folder came from: a folder `klconvert
quantize` wrote is converted again, a pulled one pulled again (the command said; its owner told where the pull verified
the bytes as published), one of unknown origin gets both."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_standin import HubStandIn, hub_environment
from klconvert import hub
from klconvert.checkpoint.folder_files import INDEX_FILE
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.convert.output_folder import OUTPUT_RECORD
from klconvert.damage_remedy import UNKNOWN_ORIGIN_REMEDY, WRITTEN_REMEDY
from klconvert.errors import KLError
from klconvert.quantize import quantize
from test_quantized_checkpoint import write_quantized
from testkit import assert_one_line_error, run_cli

REPO = "someone/Kimi-Linear-int4"
Q_PROJ = "model.layers.1.self_attn.q_proj"
CUT_SHORT = f"quantized weight '{Q_PROJ}.weight': packed tensors I32 [128, 16] / scale BF16 [127, 4] do not fit its " \
            "shape [128, 128]; "


def cut_a_scale_short(folder: Path) -> None:
    """Drop the last row of q_proj's weight_scale, in whichever shard holds it (its mtime moved on, as a write does)."""
    index = folder / INDEX_FILE
    shard = json.loads(index.read_text())["weight_map"][f"{Q_PROJ}.weight_scale"] if index.exists() else \
        "model.safetensors"
    path = Path(os.path.realpath(folder / shard))   # a snapshot's link: the blob it names
    tensors = load_file(path)
    tensors[f"{Q_PROJ}.weight_scale"] = tensors[f"{Q_PROJ}.weight_scale"][:-1].clone()
    path.unlink()   # a new file: a blob in the cache is read-only
    save_file(tensors, path, metadata={"format": "pt"})


def refusal(folder: Path) -> str:
    with pytest.raises(KLError) as refused:
        open_checkpoint(folder)
    return str(refused.value)


def test_a_folder_klconvert_wrote_is_converted_again(tiny_released, tmp_path):
    out = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, device="cpu", progress=False).path
    cut_a_scale_short(out)
    assert refusal(out) == f"{out}: {CUT_SHORT}{WRITTEN_REMEDY}"


def test_a_folder_of_unknown_origin_is_told_both(tiny_released, tmp_path):
    write_quantized(tiny_released, tmp_path / "q", bits=4)
    cut_a_scale_short(tmp_path / "q")
    assert refusal(tmp_path / "q") == \
        f"{tmp_path / 'q'}: {CUT_SHORT}re-run the conversion if klconvert wrote it, or download it again"


@contextmanager
def served(folder: Path, hf_home: Path) -> Iterator[str]:
    """The commit of REPO, which a stand-in hub serves from `folder`, huggingface_hub pointed at it."""
    with HubStandIn() as server:
        commit = server.add_repo(REPO, folder)
        with hub_environment(server.endpoint, hf_home):
            yield commit


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_pulled_folder_damaged_since_is_pulled_again_with_the_command(tiny_released, tmp_path, into):
    """It said "re-run the conversion" to whoever pulled an already-quantized repo, who ran none."""
    write_quantized(tiny_released, tmp_path / "upstream", bits=4)
    local_dir = tmp_path / "kimi" if into == "local-dir" else None
    with served(tmp_path / "upstream", tmp_path / "hf_home") as commit:
        folder = hub.pull(REPO, local_dir=local_dir, progress=False).path
        cut_a_scale_short(folder)
        said = refusal(folder)   # where the cache a plain pull fills is this one
    again = f" --local-dir {local_dir}" if local_dir is not None else ""
    assert said == f"{folder}: {CUT_SHORT}download it again (klconvert pull {REPO} --revision {commit}{again})"


def test_a_snapshot_in_another_cache_is_pulled_again_into_it(tiny_released, tmp_path):
    """A snapshot pulled with --cache-dir was told a pull without it, which filled the default cache and left the
    damaged snapshot as it was."""
    write_quantized(tiny_released, tmp_path / "upstream", bits=4)
    with served(tmp_path / "upstream", tmp_path / "hf_home") as commit:
        folder = hub.pull(REPO, cache_dir=tmp_path / "mine", progress=False).path
        cut_a_scale_short(folder)
        said = refusal(folder)
        pull = f"klconvert pull {REPO} --revision {commit} --cache-dir {tmp_path / 'mine'}"
        assert said == f"{folder}: {CUT_SHORT}download it again ({pull})"
        hub.pull(REPO, revision=commit, cache_dir=tmp_path / "mine", progress=False)   # what it says, done
        open_checkpoint(folder)


def test_a_pull_command_holding_a_space_pastes_as_said(tiny_released, capsys, tmp_path):
    """The command said "--cache-dir /tmp/my cache" unquoted: pasted, the shell split the path in two and the pull
    refused the stray argument."""
    write_quantized(tiny_released, tmp_path / "upstream", bits=4)
    cache = tmp_path / "my cache"
    with served(tmp_path / "upstream", tmp_path / "hf_home") as commit:
        folder = hub.pull(REPO, cache_dir=cache, progress=False).path
        cut_a_scale_short(folder)
        said = refusal(folder)
        command = re.search(r"download it again \((.*)\)$", said).group(1)
        argv = shlex.split(command)   # as the shell reads the line pasted
        assert argv == ["klconvert", "pull", REPO, "--revision", commit, "--cache-dir", str(cache)]
        assert run_cli(capsys, *argv[1:])[0] == 0
    open_checkpoint(folder)


def test_a_pulled_folder_damaged_as_published_is_reported_to_its_owner(tiny_released, tmp_path):
    """A pull verified the shard as the hub publishes it, unchanged since: a download again brings the same bytes."""
    write_quantized(tiny_released, tmp_path / "upstream", bits=4)
    cut_a_scale_short(tmp_path / "upstream")
    with served(tmp_path / "upstream", tmp_path / "hf_home"):
        folder = hub.pull(REPO, progress=False).path
    assert refusal(folder) == (f"{folder}: {CUT_SHORT}report it to the repo's owner, or pull another revision "
                               "(--revision): a pull checked this file against the hash the hub publishes, so a "
                               "re-download brings the same bytes")


def test_a_weight_read_past_the_checks_is_said_by_origin_too(tiny_released, tmp_path):
    """The reader's lines -- a scale that dequantizes past bf16 -- are asked for their remedy only when said."""
    out = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, device="cpu", progress=False).path
    shard = json.loads((out / INDEX_FILE).read_text())["weight_map"][f"{Q_PROJ}.weight_scale"]
    tensors = load_file(out / shard)
    tensors[f"{Q_PROJ}.weight_scale"] = torch.full_like(tensors[f"{Q_PROJ}.weight_scale"], 1e38)
    save_file(tensors, out / shard, metadata={"format": "pt"})
    checkpoint = open_checkpoint(out)
    with pytest.raises(KLError, match=r"past the largest finite value .*; the checkpoint is damaged -- "
                                      + re.escape(WRITTEN_REMEDY) + "$"):
        checkpoint.get(f"{Q_PROJ}.weight")


def shrink_a_scale_in_its_header(folder: Path) -> Path:
    """Edit q_proj's weight_scale shape in its shard's header in place (128 rows to 127, same size): the header no
    longer fits the file; the shard's path."""
    shard = folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][f"{Q_PROJ}.weight_scale"]
    data = bytearray(shard.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].decode()
    at = header.index('"shape":[', header.index(f'"{Q_PROJ}.weight_scale":')) + len('"shape":[')
    assert header[at:at + 4] == "128,"
    data[8:8 + length] = (header[:at] + "127" + header[at + 3:]).encode()
    shard.write_bytes(bytes(data))
    return shard


def test_a_damaged_header_in_a_folder_klconvert_wrote_is_converted_again(tiny_released, tmp_path):
    """A header that does not fit its file ended with "delete it and download it again", whatever the folder's origin:
    nothing downloads a folder klconvert wrote."""
    out = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, device="cpu", progress=False).path
    shard = shrink_a_scale_in_its_header(out)
    said = refusal(out)
    assert said.startswith(f"{shard}: tensor '{Q_PROJ}.weight_scale' (BF16 [127, 4]) needs ")
    assert said.endswith(f"; the file is damaged or incomplete -- {WRITTEN_REMEDY}")



def rewritten(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as the shard at `path` (a snapshot's link: the blob it names, read-only, replaced)."""
    path = Path(os.path.realpath(path))
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def shard_of_q_proj(folder: Path) -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][f"{Q_PROJ}.weight"]


def drop_q_proj(folder: Path) -> None:
    """Take the tiny checkpoint's layer-1 q_proj out of its shard and the index."""
    shard = shard_of_q_proj(folder)
    tensors = load_file(shard)
    del tensors[f"{Q_PROJ}.weight"]
    rewritten(shard, tensors)
    index_path = Path(os.path.realpath(folder / INDEX_FILE))
    index = json.loads(index_path.read_text())
    del index["weight_map"][f"{Q_PROJ}.weight"]
    index_path.unlink()
    index_path.write_text(json.dumps(index))


def missing_q_proj(folder: Path) -> str:
    return f"{folder}: tensor {Q_PROJ}.weight is missing from the checkpoint, which its config.json (8 layers, 16 " \
           "experts) asks for; put back the config.json its weights came with, else the checkpoint is incomplete -- "


def make_q_proj_nan(folder: Path) -> None:
    """Make the tiny checkpoint's layer-1 q_proj's first value NaN."""
    shard = shard_of_q_proj(folder)
    tensors = load_file(shard)
    tensors[f"{Q_PROJ}.weight"].view(-1)[0] = float("nan")
    rewritten(shard, tensors)


def nan_in_q_proj(folder: Path) -> str:
    return f"{shard_of_q_proj(folder)}: tensor {Q_PROJ}.weight holds nan at flat index 0 (NaN or infinite weights); " \
           "the checkpoint is damaged -- "


# each damage, and the start of the line that refuses a folder so damaged
DAMAGES = pytest.mark.parametrize("damage, line", [(drop_q_proj, missing_q_proj), (make_q_proj_nan, nan_in_q_proj)],
                                  ids=["missing-tensor", "nan"])


def quantize_refusal(capsys, folder: Path, out: Path) -> str:
    """`klconvert quantize FOLDER OUT`'s error line, checked as one line, exit status 2, no traceback."""
    code, _, err = run_cli(capsys, "quantize", folder, out, "--bits", "4", "--group-size", "32", "--device", "cpu")
    return assert_one_line_error(code, err).removeprefix("klconvert: error: ")


@DAMAGES
@pytest.mark.parametrize("origin", ["written", "unknown"])
def test_a_damaged_local_folder_is_told_by_its_origin(tiny_copy, tmp_path, capsys, damage, line, origin):
    """A tensor missing and a NaN weight ended with fixed advice -- "download the checkpoint again", "download it again
    or rebuild it from its source" -- whatever the folder's origin: nothing downloads a folder klconvert wrote."""
    if origin == "unknown":
        (tiny_copy / OUTPUT_RECORD).unlink()
    damage(tiny_copy)
    remedy = WRITTEN_REMEDY if origin == "written" else UNKNOWN_ORIGIN_REMEDY
    assert quantize_refusal(capsys, tiny_copy, tmp_path / "q") == f"{line(tiny_copy)}{remedy}"


@DAMAGES
@pytest.mark.parametrize("when", ["since", "as-published"])
def test_a_damaged_pulled_folder_is_pulled_again_or_reported(tiny_released, tmp_path, capsys, damage, line, when):
    """Damaged since the pull, it is pulled again (the command said); damaged as the hub publishes it -- every file
    the line rests on verified by the pull, unchanged since -- a pull brings the same bytes, so its owner is told."""
    upstream = shutil.copytree(tiny_released, tmp_path / "upstream")
    if when == "as-published":
        damage(upstream)
    with served(upstream, tmp_path / "hf_home") as commit:
        folder = hub.pull(REPO, progress=False).path
        if when == "since":
            damage(folder)
        said = quantize_refusal(capsys, folder, tmp_path / "q")
    remedy = (f"download it again (klconvert pull {REPO} --revision {commit})" if when == "since" else
              "report it to the repo's owner, or pull another revision (--revision): a pull checked this file against "
              "the hash the hub publishes, so a re-download brings the same bytes")
    assert said == f"{line(folder)}{remedy}"
