"""The fixed-shape decode step: it equals the prefill path, runs several sequences of different lengths at their own
positions exactly as each runs alone, and an e4m3 latent cache stays close to the full-precision one."""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import klconvert
from klconvert.runtime.decode_step import DecodeStep, capturable

ROOT = Path(__file__).parents[1]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_decode_step_equals_prefill_over_64_steps(trained_like):
    """Token by token through DecodeStep (positions in a device tensor, attention over the whole planned cache
    with a length) against the prefill path's logits for the same 80 tokens: fp32, within 1e-5."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=96)
    ids = torch.randint(0, engine.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    full = engine.forward(ids)[0]                                     # [80, vocab]
    step = engine.decoder(1)
    engine.forward(ids[:, :16])
    for t in range(16, 80):
        step.tokens.copy_(ids[:, t])
        step.positions.fill_(t)
        assert rel(step.step()[0], full[t]) < 1e-5, t


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float8_e4m3fn"])
def test_a_cpu_step_reads_no_cache_row_past_the_furthest_position(trained_like, cache_dtype):
    """On the CPU a step costs the tokens so far, not the planned context: rows past every sequence's position,
    poisoned with NaN, never reach the logits (masked rows that were read would: 0 * NaN)."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=64, batch=2,
                            mla_cache_dtype=cache_dtype)
    step = engine.decoder(2)
    engine.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=1)
    poison = engine.state.mla_scale if engine.state.mla_scale is not None else engine.state.mla_cache
    poison[:, :, 9:] = float("nan")
    step.tokens.copy_(torch.tensor([9, 10]))
    step.positions.copy_(torch.tensor([3, 8]))
    assert torch.isfinite(step.step()).all()


def test_batch_of_different_lengths_equals_each_alone(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=64, batch=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 1)]
    together = engine.generate(prompts, max_new_tokens=12, stop_ids=frozenset())
    assert together.shape == (3, 12)
    for b, prompt in enumerate(prompts):
        alone = engine.generate([prompt], max_new_tokens=12, stop_ids=frozenset())
        assert alone[0].tolist() == together[b].tolist(), b


def test_generate_streams_every_token_of_every_sequence(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32, batch=2)
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, on_token=lambda b, t: seen[b].append(t))
    assert [seen[0], seen[1]] == out.tolist()


def test_no_new_tokens_still_prefills(trained_like):
    """`run --max-new-tokens 0` puts the prompts through the model and stops: no ids, and the prefill timed, so
    the summary's prefill tokens/s is a real figure (it read 0.0 when nothing ran)."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32, batch=2)
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=0)
    assert out.shape == (2, 0) and engine.stats.new_tokens == 0
    assert engine.stats.prompt_tokens == 5 and engine.stats.prefill_seconds > 0 and engine.stats.prefill_tps > 0


def test_decode_rate_is_timed_from_the_second_step(trained_like, monkeypatch):
    """The first step of a process pays one-off costs (on CUDA, loading the GPU code of the loop's ops: 40-70 ms
    an op on an H100), so the decode rate is timed over the steps after it; a lone step is timed itself."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32)
    step, calls = engine.decoder(1), []
    replay = step.step

    def first_slow():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return replay()
    monkeypatch.setattr(step, "step", first_slow)
    out = engine.generate([[1, 2, 3]], max_new_tokens=6, stop_ids=frozenset())
    s = engine.stats
    assert out.shape == (1, 6) and (s.steps, s.timed_steps) == (5, 4) and len(calls) == 5
    assert 0 < s.decode_seconds < 0.5 and s.decode_tps == 4 / s.decode_seconds
    calls.clear()
    engine.generate([[1, 2, 3]], max_new_tokens=2, stop_ids=frozenset())
    assert (engine.stats.steps, engine.stats.timed_steps) == (1, 1) and engine.stats.decode_seconds >= 0.5


def test_stop_token_ends_a_sequence_and_pads_it(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32)
    free = engine.generate([[7, 8, 9]], max_new_tokens=8, stop_ids=frozenset())[0].tolist()
    stop = free[2]
    stopped = engine.generate([[7, 8, 9]], max_new_tokens=8, stop_ids=frozenset({stop}))[0].tolist()
    first = free.index(stop)
    assert stopped[:first + 1] == free[:first + 1] and len(stopped) == first + 1


def test_new_tokens_count_each_sequence_up_to_its_stop(trained_like):
    """The summary's `N new`: each sequence's tokens through its stop id, not the padding after it."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32, batch=2)
    prompts = [[7, 8, 9], [4, 5]]
    stop = engine.generate(prompts, max_new_tokens=8, stop_ids=frozenset())[0].tolist()[1]
    out = engine.generate(prompts, max_new_tokens=8, stop_ids=frozenset({stop})).tolist()
    made = [row.index(stop) + 1 if stop in row else len(row) for row in out]
    assert made[0] == 2 and engine.stats.new_tokens == sum(made) < 2 * len(out[0])
    # the decode rate counts the same tokens: those of the timed steps (columns 2..) before each sequence's stop
    s = engine.stats
    assert s.timed_tokens == sum(max(0, m - 2) for m in made) < s.timed_steps * 2
    assert s.decode_tps == s.timed_tokens / s.decode_seconds


def test_sampling_is_seeded(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=48)
    run = lambda seed: engine.generate([[3, 1, 4]], max_new_tokens=24, temperature=1.0, top_p=0.9,  # noqa: E731
                                       seed=seed)[0].tolist()
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_fp8_latent_cache_stays_close_to_full_precision(trained_like):
    """e4m3 rows with one fp32 scale per row: 3 significant bits. Bound: 0.5% relative on the decode logits, about 4x
    what it reads (0.11%); each MLA layer reading layer 0's row scales read 2.0%, under the 5% this bound was."""
    ids = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(2))
    out = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=48,
                                mla_cache_dtype=dtype)
        engine.forward(ids[:, :32])
        out[dtype] = torch.stack([engine.decode_step(ids[:, t], t) for t in range(32, 40)])
    assert engine.state.mla_cache.dtype == torch.float8_e4m3fn and engine.state.mla_scale is not None
    # the KDA state stays fp32 whatever the cache (README: plan's bfloat16 state is a size, not something run runs)
    assert engine.state.kda_state.dtype == torch.float32
    assert rel(out["float8_e4m3fn"], out["bfloat16"]) < 0.005, rel(out["float8_e4m3fn"], out["bfloat16"])


def test_eager_decode_step_needs_no_graph(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=16)
    assert isinstance(engine.decoder(1), DecodeStep) and engine.decoder(1).graph is None
    assert not capturable(engine.model, 1)   # unquantized experts on the CPU: the reference loop, which asks the host


def test_kernels_import_nothing_from_the_rest_of_the_package():
    """Absolute imports of klconvert, and relative ones reaching above kernels/ (`from ..errors`, which is
    klconvert.errors once installed), are refused; `from .pdl` within kernels/ is its own."""
    paths = sorted((ROOT / "kernels").rglob("*.py"))
    assert len(paths) >= 10, paths   # the folder was found, or this test would check nothing
    for path in paths:
        depth = len(path.relative_to(ROOT / "kernels").parts)   # 1 for kernels/x.py: `from .` stays in kernels/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= depth, f"{path.name} imports from above kernels/: {'.' * node.level}{node.module}"
                assert node.level or not (node.module or "").startswith("klconvert"), \
                    f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("klconvert") for a in node.names), path.name


def test_the_naive_twins_and_the_layout_import_without_triton():
    """The twins are plain PyTorch (kernels/__init__.py), as is the packed layout the memory plan reads: two twins
    took PackedLinear and PackedExperts from their Triton modules, and failed to import without Triton (helper-128)."""
    modules = sorted(f"klconvert.kernels.{p.stem}" for p in (ROOT / "kernels").glob("naive_*.py")) + \
        ["klconvert.kernels.int_layout"]
    assert len(modules) >= 6, modules
    script = "import importlib, sys\nsys.modules['triton'] = None\n" + \
        "".join(f"importlib.import_module({m!r})\n" for m in modules) + "print('imported')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout == "imported\n", done.stderr[-2000:]


def decode_each(step, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The step's logits [T - start, B, vocab] for tokens ids[:, start:], one decode step per position after a
    prefill of ids[:, :start]."""
    got = []
    for t in range(start, ids.shape[1]):
        step.tokens.copy_(ids[:, t])
        step.positions.fill_(t)
        got.append(step.step().clone())
    return torch.stack(got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_equals_eager_bit_for_bit(trained_like, tmp_path):
    from klconvert.quantize import quantize

    q = quantize(trained_like, tmp_path / "q", bits=4, group_size=128, device="cpu", progress=False).path
    ids = torch.randint(0, 1024, (1, 80), device="cuda")
    logits = {}
    for graph in (True, False):
        engine = klconvert.load(q, device="cuda", max_context=96, kernels="triton", cuda_graph=graph)
        step = engine.decoder(1)
        assert (step.graph is not None) is graph
        engine.forward(ids[:, :16])
        logits[graph] = decode_each(step, ids, 16)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8])
def test_dense_experts_decode_in_a_graph_equal_to_eager(batch):
    """The bundled model as released (bf16, experts not quantized): bind adopts its experts as DeviceExperts,
    which never ask the host at decode, so the step is captured and replays the eager step bit for bit."""
    from klconvert.models import BUNDLED_DIR

    ids = torch.randint(0, 4096, (batch, 48), generator=torch.Generator().manual_seed(batch)).cuda()
    logits = {}
    for graph in (True, False):
        engine = klconvert.load(BUNDLED_DIR, device="cuda", max_context=64, batch=batch, kernels="triton",
                                cuda_graph=graph)
        step = engine.decoder(batch)
        assert (step.graph is not None) is graph
        engine.forward(ids[:, :16])
        logits[graph] = decode_each(step, ids, 16)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steps_of_several_batch_sizes_share_one_graph_pool_and_replay_as_eager():
    """Each batch size's step was captured into a pool of its own, all kept (a program decoding at batch 1..16 held
    sixteen). They share one now, and one logits buffer of the planned batch's rows, outside the pool (logits made
    inside a capture could lie in the scratch of a step captured before: batch 4's, captured first here): replayed
    in turns, each gives the eager step's logits bit for bit, in its rows of that buffer."""
    from klconvert.models import BUNDLED_DIR

    engine = klconvert.load(BUNDLED_DIR, device="cuda", max_context=64, batch=4, kernels="triton")
    order = [4, 1, 3, 2, 4, 1, 2, 3]
    ids = torch.randint(0, 4096, (len(order), 4), generator=torch.Generator().manual_seed(0)).cuda()
    steps = {n: engine.decoder(n) for n in dict.fromkeys(order)}   # captured in that order: 4, 1, 3, 2
    assert all(step.graph is not None for step in steps.values())
    assert len({step.graph.pool() for step in steps.values()}) == 1
    assert {step.logits.data_ptr() for step in steps.values()} == {steps[4].logits.data_ptr()}
    assert all(step.logits.shape[0] == n for n, step in steps.items())
    kda, conv = engine.state.kda_state.clone(), engine.state.conv_state.clone()
    runs = []
    for eager in (True, False):
        engine.state.kda_state.copy_(kda)
        engine.state.conv_state.copy_(conv)
        got = []
        for t, n in enumerate(order):
            step = steps[n]
            step.tokens.copy_(ids[t, :n])
            step.positions.fill_(t)
            with torch.inference_mode():
                got.append((step.eager() if eager else step.step()).clone())
        runs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_at_8_real_layers_is_as_close_to_fp32_as_bf16_is():
    """8 real-size layers, int4 weights with calm routers: the Triton path (graph decode included) is no further
    from the PyTorch path in fp32 than the PyTorch path in bf16 is (within 1.5x its relative error)."""
    from klconvert.bench import random_quantized_weights
    from klconvert.config import KimiLinearConfig
    from klconvert.presets import preset_config
    from klconvert.runtime.engine import Engine

    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", 8))
    weights = random_quantized_weights(config, 4, "cuda", calm=True)
    ids = torch.randint(0, 163584, (1, 64), generator=torch.Generator().manual_seed(3)).cuda()
    logits = {}
    for name, dtype, kernels in (("fp32", torch.float32, "torch"), ("bf16", torch.bfloat16, "torch"),
                                 ("fast", torch.bfloat16, "triton")):
        engine = Engine(config, weights.read, torch.device("cuda"), dtype, 80, 1, packed=weights.packed,
                        kernels=kernels, stored_schemes=weights.schemes)
        step = engine.decoder(1)
        prefill = engine.forward(ids[:, :56])[0]
        logits[name] = torch.cat([prefill, decode_each(step, ids, 56)[:, 0]]).float()
        del engine, step
        torch.cuda.empty_cache()
    assert rel(logits["fast"], logits["fp32"]) <= 1.5 * rel(logits["bf16"], logits["fp32"])


def test_a_context_over_the_model_limit_is_refused_on_load_and_on_resize(trained_like):
    with pytest.raises(klconvert.KLError, match="over the model's model_max_length"):
        klconvert.load(trained_like, device="cpu", max_context=2**21)
    engine = klconvert.load(trained_like, device="cpu", max_context=16)
    with pytest.raises(klconvert.KLError, match="over the model's model_max_length"):
        engine.resize(2**21, 1)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper or later GPU")
def test_graph_with_pdl_equals_graph_without_bit_for_bit(monkeypatch):
    """4 real-size layers, int4 weights: the captured step whose kernels start early (PDL: each prefetches its
    weights while the one before runs, then waits for its inputs) gives exactly the logits of the same step
    without it (KLCONVERT_PDL=0), over 64 steps."""
    from klconvert.bench import random_quantized_weights
    from klconvert.config import KimiLinearConfig
    from klconvert.presets import preset_config
    from klconvert.runtime.engine import Engine

    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", 4))
    weights = random_quantized_weights(config, 4, "cuda", calm=True)
    ids = torch.randint(0, 163584, (1, 80), generator=torch.Generator().manual_seed(5)).cuda()
    logits = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("KLCONVERT_PDL", pdl)
        engine = Engine(config, weights.read, torch.device("cuda"), torch.bfloat16, 96, 1, packed=weights.packed,
                        kernels="triton", stored_schemes=weights.schemes)
        step = engine.decoder(1)
        engine.forward(ids[:, :16])
        logits[pdl] = decode_each(step, ids, 16)
        del engine, step
        torch.cuda.empty_cache()
    assert torch.equal(logits["1"], logits["0"])
