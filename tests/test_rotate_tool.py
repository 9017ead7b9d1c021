"""tools/rotate_bundled.py: the bundled model with its residual stream rotated is the same function -- every reader
and writer of the residual stream found (a missed one is caught below), the norms folded in."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import rotate_bundled  # noqa: E402
import train_bundled  # noqa: E402

from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.evaluate import run_model  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402
from klconvert.synth.checkpoint import synth  # noqa: E402


@pytest.fixture(scope="module")
def reference_and_ids():
    config = KimiLinearConfig.from_file(BUNDLED_DIR / "config.json")
    ids = torch.randint(0, config.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    return run_model(BUNDLED_DIR, ids, "cpu", "float32"), ids


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("kind", rotate_bundled.ROTATIONS)
def test_rotation_is_orthogonal(kind):
    q = rotate_bundled.rotation(256, kind)
    assert torch.allclose(q @ q.T, torch.eye(256, dtype=torch.float64), atol=1e-12)
    mixes = (q.abs() > 0).all()  # a Hadamard mixes every channel into every other
    assert mixes if kind != "identity" else torch.equal(q, torch.eye(256, dtype=torch.float64))


@pytest.mark.parametrize("kind", rotate_bundled.ROTATIONS)
def test_rotated_model_is_the_same_function(tmp_path, reference_and_ids, kind):
    reference, ids = reference_and_ids
    rotate_bundled.rotate(BUNDLED_DIR, tmp_path / "rot", kind, dtype=torch.float32)
    got = run_model(tmp_path / "rot", ids, "cpu", "float32")
    assert (got.log_probs - reference.log_probs).abs().max() < 1e-3
    assert all(torch.equal(got.expert_ids[k], reference.expert_ids[k]) for k in reference.expert_ids)
    before, after = _tensors(BUNDLED_DIR), _tensors(tmp_path / "rot")
    norms = [n for n in after if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))]
    assert norms and all(torch.equal(after[n], torch.ones_like(after[n])) for n in norms + ["model.norm.weight"])
    assert set(after) == set(before) and all(after[n].shape == before[n].shape for n in before)


def test_a_missed_reader_changes_the_function(tmp_path, reference_and_ids, monkeypatch):
    reference, ids = reference_and_ids
    roles = rotate_bundled.residual_roles

    def without_b_proj(config):
        readers, writers = roles(config)
        readers["model.layers.1.input_layernorm"].remove("model.layers.1.self_attn.b_proj")
        return readers, writers

    monkeypatch.setattr(rotate_bundled, "residual_roles", without_b_proj)
    rotate_bundled.rotate(BUNDLED_DIR, tmp_path / "rot", "hadamard", dtype=torch.float32)
    got = run_model(tmp_path / "rot", ids, "cpu", "float32")
    assert (got.log_probs - reference.log_probs).abs().max() > 0.1


def test_a_folder_naming_a_shard_outside_itself_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(BUNDLED_DIR, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KLError, match="not a plain file name"):
        rotate_bundled.rotate(folder, tmp_path / "rot")
    assert not (tmp_path / "rot").exists() and not (tmp_path / "outside.safetensors").exists()


def test_the_model_folder_itself_or_any_existing_output_is_refused(tmp_path):
    """`rotate_bundled.py DIR --model DIR` rewrote DIR's shards in place, then crashed half way; an OUT inside DIR
    was written into the model folder it read."""
    folder = shutil.copytree(BUNDLED_DIR, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(KLError, match="model: is the source folder or holds it; write the rotated model somewhere"):
        rotate_bundled.rotate(folder, folder)
    with pytest.raises(KLError, match="rot: is inside the source folder"):
        rotate_bundled.rotate(folder, folder / "rot")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("mine")
    with pytest.raises(KLError, match=r"taken: is not empty \(it holds keep\); choose another output folder"):
        rotate_bundled.rotate(folder, tmp_path / "taken")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_the_output_gets_the_umasks_usual_modes(tmp_path):
    """It was left 0700 (mkdtemp's), its shards 0600 (save_file's)."""
    old = os.umask(0o022)
    try:
        rotate_bundled.rotate(BUNDLED_DIR, tmp_path / "rot", "identity")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rot").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "rot").iterdir()} == {0o644}


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """main caught only KLError: a full disk (or a folder it may not write in) was a traceback."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)   # rotate imports it as it runs
    monkeypatch.setattr(sys, "argv", ["rotate_bundled.py", str(tmp_path / "new" / "rot"), "--rotation", "identity"])
    with pytest.raises(SystemExit) as exit:
        rotate_bundled.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert f"error: disk full writing {tmp_path / 'new' / 'rot'} (" in err
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_model_folder_is_one_line_naming_the_bf16_folder_it_needs(tmp_path, monkeypatch, capsys):
    """`--model` of a folder klconvert quantized: its packed weights are under other names, and the rotation died with
    KeyError 'lm_head.weight'."""
    quantized = quantize(BUNDLED_DIR, tmp_path / "q4", bits=4, device="cpu", progress=False).path
    monkeypatch.setattr(sys, "argv", ["rotate_bundled.py", str(tmp_path / "rot"), "--model", str(quantized)])
    with pytest.raises(SystemExit) as exit:
        rotate_bundled.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {quantized}: holds compressed-tensors-quantized weights; this tool reads a bf16 folder" in err
    assert sorted(tmp_path.iterdir()) == [quantized]


def test_a_transformers_layout_model_folder_is_one_line_naming_the_folder_it_needs(tmp_path, monkeypatch, capsys):
    """`--model` of a folder in transformers' layout: it passed as bf16, and the rotation died with KeyError
    'model.layers.0.self_attn.f_a_proj.weight'."""
    ported = synth("tiny", tmp_path / "st", layout="transformers", progress=False).path
    monkeypatch.setattr(sys, "argv", ["rotate_bundled.py", str(tmp_path / "rot"), "--model", str(ported)])
    with pytest.raises(SystemExit) as exit:
        rotate_bundled.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {ported}: holds 'model.layers.0.self_attn.f_a_proj.weight' under another layout's name" in err
    assert "this tool reads a bf16 folder in the release's format" in err
    assert sorted(tmp_path.iterdir()) == [ported]


def test_a_hidden_size_hadamard_has_no_matrix_of_is_one_line_before_the_weights_are_read(tmp_path, monkeypatch,
                                                                                        capsys):
    """The default --rotation hadamard on a hidden size not a power of two (the release's 2304) was compressed-tensors'
    ValueError traceback, after every tensor was loaded; random-hadamard rotates it."""
    config = {**train_bundled.BUNDLED_CONFIG, "hidden_size": 192}   # 3 x 64: random-hadamard's known factor 12
    model = train_bundled.fresh_model(KimiLinearConfig.from_dict(config), torch.device("cpu"), 0)
    train_bundled.write_checkpoint(tmp_path / "m", config, train_bundled.canonical_state(model), BUNDLED_DIR)
    read = []
    monkeypatch.setattr("safetensors.safe_open", lambda *args: read.append(args))   # rotate imports it as it runs
    monkeypatch.setattr(sys, "argv", ["rotate_bundled.py", str(tmp_path / "rot"), "--model", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exit:
        rotate_bundled.main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and not read, err
    assert (f"error: {tmp_path / 'm'}: --rotation hadamard has no 192 x 192 matrix for its hidden_size (" in err
            and err.endswith("); use --rotation random-hadamard or --rotation identity\n"))
    monkeypatch.undo()
    rotate_bundled.rotate(tmp_path / "m", tmp_path / "rot", "random-hadamard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "rot"]
