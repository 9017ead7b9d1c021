"""tools/distill_bundled.py: the round trip it trains through is what `klconvert quantize` stores, its steps lower
the KL they are taken on, and the folder it writes is the one it measured (a short run on CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import distill_bundled as D  # noqa: E402
from distill_modules import RoundTrip  # noqa: E402

from klconvert.checkpoint.name_map import expected_tensors  # noqa: E402
from klconvert.checkpoint.quantized import QuantizedSource  # noqa: E402
from klconvert.checkpoint.reader import Checkpoint  # noqa: E402
from klconvert.convert.output_folder import RESUME_RECORD, files_klconvert_wrote  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.quant.defaults import policy_from_options  # noqa: E402
from klconvert.quant.groupwise import quantize_groupwise  # noqa: E402
from klconvert.quant.pack_quantized import compress_weight, decompress_weight  # noqa: E402
from klconvert.quant.scheme import QuantScheme  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402
from klconvert.quantize_options import choose_policy  # noqa: E402
from klconvert.runtime import model as M  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402
from testkit import run_main  # noqa: E402

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_round_trip_is_the_stored_weight_and_passes_the_gradient_through():
    torch.manual_seed(0)
    w = torch.randn(3, 24, 256) * 0.05               # a stack of three [24, 256] weights
    for scheme in (QuantScheme(4, 128, True), QuantScheme(4, 32, False), QuantScheme(8, 128, True)):
        latent = w.clone().requires_grad_(True)
        got = RoundTrip(scheme)(latent)
        for e in range(3):
            stored = compress_weight("m", w[e].to(torch.bfloat16), scheme)
            assert torch.equal(got[e].detach(), decompress_weight(stored, scheme, torch.float32)), scheme
        assert not torch.equal(got.detach(), w)
        upstream = torch.randn_like(w)
        (got * upstream).sum().backward()
        assert torch.equal(latent.grad, upstream)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_scale_gradient_keeps_the_stored_weight_and_adds_lsq_gradient_at_the_group_edges(symmetric):
    torch.manual_seed(1)
    w = torch.randn(5, 64) * 0.05
    scheme = QuantScheme(4, 16, symmetric)
    latent = w.clone().requires_grad_(True)
    got = RoundTrip(scheme, scale_gradient=True)(latent)
    assert torch.equal(got.detach(), RoundTrip(scheme)(w).detach())        # the same stored weight
    upstream = torch.randn_like(w)
    (got * upstream).sum().backward()

    # by hand: straight through for every weight, plus sum_group g * (code - w / scale) * d scale / d w at the
    # weights that set the scale: scale = range / levels, range = max|w| (sym) or max - min (asym; min <= 0 <= max),
    # so d scale / d range = scale / range
    q, scale, zero = quantize_groupwise(w.to(torch.bfloat16), 4, 16, symmetric)
    groups, g = w.view(5, 4, 16), upstream.view(5, 4, 16)
    code = (q.view(5, 4, 16) - (0 if zero is None else zero.unsqueeze(-1))).float()
    d_scale = (g * (code - groups / scale.float().unsqueeze(-1))).sum(-1)      # [5, 4]
    want = g.clone()
    lo, hi = groups.min(-1), groups.max(-1)
    spread = torch.maximum(-lo.values, hi.values) if symmetric else hi.values - lo.values
    d_spread = d_scale * scale.float() / spread
    for r in range(5):
        for c in range(4):
            if symmetric:
                at = hi.indices[r, c] if hi.values[r, c] >= -lo.values[r, c] else lo.indices[r, c]
                want[r, c, at] += d_spread[r, c] * torch.sign(groups[r, c, at])
            else:
                want[r, c, hi.indices[r, c]] += d_spread[r, c]
                want[r, c, lo.indices[r, c]] -= d_spread[r, c]
    torch.testing.assert_close(latent.grad, want.view(5, 64), rtol=1e-4, atol=1e-6)
    assert not torch.equal(latent.grad, upstream)


def _models(scale_gradient: bool):
    teacher = D.training_model(BUNDLED_DIR, CPU).eval()
    student = D.training_model(BUNDLED_DIR, CPU)
    schemes = D.quantized_parameters(student, policy_from_options(4))
    return teacher, student, schemes, D.attach_round_trips(student, schemes, scale_gradient)


@pytest.mark.parametrize("scale_gradient", [False, True], ids=["straight", "scale_gradient"])
def test_the_policy_picks_the_quantized_parameters_and_steps_lower_the_kl(scale_gradient):
    teacher, student, schemes, latents = _models(scale_gradient)
    names = set(schemes)
    assert "lm_head.weight" in names and schemes["lm_head.weight"].bits == 8
    assert any(n.endswith("experts.w13") for n in names) and any(n.endswith("experts.w2") for n in names)
    assert not any(n.endswith(("gate.weight", "norm.weight", "embed_tokens.weight", "g_a_proj.weight",
                                "f_b_proj.weight", "conv1d.weight")) for n in names), sorted(names)
    c, policy = student.config, policy_from_options(4)
    covered = {name for pname in names for name, _ in M.canonical_names(c, pname)}
    assert covered == {n for n, spec in expected_tensors(c).items() if policy.scheme_for(n, spec.shape)}
    assert all(p.requires_grad for p in latents)
    assert not any(p.requires_grad for n, p in student.named_parameters() if "parametrizations" not in n)

    x = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = teacher(x)
    optimizer = torch.optim.Adam(latents, lr=3e-5)
    kls = []
    for _ in range(4):
        with parametrize.cached():
            loss = D.kl_per_token(target, student(x)).mean()
            kls.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    assert kls[0] > 0.01 and kls[-1] < kls[0] * 0.8, kls


def test_distill_refuses_an_existing_output_before_tuning(tmp_path):
    (tmp_path / "q4").mkdir()
    with pytest.raises(KLError, match="already exists"):
        D.distill(tmp_path / "q4", steps=10_000, device="cpu", log=lambda line: pytest.fail(line))
    for budget in (0.0, -5.0, float("nan")):
        with pytest.raises(KLError, match="positive number of seconds"):
            D.distill(tmp_path / "new", time_budget_s=budget, device="cpu", log=lambda line: pytest.fail(line))
    assert not (tmp_path / "new").exists()
    with pytest.raises(KLError, match="is inside the source folder"):
        D.distill(tmp_path / "q4" / "new", tmp_path / "q4", device="cpu", log=lambda line: pytest.fail(line))


def test_a_quantized_teacher_is_refused_before_tuning(tmp_path):
    """--model of a folder klconvert quantized was tuned against for minutes, then refused by the quantize of the
    tuned weights, naming the run's deleted temporary folder."""
    quantized = quantize(BUNDLED_DIR, tmp_path / "q4", bits=4, device="cpu", progress=False).path
    with pytest.raises(KLError, match=r"q4: holds compressed-tensors-quantized weights; this tool reads a bf16 folder"):
        D.distill(tmp_path / "out", quantized, device="cpu", log=lambda line: pytest.fail(line))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4"]


def test_a_gpu_torch_does_not_see_is_refused_before_tuning(tmp_path, monkeypatch):
    """--device cuda where torch sees no GPU was an AssertionError traceback ("Torch not compiled with CUDA")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KLError, match=r"device='cuda' \(--device\): no CUDA device is visible to torch; use cpu"):
        D.distill(tmp_path / "q4", device="cuda", log=lambda line: pytest.fail(line))
    assert not any(tmp_path.iterdir())


def test_a_short_validation_split_is_refused_with_flags_distill_has(tmp_path):
    """The refusal offered --validation-tokens, which distill_bundled.py does not take."""
    with pytest.raises(KLError) as refused:
        D.distill(tmp_path / "q4", seq_len=20_000, device="cpu", log=lambda line: pytest.fail(line))
    assert str(refused.value) == ("the validation split has 16,384 tokens, not one window of --seq-len 20000 and "
                                  "its next token; lower --seq-len")


def test_a_seed_torch_cannot_take_is_one_usage_line(tmp_path, monkeypatch, capsys):
    """--seed 99999999999999999999 ended in manual_seed's ValueError traceback. Run in this process (the child took
    ~1.9 s of CPU, most of it importing torch): argparse's refusal is SystemExit(2) with the usage on stderr; the
    argument taken would distill, which fails the test, and a traceback would leave main as another exception."""
    monkeypatch.setattr(D, "distill", lambda *_, **__: pytest.fail("the seed was taken"))
    code, _, err = run_main(capsys, D.main, [D.__file__, str(tmp_path / "q4"), "--seed", "99999999999999999999"])
    assert code == 2 and "Traceback" not in err, err
    assert "argument --seed: '99999999999999999999' is not a whole number from 0 to 4,294,967,295" in err
    assert not (tmp_path / "q4").exists()


def test_a_refusal_is_one_line_that_names_the_script(tmp_path, capsys):
    """distill said a refusal as a bare "error: ..." where every other tool says "<script>: error: ..." (h248's F6).
    Run in this process, under the script's name (argv[0], which argparse names it by), as the one above."""
    code, _, err = run_main(capsys, D.main, [D.__file__, str(tmp_path / "q4"), "--seq-len", "20000", "--device",
                                             "cpu"])
    assert code == 2 and err.splitlines() == [
        "distill_bundled.py: error: the validation split has 16,384 tokens, not one window of --seq-len 20000 and "
        "its next token; lower --seq-len"], err
    assert not (tmp_path / "q4").exists()


def test_bad_generated_settings_are_refused_before_anything_runs(tmp_path):
    for windows, share in ((-1, 0.5), (4, 0.0), (4, 1.5), (4, float("nan"))):
        with pytest.raises(KLError, match="--generated-windows"):
            D.distill(tmp_path / "q4", generated_windows=windows, generated_share=share, device="cpu",
                      log=lambda line: pytest.fail(line))
    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(KLError, match="--hidden-weight"):
            D.distill(tmp_path / "q4", hidden_weight=weight, device="cpu", log=lambda line: pytest.fail(line))
    assert not (tmp_path / "q4").exists()


def test_block_outputs_keep_the_armed_forward_and_their_distance_trains():
    """BlockOutputs keeps each block's output of the forwards run while armed, until taken (nothing while
    disarmed, as in validation); hidden_distance is zero between equal streams, and its steps lower it on the
    quantized student."""
    teacher, student, _, latents = _models(False)
    kept = D.BlockOutputs(teacher), D.BlockOutputs(student)
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        teacher(x)
    assert kept[0].take() == []
    for outputs in kept:
        outputs.arm()
    with torch.no_grad():
        teacher(x)
    mine = kept[0].take()
    assert len(mine) == len(teacher.model.layers) and all(t.shape == (2, 32, teacher.config.hidden_size) for t in mine)
    with torch.no_grad():
        teacher(x)
    assert kept[0].take() == []                                                 # take disarms
    assert D.hidden_distance(mine, mine).item() == 0.0
    optimizer = torch.optim.Adam(latents, lr=3e-5)
    distances = []
    for _ in range(4):
        kept[1].arm()
        with parametrize.cached():
            student(x)
            distance = D.hidden_distance(kept[1].take(), mine)
            distances.append(distance.item())
            optimizer.zero_grad()
            distance.backward()
        optimizer.step()
    assert distances[0] > 0 and distances[-1] < distances[0], distances


def test_teacher_windows_are_the_models_own_samples_from_the_given_first_tokens():
    first = torch.tensor([5, 100, 2000])
    got = D.teacher_windows(BUNDLED_DIR, first, 32, seed=3, device=CPU, chunk=2)   # two chunks: 2 + 1
    assert got.shape == (3, 32) and torch.equal(got[:, 0], first)
    assert torch.equal(got, D.teacher_windows(BUNDLED_DIR, first, 32, seed=3, device=CPU, chunk=2))
    assert not torch.equal(got, D.teacher_windows(BUNDLED_DIR, first, 32, seed=4, device=CPU, chunk=2))
    teacher = D.training_model(BUNDLED_DIR, CPU).eval()
    with torch.no_grad():   # sampled from the model: far likelier under it than the same tokens shuffled
        own = F.cross_entropy(teacher(got[:, :-1]).flatten(0, 1), got[:, 1:].flatten())
        mixed = got.flatten()[torch.randperm(got.numel(), generator=torch.Generator().manual_seed(0))].view(3, 32)
        other = F.cross_entropy(teacher(mixed[:, :-1]).flatten(0, 1), mixed[:, 1:].flatten())
    assert own < 0.6 * other, (own, other)


def test_a_training_batch_takes_its_share_from_the_models_own_text():
    train = torch.arange(1000)
    own = torch.arange(5000, 5000 + 6 * 16).view(6, 16)
    g = torch.Generator().manual_seed(0)
    for share, n_own in ((0.5, 2), (0.25, 1), (1.0, 4)):
        x = D.training_batch(train, own, 4, 16, share, g)
        assert x.shape == (4, 16)
        from_own = [row for row in x if any(torch.equal(row, o) for o in own)]
        assert len(from_own) == n_own, share
        for row in x[:4 - n_own]:   # the rest: windows of the training split
            assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16))
    assert torch.equal(D.training_batch(train, None, 4, 16, 0.5, torch.Generator().manual_seed(1)),
                       D.sample_batch(train, 4, 16, torch.Generator().manual_seed(1))[0])


def test_a_spent_time_budget_stops_before_the_first_step_and_writes_round_to_nearest(tmp_path):
    record = D.distill(tmp_path / "q4", steps=10_000, batch=2, seq_len=64, validation_tokens=256,
                       max_chars=200_000, time_budget_s=1e-9, device="cpu", log=lambda line: None)
    assert record["steps_run"] == 0 and record["step"] == [0] and record["kept_step"] == 0
    quantize(BUNDLED_DIR, tmp_path / "rtn", bits=4, device="cpu", progress=False)
    written = {path.name for path in (tmp_path / "q4").iterdir()}   # quantize's files and the log, nothing else
    assert written == {path.name for path in (tmp_path / "rtn").iterdir()} | {D.DISTILL_LOG}
    assert files_klconvert_wrote(tmp_path / "q4") == files_klconvert_wrote(tmp_path / "rtn") | {D.DISTILL_LOG}
    card = (tmp_path / "q4" / "README.md").read_text()   # it named the tuned weights' deleted temporary folder
    assert "from the bundled model tiny" in card and "local folder" not in card and f"`{D.DISTILL_LOG}`" in card
    ours, rtn = Checkpoint(tmp_path / "q4"), Checkpoint(tmp_path / "rtn")
    assert set(ours.sources) == set(rtn.sources)
    for name in ours.sources:   # the untuned weights through the writer and `klconvert quantize`: RTN to the bit
        assert torch.equal(ours.get(name), rtn.get(name)), name


def test_an_interrupted_quantize_into_the_output_is_refused_before_tuning(tmp_path):
    """A leftover OUT.partial was found only by the final quantize, after the whole tuning, and refused with "pass
    --force", which the tool lacks."""
    partial = tmp_path / "q4.partial"
    partial.mkdir()
    (partial / RESUME_RECORD).write_text('{"source": {"files": {}}}')   # what `klconvert quantize` takes up
    with pytest.raises(KLError, match=r"q4.partial: holds an interrupted `klconvert quantize` into .*q4; rerun that "
                                      "command to finish it, or delete it, or choose another output folder"):
        D.distill(tmp_path / "q4", steps=10_000, device="cpu", log=lambda line: pytest.fail(line))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.partial"]


def test_a_run_stopped_after_its_quantize_leaves_no_output(tmp_path, monkeypatch):
    """The log was written after the quantize had made OUT whole: a kill in between left a finished-looking folder
    without its log."""
    def quantize_then_stopped(*args, **kwargs):
        quantize(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr("klconvert.quantize.quantize", quantize_then_stopped)   # distill imports it as it runs
    with pytest.raises(KeyboardInterrupt):
        D.distill(tmp_path / "q4", batch=2, seq_len=64, validation_tokens=256, max_chars=200_000, time_budget_s=1e-9,
                  device="cpu", log=lambda line: None)
    assert not any(tmp_path.iterdir())


def test_saved_windows_come_back_as_they_were_and_bad_files_are_refused(tmp_path, monkeypatch):
    windows = torch.randint(0, 4352, (5, 64), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "own.safetensors"
    D.save_windows(path, windows, BUNDLED_DIR, 4352)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.safetensors"]      # no partial file left
    assert path.stat().st_size < windows.numel() * 2 + 1024                         # int16 ids
    got = D.load_windows(path, BUNDLED_DIR, 64, 4352)
    assert got.dtype == torch.long and torch.equal(got, windows)

    def refused(tensors: dict, match: str, teacher: str | None = None, seq_len: int = 64, vocab: int = 4352):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={"teacher": teacher or D.teacher_id(BUNDLED_DIR)})
        with pytest.raises(KLError, match=match):
            D.load_windows(bad, BUNDLED_DIR, seq_len, vocab)

    refused({"windows": windows.short()}, "not sampled from", teacher="0" * 64)
    refused({"windows": windows.short()}, r"\[n, 32\]", seq_len=32)
    refused({"windows": windows.float()}, "integer ids")
    refused({"windows": windows.short()[:0]}, "integer ids")
    refused({"windows": windows.short().flatten()}, "integer ids")
    refused({"windows": windows.short(), "more": windows.short()}, "one tensor 'windows'")
    refused({"windows": windows.short()}, "outside 0..99", vocab=100)
    refused({"windows": -windows.short() - 1}, "outside 0..4351")

    def full_disk(tensors, filename, metadata):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)   # save_windows imports it as it runs
    with pytest.raises(KLError, match="could not be written"):
        D.save_windows(tmp_path / "full.safetensors", windows, BUNDLED_DIR, 4352)
    assert not list(tmp_path.glob("full.safetensors*"))                           # nothing half-written left
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(KLError, match="not a readable safetensors file"):
        D.load_windows(tmp_path / "junk.safetensors", BUNDLED_DIR, 64, 4352)


def test_windows_kept_in_a_file_are_sampled_once_and_read_by_the_next_run(tmp_path):
    own = tmp_path / "own.safetensors"
    fail = dict(device="cpu", log=lambda line: pytest.fail(line))
    with pytest.raises(KLError, match="no such file; give --generated-windows"):
        D.distill(tmp_path / "q4", generated_file=own, **fail)
    with pytest.raises(KLError, match="its folder does not exist"):
        D.distill(tmp_path / "q4", generated_windows=3, generated_file=tmp_path / "no" / "own.safetensors", **fail)
    short = dict(steps=1, batch=2, seq_len=64, eval_every=1, validation_tokens=256, max_chars=200_000,
                 device="cpu")
    first, second = [], []
    D.distill(tmp_path / "a", generated_windows=3, generated_file=own, log=first.append, **short)
    saved = D.load_windows(own, BUNDLED_DIR, 64, 4352)
    assert saved.shape == (3, 64) and any(line.startswith("3 windows of 64 tokens") and "sampled" in line
                                          for line in first)
    record = D.distill(tmp_path / "b", generated_file=own, log=second.append, **short)
    assert f"3 windows of 64 tokens of the bf16 model's own text read from {own}" in second
    assert not any(line.startswith("sampled ") for line in second)
    assert record["settings"]["generated_windows"] == 3 and record["settings"]["generated_file"] == str(own)
    with pytest.raises(KLError, match="holds 3 windows, not --generated-windows 4"):
        D.distill(tmp_path / "c", seq_len=64, generated_windows=4, generated_file=own, **fail)
    with pytest.raises(KLError, match=r"\[n, 32\]"):
        D.distill(tmp_path / "c", seq_len=32, generated_file=own, **fail)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("recipe, generated, hidden", [(None, 0, 0.25), (RECIPES / "32gb.yaml", 3, 0.0)],
                         ids=["default-hidden", "recipe-generated"])
def test_distill_writes_the_folder_it_measured(tmp_path, recipe, generated, hidden):
    lines = []
    record = D.distill(tmp_path / "q4", recipe=recipe, steps=2, batch=2, seq_len=64, eval_every=1,
                       validation_tokens=256, max_chars=200_000, generated_windows=generated, hidden_weight=hidden,
                       device="cpu", log=lines.append)
    assert record["step"] == [0, 1, 2] and len(record["validation_kl"]) == 3
    assert record["settings"]["generated_windows"] == generated and record["settings"]["hidden_weight"] == hidden
    assert any(line.startswith("3 windows of 64 tokens of the bf16 model's own text") for line in lines) == \
        bool(generated)
    kept = record["validation_kl"][record["step"].index(record["kept_step"])]
    assert kept == min(record["validation_kl"]) == record["kept_validation_kl"]
    assert sum(line.startswith("first step done at ") for line in lines) == 1
    assert lines[-1].startswith(f"kept step {record['kept_step']}")

    out = Checkpoint(tmp_path / "q4")
    assert out.quant_method == "compressed-tensors"
    policy, _ = choose_policy(recipe=recipe)
    stored = {n: s.scheme for n, s in out.sources.items() if isinstance(s, QuantizedSource)}
    assert stored == {n: policy.scheme_for(n, spec.shape) for n, spec in out.expected.items()
                      if policy.scheme_for(n, spec.shape)}
    assert stored["model.layers.0.self_attn.q_proj.weight"].bits == (8 if recipe else 4)   # the recipe's, or not
    assert stored["model.layers.1.block_sparse_moe.experts.0.w1.weight"].bits == 4
    source = Checkpoint(BUNDLED_DIR)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.block_sparse_moe.gate.weight",
                 "model.layers.1.self_attn.g_a_proj.weight", "model.layers.1.block_sparse_moe.gate."
                 "e_score_correction_bias"):
        assert torch.equal(out.get(name), source.get(name)), name

    teacher = D.training_model(BUNDLED_DIR, CPU).eval()
    quantized = D.training_model(tmp_path / "q4", CPU).eval()
    tokens = D.token_splits(Tokenizer.from_folder(BUNDLED_DIR), 256, 200_000)["validation"]
    assert abs(D.mean_kl(teacher, quantized, tokens, 2, 64, CPU) - kept) < 1e-6


@pytest.mark.skipif(not (torch.cuda.is_available() and D.fla_installed()), reason="needs CUDA and fla-core")
def test_fla_chunk_follows_the_pytorch_training_forward_and_its_gradient():
    cuda = torch.device("cuda")
    x = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(2)).to(cuda)
    grads = []
    for fla in (False, True):
        model = D.training_model(BUNDLED_DIR, cuda, fla)
        weight = model.model.layers[1].self_attn.in_proj.q_proj.weight.requires_grad_(True)   # a KDA input
        logits = model(x)
        logits.float().logsumexp(-1).mean().backward()
        grads.append((logits.detach(), weight.grad))
    (ref, ref_grad), (got, got_grad) = grads
    assert (got - ref).norm() / ref.norm() < 1e-2
    assert F.cosine_similarity(got_grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
