"""The CPU's PyTorch forms (runtime/cpu_modules.py, what bind picks for fp32 inference on the CPU without Triton)
against the declared model's own modules: the same logits bit for bit -- prefill, decode one sequence at a time and
several together; other dtypes keep the declared modules."""
from __future__ import annotations

import torch

import klconvert
import klconvert.runtime.bind as bind_module
from klconvert.runtime import cpu_modules as C
from klconvert.runtime import model as M


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
