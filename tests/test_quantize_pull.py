"""`klconvert pull-and-quantize` against the loopback hub stand-in, and with a local folder."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hub_standin import HubStandIn, hub_environment
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.cli import DEFAULT_MODEL_DIR
from klconvert.damage_remedy import WRITTEN_REMEDY
from klconvert.quant import policy_from_options
from klconvert.quantize import default_out_name
from testkit import assert_one_line_error, run_cli, shown_lines

REPO = "moonshotai/Kimi-Linear-48B-A3B-Instruct"


@pytest.fixture
def served(tiny_released, tmp_path, monkeypatch):
    """(stand-in, commit) serving the tiny checkpoint as REPO; the current directory is tmp_path/work."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with HubStandIn() as server:
        commit = server.add_repo(REPO, tiny_released)
        with hub_environment(server.endpoint, tmp_path / "hf_home"):
            yield server, commit


@pytest.mark.slow
def test_pulls_then_writes_the_default_folder(served, tmp_path, capsys):
    server, commit = served
    code, stdout, err = run_cli(capsys, "pull-and-quantize", "--bits", "4", "--group-size", "32")
    assert code == 0, err
    out = Path(DEFAULT_MODEL_DIR)  # where `klconvert run` looks by default
    assert out.name == "Kimi-Linear-48B-A3B-Instruct-w4a16" and out.is_dir()
    assert stdout == f"{out}\n" and shown_lines(err)[-1].startswith(f"quantized {REPO}@{commit} -> {out}")
    card = (out / "README.md").read_text()
    assert f"base_model: {REPO}\n" in card and f"at commit `{commit}`" in card
    assert open_checkpoint(out).config.num_hidden_layers == 8
    assert (tmp_path / "hf_home" / "hub" / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "snapshots"
            / commit / "config.json").exists()


def test_hash_mismatch_stops_before_quantizing(served, tiny_released, capsys):
    server, _ = served
    shard = sorted(json.loads((tiny_released / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    server.wrong_sha256.add(shard)
    code, _, err = run_cli(capsys, "pull-and-quantize", "--bits", "8", "--group-size", "32")
    # the pull's own progress lines come first; the error is the one last line
    errors = [line for line in shown_lines(err) if line.startswith("klconvert: error:")]
    assert code == 2 and errors == [shown_lines(err)[-1]] and "Traceback" not in err
    assert "failed verification" in errors[0] and shard in errors[0]
    assert not Path("Kimi-Linear-48B-A3B-Instruct-w8a16").exists()
    assert list(Path().iterdir()) == []


def _pull_and_quantize_with_a_sparse_file(tiny_released, tmp_path, monkeypatch, capsys, name: str, size: int):
    """pull-and-quantize of the tiny checkpoint served with `name` (made, or grown) a sparse file of `size` bytes (the
    listing gives its size): (exit status, stderr, the stand-in)."""
    served_copy = tmp_path / "served"
    shutil.copytree(tiny_released, served_copy)
    (served_copy / name).parent.mkdir(exist_ok=True)
    with open(served_copy / name, "ab") as f:
        f.truncate(size)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with HubStandIn() as server:
        server.add_repo(REPO, served_copy)
        with hub_environment(server.endpoint, tmp_path / "hf_home"):
            code, _, err = run_cli(capsys, "pull-and-quantize", "--bits", "4", "--group-size", "32")
    return code, err, server


@pytest.mark.parametrize("name, size", [("tokenizer_config.json", (32 << 20) + 1), ("config.json", (1 << 20) + 1)])
def test_a_file_quantize_would_refuse_by_its_size_is_refused_before_any_download(tiny_released, tmp_path,
                                                                                  monkeypatch, capsys, name, size):
    """A side file over the bound quantize copies (or a config over its own) was found after the whole download."""
    code, err, server = _pull_and_quantize_with_a_sparse_file(tiny_released, tmp_path, monkeypatch, capsys, name, size)
    assert_one_line_error(code, err, f"the repo's {name} is {size:,} bytes, over the",
                          "so quantizing would fail after the download; nothing was downloaded")
    assert sum(n for (method, _), n in server.requests.items() if method == "GET") == 0
    assert list(Path().iterdir()) == []


def _drop_vocab_size(folder: Path) -> tuple[str, str]:
    config = json.loads((folder / "config.json").read_text())
    del config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json", "required field 'vocab_size' is missing; fix the config or "


def _tokenizer_config_in_a_list(folder: Path) -> tuple[str, str]:
    (folder / "tokenizer_config.json").write_text(f"[{(folder / 'tokenizer_config.json').read_text()}]")
    return "tokenizer_config.json", "expected a JSON object at the top level; "


def _nan_weight(folder: Path) -> tuple[str, str]:
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(folder / shard)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return shard, f"tensor {name} holds nan at flat index 0 (NaN or infinite weights); the checkpoint is damaged -- "


@pytest.mark.parametrize("damage", [_drop_vocab_size, _tokenizer_config_in_a_list, _nan_weight],
                         ids=["config", "tokenizer-config", "weight"])
def test_a_damaged_file_a_pull_verified_is_not_sent_to_a_re_download(tiny_released, tmp_path, monkeypatch, capsys,
                                                                     damage):
    """A file the pull just checked against the hash the hub publishes was refused with "re-download the model" (h182,
    F6), which brings the same bytes again: the repo's own file is so. A local folder's file, and the pulled one once
    changed since, still are."""
    served_copy = tmp_path / "served"
    shutil.copytree(tiny_released, served_copy)
    name, said = damage(served_copy)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    args = ("--bits", "4", "--group-size", "32")
    with HubStandIn() as server:
        commit = server.add_repo(REPO, served_copy)
        with hub_environment(server.endpoint, tmp_path / "hf_home"):
            code, _, err = run_cli(capsys, "pull-and-quantize", *args)
    errors = [line for line in shown_lines(err) if line.startswith("klconvert: error:")]
    assert code == 2 and errors == [shown_lines(err)[-1]] and "Traceback" not in err
    assert (f"{name}: {said}report it to the repo's owner, or pull another revision (--revision): a pull checked "
            "this file against the hash the hub publishes, so a re-download brings the same bytes") in errors[0]
    # a weight's line says what to do by the folder's origin (damaged_folder_remedy): served_copy is synth's
    again = WRITTEN_REMEDY if damage is _nan_weight else "re-download the model"
    assert_one_line_error(*run_cli(capsys, "quantize", served_copy, "q", *args)[::2], f"{name}: {said}{again}")
    snapshot = (tmp_path / "hf_home" / "hub" / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "snapshots"
                / commit)
    os.utime(snapshot / name, ns=(0, 0))   # through the cache's link, its blob: changed since the pull, as far as known
    if damage is _nan_weight:
        again = f"download it again (klconvert pull {REPO} --revision {commit} --cache-dir {snapshot.parents[2]})"
    assert_one_line_error(*run_cli(capsys, "quantize", snapshot, "q", *args)[::2], f"{name}: {said}{again}")


def test_a_large_json_in_a_subfolder_quantize_does_not_copy_is_no_reason_to_refuse(tiny_released, tmp_path,
                                                                                     monkeypatch, capsys):
    code, err, _ = _pull_and_quantize_with_a_sparse_file(tiny_released, tmp_path, monkeypatch, capsys,
                                                         "eval/results.json", (32 << 20) + 1)
    assert code == 0, err


def test_bad_options_fail_before_any_download(served, capsys):
    server, _ = served
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--bits", "5")[::2], "--bits 5 is not supported")
    assert sum(server.requests.values()) == 0


def test_an_existing_out_is_refused_before_any_download(served, capsys):
    server, _ = served
    Path("taken").mkdir()
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--out", "taken")[::2], "taken: already exists")
    assert sum(server.requests.values()) == 0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_an_output_folder_that_takes_no_files_fails_before_any_download(served, capsys):
    """OUT under Linux's /proc (a folder where no file can be created) is refused before the pull, not after it."""
    server, _ = served
    out = Path("/proc") / "klconvert-w4a16"
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--out", out)[::2],
                          f"{out}: cannot create files in the folder it goes in, /proc (")
    assert sum(server.requests.values()) == 0


def test_local_folder_skips_the_pull(tiny_released, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "pull-and-quantize", "--model", tiny_released, "--bits", "8",
                                "--group-size", "32")
    assert code == 0, err
    assert stdout == "tiny-w8a16\n" and (tmp_path / "tiny-w8a16" / "config.json").exists()
    assert f"local folder `{tiny_released.name}`" in (tmp_path / "tiny-w8a16" / "README.md").read_text()
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", tiny_released, "--revision", "v1",
                                   "--out", "x")[::2], "--revision v1 picks a hub revision")
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", "tiny", "--revision", "main",
                                   "--out", "x")[::2], "--revision main picks a hub revision, but --model tiny is the "
                                                      "bundled model; drop --revision")


def test_default_out_names():
    assert default_out_name(REPO, policy_from_options(bits=8)) == Path("Kimi-Linear-48B-A3B-Instruct-w8a16")
    assert default_out_name("some/dir/", policy_from_options(scheme="nf4")) == Path("dir-nf4")


@pytest.mark.slow
def test_max_shard_size_reaches_the_quantizer(tiny_released, tmp_path, capsys):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "pull-and-quantize", "--model", tiny_released, "--out", out, "--bits", "4",
                           "--group-size", "32", "--max-shard-size", "150KB")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5  # the 5GB default would make one


def test_a_failed_pull_leaves_no_folders_made_for_out(served, capsys):
    """The folders made to check OUT before the download stayed when the pull failed."""
    code, _, err = run_cli(capsys, "pull-and-quantize", "--model", "acme/none", "--out", "newp/deeper/x")
    assert code == 2 and "acme/none" in shown_lines(err)[-1]
    assert list(Path().iterdir()) == []


def test_a_name_that_is_no_folder_nor_repo_says_both(served, capsys):
    """A bare word is a hub id (gpt2 is one) or a folder typed wrong: the hub's "no repo" then says the folder is
    missing too (it said only that the hub has no such repo, or, for a name that is no hub id, only that)."""
    server, _ = served
    line = assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", "my-checkpoint")[::2],
                                 "--model my-checkpoint: no such folder here, and ", " has no repo my-checkpoint ",
                                 "check the name")
    assert line.count("klconvert: error:") == 1


def test_a_gated_repo_is_not_called_missing(served, monkeypatch, capsys):
    """huggingface_hub's GatedRepoError is a RepositoryNotFoundError: a repo that exists, which the folder remark
    would have hidden."""
    from huggingface_hub.errors import GatedRepoError

    import klconvert.quantize as quantize_module
    from klconvert import hub
    from klconvert.hub_guard import AnswerGuard

    http = hub._HTTP_MODULES[0]   # httpx2 under huggingface_hub 2.x, httpx under 1.x (this test imported httpx2 alone)

    def gated(model, **kwargs):
        with hub._as_user_errors(AnswerGuard("https://hub.example", model), None, Path("cache")):
            raise GatedRepoError("gated", response=http.Response(401, request=http.Request("GET", "https://x")))

    monkeypatch.setattr(quantize_module, "pull", gated)
    line = assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", "acme/kimi")[::2],
                                 "acme/kimi is gated: accept its terms at https://hub.example/acme/kimi")
    assert "no such folder" not in line


def test_a_name_that_can_only_be_a_folder_is_not_looked_up(served, monkeypatch, capsys):
    """A name that is no hub id (a space, ./, ~/, two slashes) or names a file went to the hub, which said only that
    it is no repo id; a file was then said to be no such folder."""
    import klconvert.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "pull", lambda *a, **k: pytest.fail("pulled"))
    Path("config.json").write_text("{}")   # a file, not a folder
    for name in ("my checkpoint", "./my-checkpoint", "~/kimi", "a/b/c"):
        assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", name)[::2],
                              f"--model {name}: no such folder (and not a hub repo id like {REPO}); check the path")
    # there, and no folder: said so, not "no such folder"
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", "config.json")[::2],
                          f"--model config.json: is a file, not a folder; give a Kimi Linear checkpoint folder, tiny "
                          f"(the bundled model) or a hub repo id like {REPO}")


def test_a_missing_folder_is_refused_before_the_device_is_looked_at(monkeypatch, capsys):
    """The default device asks torch for CUDA, which under an address-space limit on a GPU machine printed CUDA's
    failed initialization above the folder's refusal (the H200 run of test_refusals_run_in_bounded_memory)."""
    import klconvert.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "checked_device", lambda device: pytest.fail("looked at the device"))
    assert_one_line_error(*run_cli(capsys, "pull-and-quantize", "--model", "./typo-dir")[::2],
                          "--model ./typo-dir: no such folder")


def test_a_hub_id_without_an_owner_is_pulled(served, tiny_released, capsys):
    server, _ = served
    commit = server.add_repo("kimi-tiny", tiny_released)
    code, stdout, err = run_cli(capsys, "pull-and-quantize", "--model", "kimi-tiny", "--bits", "8", "--group-size",
                                "32")
    assert code == 0, err
    assert stdout == "kimi-tiny-w8a16\n" and shown_lines(err)[-1].startswith(f"quantized kimi-tiny@{commit} -> ")
