"""tools/train_bundled.py: a few steps of the real training loop at a tiny size on CPU lower the loss, balance the
experts, and write a checkpoint klconvert loads."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import train_bundled  # noqa: E402

from klconvert.checkpoint.reader import Checkpoint  # noqa: E402
from klconvert.convert.output_folder import OUTPUT_RECORD, files_klconvert_wrote  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.runtime.engine import load  # noqa: E402
from klconvert.release import layer_lists  # noqa: E402
from klconvert.synth.tokenizer_files import write_tiktoken_files  # noqa: E402

# The bundled config cut down: 4 layers (KDA x3, MLA), hidden 128, 4 experts; the bundled vocabulary.
TINY = {**copy.deepcopy(train_bundled.BUNDLED_CONFIG), "hidden_size": 128, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_experts": 4, "kv_lora_rank": 32, "num_attention_heads": 2,
        "num_key_value_heads": 2, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "moe_intermediate_size": 64,
        "linear_attn_config": {**layer_lists(4), "head_dim": 16, "num_heads": 2, "short_conv_kernel_size": 4}}


def test_training_lowers_the_loss_and_writes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    lines = []
    log = train_bundled.train(tmp_path / "out", config=TINY, steps=12, batch=4, seq_len=32, lr=1e-2, eval_every=4,
                              validation_tokens=512, max_chars=100_000, device="cpu", plot=False,
                              bias_rate=1e-2, log=lines.append)
    assert log["steps_run"] == 12 and len(log["validation_loss"]) == 3
    assert log["train_loss"][-1] < log["train_loss"][0] - 0.5, log["train_loss"]
    assert log["validation_loss"][-1] < log["validation_loss"][0], log["validation_loss"]
    assert log["kept_step"] == log["validation_step"][log["validation_loss"].index(min(log["validation_loss"]))]
    assert set(log["expert_load_validation"]) == {"1", "2", "3"}   # the MoE layers
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == [OUTPUT_RECORD, "config.json", "loss.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "special_tokens_map.json", "tiktoken.model",
                     "tokenizer_config.json"]   # + loss.png, 2 shards
    unsharded = {name for name in files if not name.endswith(".safetensors")} - {"loss.json", OUTPUT_RECORD}
    assert unsharded == {p.name for p in BUNDLED_DIR.iterdir() if not p.name.endswith(".safetensors")}
    assert json.loads((out / "loss.json").read_text())["kept_step"] == log["kept_step"]
    ckpt = Checkpoint(out)
    bias = ckpt.get("model.layers.1.block_sparse_moe.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0       # balancing moved the correction biases
    engine = load(out, device="cpu", max_context=64, kernels="torch")
    logits = engine.forward(torch.tensor([[5, 6, 7, 8]]))
    assert logits.shape == (1, 4, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_balancing_moves_biases_toward_the_even_load():
    c = train_bundled.KimiLinearConfig.from_dict(TINY)
    model = train_bundled.fresh_model(c, torch.device("cpu"), seed=0)
    counts = {layer: torch.tensor([10.0, 0.0, 5.0, 5.0]) for layer in train_bundled.routers(model)}
    train_bundled.balance(model, counts, rate=0.5)
    bias = model.blocks[1].block_sparse_moe.gate.e_score_correction_bias
    assert bias.tolist() == [-0.5, 0.5, 0.0, 0.0]   # overloaded down, idle up, average untouched


SMALL_RUN = dict(config=TINY, steps=2, batch=2, seq_len=32, eval_every=2, validation_tokens=256, max_chars=50_000,
                 device="cpu", plot=False, log=lambda _: None)


def test_the_output_is_a_new_folder_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The run wrote into an existing folder in place: stale files stayed, and an interrupted write left new and old
    shards side by side that loaded."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(KLError, match=r"taken: is not empty \(it holds notes.txt\); choose another output folder"):
        train_bundled.train(taken, **SMALL_RUN)   # refused before the training
    someone_elses = tmp_path / "out.partial"   # a name the tool once took as its own leftovers, and deleted
    someone_elses.mkdir()
    (someone_elses / "thesis.tex").write_text("mine")
    shards_written = []

    def interrupted(path, tensors):
        shards_written.append(path)
        raise KeyboardInterrupt
    monkeypatch.setattr("klconvert.checkpoint.safetensors_writer.write_shard", interrupted)   # imported as it runs
    with pytest.raises(KeyboardInterrupt):
        train_bundled.train(tmp_path / "out", **SMALL_RUN)
    assert shards_written and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert (someone_elses / "thesis.tex").read_text() == "mine"


def test_an_empty_output_folder_is_taken_and_a_failed_plot_keeps_the_weights(tmp_path, monkeypatch):
    """The GPU machine's $OUT exists, empty (GPU_TRAIN.md writes there); the optional PNG once took the checkpoint
    down with it when matplotlib failed in another way than being absent."""
    import types

    def broken(*_):
        raise ImportError("numpy ABI mismatch, say")
    monkeypatch.setitem(sys.modules, "plot_loss", types.SimpleNamespace(plot_loss=broken))
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    train_bundled.train(out, **{**SMALL_RUN, "plot": True, "log": lines.append})
    assert (out / "loss.json").is_file() and Checkpoint(out).get("lm_head.weight").numel() > 0
    assert any("no loss.png (ImportError: numpy ABI mismatch, say)" in line for line in lines), lines


def test_bad_arguments_are_one_usage_line(tmp_path, monkeypatch, capsys):
    """Run in this process (each child took ~1.7 s of CPU importing torch): argparse's refusal is SystemExit(2) and the
    usage on stderr; an argument taken would train, which fails the test, and a traceback would leave main as another
    exception."""
    monkeypatch.setattr(train_bundled, "train", lambda *_, **__: pytest.fail("the arguments were taken"))
    for args, needle in ((["--steps", "0"], "argument --steps: '0' is not a whole number of at least 1"),
                         (["--lr", "-1"], "argument --lr: '-1' is not a positive finite number"),
                         (["--bias-rate", "nan"], "argument --bias-rate: 'nan' is not a finite number >= 0"),
                         (["--seed", "99999999999999999999"],   # a ValueError traceback from torch's manual_seed
                          "argument --seed: '99999999999999999999' is not a whole number from 0 to 4,294,967,295"),
                         (["--seed", "-1"], "argument --seed: '-1' is not a whole number from 0 to 4,294,967,295"),
                         (["--device", "bogus"], "argument --device: invalid choice: 'bogus'")):
        monkeypatch.setattr(sys, "argv", [train_bundled.__file__, "--out", str(tmp_path / "o"), *args])
        with pytest.raises(SystemExit) as refused:
            train_bundled.main()
        err = capsys.readouterr().err
        assert refused.value.code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_ends_in_one_line(tmp_path, signum, status):
    """Ctrl-C printed a KeyboardInterrupt traceback, as in every tool here; they run as the klconvert command does
    (tool_output.run_tool): one line, and the status a shell shows for the signal."""
    proc = subprocess.Popen([sys.executable, train_bundled.__file__, "--out", str(tmp_path / "out"), "--steps",
                             "1000000", "--time-budget-s", "0", "--batch", "1", "--seq-len", "8", "--eval-every",
                             "1000000", "--validation-tokens", "64", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        started = proc.stdout.readline()   # its first line comes as the training starts
        proc.send_signal(signum)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert "parameters on cpu" in started and proc.returncode == status, err
    assert err == "klconvert: interrupted\n" and not any(tmp_path.iterdir())


# the data-segment limit (ulimit -d) the step-size tests run the tool under: an allocation past it is refused, where a
# step past the host's memory was the OOM killer's (a machine's other work with it). The batch named, which then
# runs, is what fits under it: 2 GB names --batch 3 of 256 tokens (3.5 GB named 7, whose step took 12 s of CPU, 5 of
# them the kernel's, mapping the step's ~3 GB)
DATA_LIMIT = 2_000_000_000


def _under_data_limit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    return subprocess.run([sys.executable, train_bundled.__file__, "--device", "cpu", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_step_past_the_memory_left_is_refused_naming_a_batch_that_runs(tmp_path):
    """--batch 100000 drew its batch and ran into the OOM killer (no memory check): refused before the training, in
    one line naming --batch and one that fits -- which then runs under the same limit."""
    proc = _under_data_limit("--out", "out", "--batch", "100000", "--seq-len", "256", cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and not any(tmp_path.iterdir()), proc.stderr[-3000:]
    assert lines[0].startswith("train_bundled.py: error: --batch 100000 of --seq-len 256: a training step holds "
                               "about ") and "under the process's data-segment limit (ulimit -d)" in lines[0], lines
    fit = int(lines[0].split("lower --batch to ")[1].split(",")[0])
    assert fit >= 1
    proc = _under_data_limit("--out", "out", "--batch", str(fit), "--seq-len", "256", "--steps", "1",
                             "--eval-every", "1", "--validation-tokens", "600", "--time-budget-s", "0", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "out" / "loss.json").is_file(), proc.stderr[-3000:]


@pytest.mark.parametrize("tokens, said", [(10, "10 tokens"), (1, "1 token")])
def test_a_split_shorter_than_one_window_is_refused(tmp_path, tokens, said):
    """refuse_short_splits, as distill_bundled.py calls it too (without --validation-tokens, which it lacks); a split
    of one token said "1 tokens"."""
    with pytest.raises(KLError, match=rf"the validation split has {said}, not one window of --seq-len 32 and its "
                                      r"next token; lower --seq-len \(or raise --validation-tokens\)"):
        train_bundled.train(tmp_path / "out", **{**SMALL_RUN, "validation_tokens": tokens})
    assert not (tmp_path / "out").exists()


def test_a_gpu_torch_does_not_see_is_refused_before_training(tmp_path, monkeypatch):
    """--device cuda where torch sees no GPU was an AssertionError traceback ("Torch not compiled with CUDA")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KLError, match=r"device='cuda' \(--device\): no CUDA device is visible to torch; use cpu"):
        train_bundled.train(tmp_path / "out", **{**SMALL_RUN, "device": "cuda", "log": pytest.fail})
    assert not any(tmp_path.iterdir())


def test_the_loss_plot_is_listed_with_what_the_run_wrote(tmp_path, monkeypatch):
    """loss.png was drawn after the folder was sealed: its record did not list it, so `klconvert synth --force` (or
    quantize's) refused the folder for holding a file klconvert did not write."""
    import types

    def drawn(loss_json, png):
        assert json.loads(loss_json.read_text())["steps_run"] == 2
        png.write_bytes(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "plot_loss", types.SimpleNamespace(plot_loss=drawn))
    train_bundled.train(tmp_path / "out", **{**SMALL_RUN, "plot": True})
    assert files_klconvert_wrote(tmp_path / "out") == {p.name for p in (tmp_path / "out").iterdir()} - {OUTPUT_RECORD}
    assert "loss.png" in files_klconvert_wrote(tmp_path / "out")


def test_training_windows_reach_the_last_start_and_a_split_of_one_window_is_sampled():
    """Every start whose window and next token fit is drawn, the last one too; a split of exactly one window and its
    next token (what refuse_short_splits lets through) is that window, not a random_ error."""
    tokens = torch.arange(20)
    x, y = train_bundled.sample_batch(tokens, 400, 16, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}
    assert torch.equal(y, x + 1)
    x, y = train_bundled.sample_batch(torch.arange(17), 2, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(16).expand(2, 16)) and torch.equal(y, x + 1)


def test_the_first_warm_up_step_moves_the_weights(tmp_path):
    """The warm-up's rate was taken at the step's start, 0 on the first step: --steps 1 wrote the initial weights."""
    log = train_bundled.train(tmp_path / "out", **{**SMALL_RUN, "steps": 1, "eval_every": 1})
    assert len(log["lr"]) == 1 and log["lr"][0] > 0
    c = train_bundled.KimiLinearConfig.from_dict(TINY)
    initial = train_bundled.canonical_state(train_bundled.fresh_model(c, torch.device("cpu"), seed=0))
    assert not torch.equal(Checkpoint(tmp_path / "out").get("lm_head.weight"), initial["lm_head.weight"])


def test_a_tokenizer_smaller_than_the_config_is_refused(tmp_path):
    """Tokenizer.from_folder pads a tokenizer up to config.json's vocab_size: one of 1,000 ranks put in the bundled
    folder (tools/train_tokenizer.py --vocab 1000) passed the vocabulary check and trained a garbled model."""
    tok = tmp_path / "tok"
    write_tiktoken_files(tok, [bytes([b]) for b in range(256)] + [b"th", b"e "])
    shutil.copyfile(BUNDLED_DIR / "config.json", tok / "config.json")   # from_folder pads to its 4,352 ids
    with pytest.raises(KLError, match=r"tok: its tokenizer has 514 ids \(258 BPE ranks, 256 special tokens\), the "
                                      r"model's config 4,352; train one of 4,096 ranks"):
        train_bundled.train(tmp_path / "out", **{**SMALL_RUN, "tokenizer_dir": tok})
    assert not (tmp_path / "out").exists()
