"""The CPU's PyTorch forms (runtime/cpu_modules.py, what bind picks for fp32 inference on the CPU without Triton)
against the declared model's own modules: the same logits bit for bit -- prefill, decode one sequence at a time and
several together; other dtypes keep the declared modules."""
from __future__ import annotations

import re

import pytest
import torch

import klconvert
import klconvert.runtime.bind as bind_module
import klconvert.runtime.engine as engine_module
from klconvert.errors import KLError
from klconvert.runtime import cpu_modules as C
from klconvert.runtime import model as M
from klconvert.runtime.host_memory import HostMemory
from klconvert.runtime.memory_plan import DECODE_COPIES
from klconvert.units import size_text


def load_pair(folder, monkeypatch, **kw):
    fast = klconvert.load(folder, device="cpu", kernels="torch", **kw)
    with monkeypatch.context() as m:
        m.setattr(bind_module, "_swap_cpu", lambda model: None)
        reference = klconvert.load(folder, device="cpu", kernels="torch", **kw)
    return fast, reference


def decode_logits(engine, ids, start):
    engine.forward(ids[:, :start])
    return torch.stack([engine.decode_step(ids[:, t], t) for t in range(start, ids.shape[1])])


def test_bind_picks_the_cpu_forms(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32, kernels="torch")
    kinds = {type(m) for m in engine.model.modules()}
    assert {C.CPUKDAMixer, C.CPUMLAMixer, C.CPUMoE, C.CPUDenseMLP, C.CPURMSNorm, C.CPULatentAttention} <= kinds
    assert M.RMSNorm not in kinds and all(m.fast for m in engine.model.modules() if isinstance(m, C.CPUMoE))
    assert any(isinstance(m, M.Experts) for m in engine.model.modules())      # the reference loop stays reachable
    assert not any("cpu" in n for n, _ in engine.model.named_parameters())      # the checkpoint's names only
    linears = [m for m in engine.model.modules() if type(m) in (M.Linear, M.Router)]
    assert linears and all(m.weight.t().is_contiguous() for m in linears)     # laid out [in, out] (bind._cpu_layout)


def test_a_model_bound_for_training_keeps_the_declared_modules(trained_like):
    """restack=False (training, the ONNX export) keeps the declared modules with their [out, in] weights, fp32 on the
    CPU too: the forms hold copies of the weights (bf16 ones, laid out [in, out]) that an optimizer's steps on the
    parameters would not reach."""
    from klconvert.checkpoint.reader import open_checkpoint

    checkpoint = open_checkpoint(trained_like)
    model = bind_module.bind(M.KimiLinear(checkpoint.config), checkpoint.get, None, {}, torch.device("cpu"),
                             torch.float32, triton=False, restack=False)
    kinds = {type(m) for m in model.modules()}
    assert M.RMSNorm in kinds and not [k for k in kinds if k.__module__ == C.__name__]
    assert all(m.weight.is_contiguous() for m in model.modules() if type(m) in (M.Linear, M.Router))


def test_the_forms_hold_bf16_weights_as_bf16(trained_like):
    """A bf16 checkpoint's weights, upcast to fp32 at load, are held in bf16 by the forms (half the bytes a token
    streams) in the layout they had; `.float()` gives the fp32 weight back exactly."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=16, kernels="torch")
    kda = next(m for m in engine.model.modules() if isinstance(m, C.CPUKDAMixer))
    weight = kda.in_proj.parts[0].weight
    assert kda.cpu_in.dtype == torch.bfloat16 and kda.cpu_in.stride() == weight.stride()
    assert torch.equal(kda.cpu_in.float(), weight)
    moe = next(m for m in engine.model.modules() if isinstance(m, C.CPUMoE))
    assert all(w.dtype == torch.bfloat16 for w in moe.w13 + moe.w2 + [moe.stacked, moe.shared_down])


def test_a_weight_that_is_not_all_bf16_values_stays_fp32():
    w = C.column_major(torch.randn(48, 32))                                  # fp32 values, [in, out] in memory
    held = C._held(w)
    assert held.dtype == torch.float32 and torch.equal(held, w) and held.stride() == w.stride()
    exact = w.bfloat16().float()
    held = C._held(exact)
    assert held.dtype == torch.bfloat16 and held.stride() == exact.stride() and torch.equal(held.float(), exact)


def test_fp32_equals_the_reference_bit_for_bit(trained_like, monkeypatch):
    fast, reference = load_pair(trained_like, monkeypatch, dtype=torch.float32, max_context=64)
    ids = torch.randint(0, fast.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(4))
    assert torch.equal(fast.forward(ids), reference.forward(ids))
    assert torch.equal(decode_logits(fast, ids, 8), decode_logits(reference, ids, 8))
    prompts = [[5, 6, 7], [9] * 11, [1]]
    assert torch.equal(fast.generate(prompts[:1], 24), reference.generate(prompts[:1], 24))


def test_a_batch_equals_the_reference_bit_for_bit(trained_like, monkeypatch):
    fast, reference = load_pair(trained_like, monkeypatch, dtype=torch.float32, max_context=40, batch=3)
    prompts = [[5, 6, 7], [9] * 11, [1]]
    assert torch.equal(fast.generate(prompts, 16), reference.generate(prompts, 16))


def held_bytes(engine) -> int:
    """Every tensor an engine's model holds -- parameters, buffers and what a module keeps as an attribute, alone or
    in a list -- each storage once: what the weights cost the host."""
    storages = {}
    for module in engine.model.modules():
        for value in vars(module).values():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for t in values:
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("dtype, not_bf16", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_the_plan_counts_the_weights_the_engine_holds(monkeypatch, dtype, not_bf16):
    """In fp32 the forms hold decode copies beside the fp32 weights, which the plan did not count: on tiny it held
    65,848,696 bytes of tensors for a plan of 47,029,520, so `run`'s total and the host's fit check were 40% short.
    The plan now foresees them before any weight is read, to within the forms' constants, and counts what bind
    built once it has: so too for values that are not bf16 ones (kept fp32, the stacks then fp32 copies)."""
    if not_bf16:
        monkeypatch.setattr(C, "_held", lambda w: w.detach())
    engine = klconvert.load("tiny", device="cpu", dtype=dtype, max_context=64, kernels="torch")
    assert held_bytes(engine) == engine.plan.weights
    copies = engine.plan.weight_bytes[DECODE_COPIES]
    if dtype == torch.bfloat16:
        assert copies == 0
    elif not not_bf16:
        assert 0 <= copies - C.planned_copy_bytes(engine.config) < copies / 1000


def test_the_hosts_fit_check_counts_the_decode_copies(monkeypatch):
    """The host's check, before any weight is read, counts the copies too: a host with room for the fp32 weights
    alone was let load them and the copies beside."""
    plan = klconvert.load("tiny", device="cpu", max_context=64, kernels="torch").plan
    room = plan.total - plan.weight_bytes[DECODE_COPIES] // 2
    monkeypatch.setattr(engine_module, "host_memory", lambda **_: HostMemory(room))
    with pytest.raises(KLError, match=rf"^the plan needs {re.escape(size_text(plan.total))} but cpu has "):
        klconvert.load("tiny", device="cpu", max_context=64, kernels="torch")


def test_bf16_keeps_the_declared_modules(trained_like):
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.bfloat16, max_context=16, kernels="torch")
    assert not any(type(m).__module__ == C.__name__ for m in engine.model.modules())
    assert engine.model.lm_head.weight.is_contiguous()                          # and their [out, in] layout


def test_a_hooked_router_is_still_called(trained_like):
    """klconvert bench and eval read the routers' choices through forward hooks: the MoE then calls the router."""
    engine = klconvert.load(trained_like, device="cpu", dtype=torch.float32, max_context=32, kernels="torch")
    seen = []
    moe = engine.model.blocks[1].ffn
    hook = moe.gate.register_forward_hook(lambda m, a, r: seen.append(r[0].tolist()))
    engine.generate([[3, 1, 4]], 3)
    hook.remove()
    assert isinstance(moe, C.CPUMoE) and len(seen) == 1 + 2       # the prefill, then two decode steps
