"""DeviceExperts: the dense experts' dispatch on the device (what lets a bf16 model's decode step be captured)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from klconvert.config import KimiLinearConfig
from klconvert.models import BUNDLED_DIR
from klconvert.runtime import model as M
from klconvert.runtime.decode_step import capturable
from klconvert.runtime.device_experts import DeviceExperts

# ops whose result shape or value the host must read: none may run where DeviceExperts says it stays on the device
HOST_READS = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "_local_scalar_dense", "item"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def config() -> KimiLinearConfig:
    return KimiLinearConfig.from_dict(json.loads((BUNDLED_DIR / "config.json").read_text()))   # 8 experts, top 2


def experts_pair(c: KimiLinearConfig) -> tuple[M.Experts, M.Experts]:
    """The same random stack twice: as declared (the loop) and adopted."""
    g = torch.Generator().manual_seed(0)
    E, I, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / I**0.5
    pair = []
    for _ in range(2):
        e = M.Experts.__new__(M.Experts)
        nn.Module.__init__(e)
        e.w13, e.w2 = nn.Parameter(w13.clone(), requires_grad=False), nn.Parameter(w2.clone(), requires_grad=False)
        pair.append(e)
    DeviceExperts.adopt(pair[1])
    return pair[0], pair[1]


def routing(c: KimiLinearConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c.hidden_size, generator=g)
    ids = torch.rand(n, c.num_experts, generator=g).argsort(dim=1)[:, :c.num_experts_per_token]  # distinct a token
    weights = torch.rand(n, c.num_experts_per_token, generator=g)
    return x, ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5, 64, 65])   # 65: over the limit, the reference loop
def test_device_experts_give_the_reference_loops_output(n, dtype):
    """The same products rounded the same way in each dtype; only the fp32 sum over the chosen experts runs in
    another order (bf16: the output's one rounding apart at most)."""
    c = config()
    reference, device = (e.to(dtype) for e in experts_pair(c))
    shared = nn.Linear(c.hidden_size, c.hidden_size, bias=False).to(dtype)
    x, ids, weights = routing(c, n, seed=n)
    with torch.no_grad():
        want, got = reference(x.to(dtype), ids, weights, shared), device(x.to(dtype), ids, weights, shared)
    assert isinstance(device, DeviceExperts) and device.on_device(n) == (n <= DeviceExperts.MAX_TOKENS)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_device_experts_never_ask_the_host_up_to_their_limit(n):
    c = config()
    reference, device = experts_pair(c)
    shared = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
    x, ids, weights = routing(c, n, seed=n)
    with torch.no_grad(), HostReads() as ours:
        device(x, ids, weights, shared)
    with torch.no_grad(), HostReads() as loop:
        reference(x, ids, weights, shared)
    assert ours.seen == set()
    assert loop.seen, "the reference loop reads the chosen experts on the host: the check must see that"


def test_a_model_captures_a_batch_only_where_all_its_experts_stay_on_the_device():
    c = config()
    model = M.KimiLinear(c)   # on meta: the modules, no weights
    assert not capturable(model, 1)           # the reference loop
    for m in model.modules():
        if isinstance(m, M.Experts):
            DeviceExperts.adopt(m)
    assert capturable(model, 1) and capturable(model, DeviceExperts.MAX_TOKENS)
    assert not capturable(model, DeviceExperts.MAX_TOKENS + 1)


def test_a_stack_over_the_size_bound_keeps_the_reference_loop(monkeypatch):
    c = config()
    small, large = experts_pair(c)[0], experts_pair(c)[0]
    size = sum(w.numel() * w.element_size() for w in (small.w13, small.w2))
    monkeypatch.setattr(DeviceExperts, "MAX_BYTES", size)
    DeviceExperts.adopt(small)
    monkeypatch.setattr(DeviceExperts, "MAX_BYTES", size - 1)
    DeviceExperts.adopt(large)
    assert type(small) is DeviceExperts and type(large) is M.Experts


def test_a_model_holding_device_experts_decodes_as_with_the_loop():
    """The bundled model in bf16 on the CPU (no CPU forms: the declared MoE), once as loaded (the loop) and once with
    its experts adopted as bind adopts them on CUDA: a 3-sequence prefill (over the token limit: the loop both times)
    then 8 decode steps (3 tokens: on the device) give the same logits to bf16 rounding."""
    import klconvert

    ids = torch.randint(0, 4096, (3, 32), generator=torch.Generator().manual_seed(4))
    logits = []
    for adopt in (False, True):
        engine = klconvert.load(BUNDLED_DIR, device="cpu", dtype=torch.bfloat16, max_context=40, batch=3,
                                kernels="torch")
        stacks = [m for m in engine.model.modules() if isinstance(m, M.Experts)]
        assert stacks and all(type(m) is M.Experts for m in stacks)
        if adopt:
            for m in stacks:
                DeviceExperts.adopt(m)
            assert all(type(m) is DeviceExperts for m in stacks)
        got = [engine.forward(ids[:, :24])[:, -1]]
        got += [engine.decode_step(ids[:, t], t) for t in range(24, 32)]
        logits.append(torch.stack(got).float())
    # 0.0 on torch 2.13 and 2.14; 1.6e-3 on 2.15, whose bf16 CPU matmul of one row no longer equals that row of a
    # 3-row product (the loop runs each expert on its 1-2 tokens, the stack on all 3); experts mixed up: 0.17
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-2
