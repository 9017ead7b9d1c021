"""kda_decode and kda_layer_step against their fp32 twins: single steps, extreme gates, long chains, bf16-state
drift."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, poisoned
from testkit import rel_error

from klconvert.kernels.kda_decode import LAYER_STEP_LAUNCH, kda_decode, kda_layer_step
from klconvert.kernels.naive_kda import naive_kda_decode, naive_kda_layer_step

# relative RMS bounds vs the fp32 twin: fp32 throughout; bf16 inputs/outputs or state, rounded once per step
BOUND = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
K_RANK = 48  # the gates' low rank in the small tests: not a multiple of the kernel's 32-wide rank chunk


def step_inputs(B, H, K, V, dtype, g_raw=None, beta_raw=None, device=DEVICE):
    q, k = (torch.randn(B, H, K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, V, device=device, dtype=dtype)
    g = (torch.randn(B, H, K, device=device, dtype=dtype) if g_raw is None
         else torch.full((B, H, K), g_raw, device=device, dtype=dtype))
    beta = (torch.randn(B, H, device=device, dtype=dtype) if beta_raw is None
            else torch.full((B, H), beta_raw, device=device, dtype=dtype))
    return q, k, v, g, beta


def gate_params(H, K, device=DEVICE, a_log=None):
    A_log = torch.randn(H, device=device) if a_log is None else torch.full((H,), a_log, device=device)
    return A_log, torch.randn(H * K, device=device)


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.bfloat16)])
def test_kda_decode(B, dtype, state_dtype):
    H, K, V = 2, 40, 24  # K, V not multiples of the 32-wide v block or any power of two
    q, k, v, g, beta = step_inputs(B, H, K, V, dtype)
    A_log, dt_bias = gate_params(H, K)
    state = torch.randn(B, H, K, V, device=DEVICE).to(state_dtype)
    ref_state = state.clone()
    o = kda_decode(q, k, v, g, beta, state, A_log=A_log, dt_bias=dt_bias, out=poisoned(B, H, V, dtype=dtype))
    ref = naive_kda_decode(q, k, v, g, beta, ref_state, A_log=A_log, dt_bias=dt_bias)
    assert_close(o, ref, BOUND[dtype], "o")
    assert_close(state, ref_state, BOUND[state_dtype], "state")


@pytest.mark.parametrize("g_raw, a_log", [(-30.0, 0.0), (30.0, 3.0), (None, None)])  # decay ~1, decay 0, random
@pytest.mark.parametrize("beta_raw", [-30.0, 30.0])  # beta ~0 (state only decays), beta ~1 (full overwrite)
def test_kda_decode_extreme_gates(g_raw, a_log, beta_raw):
    B, H, K, V = 3, 2, 32, 32
    q, k, v, g, beta = step_inputs(B, H, K, V, torch.float32, g_raw, beta_raw)
    A_log, dt_bias = gate_params(H, K, a_log=a_log)
    dt_bias = dt_bias if g_raw is None else torch.zeros_like(dt_bias)
    state = torch.randn(B, H, K, V, device=DEVICE)
    ref_state = state.clone()
    o = kda_decode(q, k, v, g, beta, state, A_log=A_log, dt_bias=dt_bias, out=poisoned(B, H, V, dtype=q.dtype))
    ref = naive_kda_decode(q, k, v, g, beta, ref_state, A_log=A_log, dt_bias=dt_bias)
    assert_close(o, ref, BOUND[torch.float32], "o")
    assert_close(state, ref_state, BOUND[torch.float32], "state")


def layer_inputs(B, H, K, V, W, dtype, device=DEVICE, ranks=(K_RANK, K_RANK)):
    """The gates' low-rank pairs at ranks (f, g): weights scaled so g_raw and gate_raw come out ~N(0, 1)."""
    C = 2 * H * K + H * V
    rf, rg = ranks
    return dict(
        x_qkv=torch.randn(B, C, device=device, dtype=dtype),
        conv_state=torch.randn(B, C, W - 1, device=device, dtype=dtype),
        conv_weight=torch.randn(C, 1, W, device=device) * 0.5,
        f_a=torch.randn(B, rf, device=device, dtype=dtype),
        beta_raw=torch.randn(B, H, device=device, dtype=dtype),
        g_a=torch.randn(B, rg, device=device, dtype=dtype),
        state=torch.randn(B, H, K, V, device=device),
        f_b_weight=(torch.randn(H * K, rf, device=device) * rf ** -0.5).to(dtype),
        g_b_weight=(torch.randn(H * V, rg, device=device) * rg ** -0.5).to(dtype),
    )


def run_layer_step(fn, inputs, **options):
    named = {n: inputs[n] for n in ("A_log", "dt_bias", "o_norm_weight", "f_b_weight", "g_b_weight")}
    args = [inputs[n] for n in ("x_qkv", "conv_state", "conv_weight", "f_a", "beta_raw", "g_a", "state")]
    return fn(*args, **named, eps=1e-5, **options)


# V = 40: one v block, or three (the last partial)
@pytest.mark.parametrize("B, block_v", [(1, 64), (3, 16), pytest.param(17, 64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("ranks", [(K_RANK, K_RANK), (20, 70)])
def test_kda_layer_step(B, block_v, dtype, state_dtype, ranks):
    H, K, V, W = 2, 24, 40, 4
    inputs = layer_inputs(B, H, K, V, W, dtype, ranks=ranks)
    inputs["state"] = inputs["state"].to(state_dtype)
    inputs.update(zip(("A_log", "dt_bias"), gate_params(H, K)), o_norm_weight=torch.randn(V, device=DEVICE))
    ref_inputs = {n: t.clone() for n, t in inputs.items()}
    o = run_layer_step(kda_layer_step, inputs, out=poisoned(B, H * V, dtype=dtype), block_v=block_v)
    ref = run_layer_step(naive_kda_layer_step, ref_inputs)
    assert_close(o, ref, BOUND[dtype], "o")
    assert_close(inputs["state"], ref_inputs["state"], BOUND[state_dtype], "state")
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"]), "conv state"


def test_kda_layer_step_strided_rows():
    """Rows may be slices of wider buffers (a projection output, a slot cache)."""
    B, H, K, V, W = 3, 2, 16, 16, 4
    inputs = layer_inputs(B, H, K, V, W, torch.float32)
    inputs["x_qkv"] = torch.randn(B, 2 * H * K + H * V + 8, device=DEVICE)[:, 8:]
    inputs["state"] = torch.randn(B + 2, H, K, V, device=DEVICE)[1:-1]
    inputs["f_a"], inputs["g_a"] = torch.randn(B, 2 * K_RANK + 5, device=DEVICE)[:, 5:].split(K_RANK, dim=1)
    inputs.update(zip(("A_log", "dt_bias"), gate_params(H, K)), o_norm_weight=torch.randn(V, device=DEVICE))
    ref_inputs = {n: t.clone() for n, t in inputs.items()}
    o = run_layer_step(kda_layer_step, inputs)
    assert_close(o, run_layer_step(naive_kda_layer_step, ref_inputs), BOUND[torch.float32], "o")
    assert_close(inputs["state"], ref_inputs["state"], BOUND[torch.float32], "state")


def chain(steps, B, H, K, V, state_dtype, device=DEVICE):
    """Run kda_decode for `steps` tokens from the same start as an fp32 naive recurrence; rel. RMS of o and state."""
    A_log, dt_bias = gate_params(H, K, device)
    state = torch.randn(B, H, K, V, device=device) * 0.1
    ref_state, state = state.clone(), state.to(state_dtype)
    os, refs = [], []
    for _ in range(steps):
        q, k, v, g, beta = step_inputs(B, H, K, V, torch.float32, device=device)
        os.append(kda_decode(q, k, v, g, beta, state, A_log=A_log, dt_bias=dt_bias))
        refs.append(naive_kda_decode(q, k, v, g, beta, ref_state, A_log=A_log, dt_bias=dt_bias))
    return rel_error(torch.stack(os[-64:]), torch.stack(refs[-64:])), rel_error(state, ref_state)


@pytest.mark.slow
def test_kda_decode_chain_300():
    err_o, err_s = chain(300, 1, 2, 16, 16, torch.float32)
    assert err_o < 1e-4 and err_s < 1e-4, (err_o, err_s)


@pytest.mark.slow
def test_kda_decode_bf16_state_drift():
    """bf16 state, rounded every step, against the fp32 recurrence (the drift is printed: run with -s)."""
    steps = 4096 if torch.cuda.is_available() else 256
    err_o, err_s = chain(steps, 1, 2, 16, 16, torch.bfloat16)
    print(f"bf16-state drift after {steps} steps: rel. RMS o {err_o:.3g} (last 64 steps), state {err_s:.3g}")
    assert err_o < 3e-2 and err_s < 3e-2, (err_o, err_s)


@GPU
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_kda_layer_step_real_shapes(B, state_dtype):
    H, K, V, W = 32, 128, 128, 4
    inputs = layer_inputs(B, H, K, V, W, torch.bfloat16, ranks=(K, K))
    inputs["state"] = inputs["state"].to(state_dtype)
    inputs.update(zip(("A_log", "dt_bias"), gate_params(H, K)), o_norm_weight=torch.randn(V, device=DEVICE))
    ref_inputs = {n: t.clone() for n, t in inputs.items()}
    o = run_layer_step(kda_layer_step, inputs, out=poisoned(B, H * V, dtype=torch.bfloat16))
    assert_close(o, run_layer_step(naive_kda_layer_step, ref_inputs), BOUND[torch.bfloat16], "o")
    assert_close(inputs["state"], ref_inputs["state"], BOUND[state_dtype], "state")
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"]), "conv state"


@GPU
def test_kda_decode_chain_real_shapes():
    err_o, err_s = chain(300, 2, 32, 128, 128, torch.float32)
    assert err_o < 1e-4 and err_s < 1e-4, (err_o, err_s)


def test_layer_step_launch_table():
    bounds = [bound for bound, _ in LAYER_STEP_LAUNCH]
    assert bounds == sorted(bounds) and bounds[-1] >= 1 << 40
    assert all(bv & (bv - 1) == 0 and warps in (1, 2, 4, 8, 16) for _, (bv, warps) in LAYER_STEP_LAUNCH)


def test_layer_step_prefetches_states_only_while_they_fit_half_the_l2(monkeypatch):
    """With PDL the step prefetches its heads' states before its wait only while the batch's states fit in half the
    L2 (16 sequences of the 48B's fp32 states, 32 MiB, do not)."""
    from klconvert.kernels import kda_decode as module
    from klconvert.kernels import pdl

    launches = []

    class Capture:  # stands in for the kernel: records each launch's PREFETCH
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(kw["PREFETCH"])
    H, K, V = 2, 32, 40
    monkeypatch.setattr(module, "kda_layer_step_fwd_kernel", Capture())
    monkeypatch.setattr(module, "use_pdl", lambda device: True)
    monkeypatch.setattr(pdl, "_l2_bytes", lambda device: 2 * H * K * V * 4)  # half the L2: one fp32 state
    for B in (1, 2):
        inputs = layer_inputs(B, H, K, V, 4, torch.float32, device="cpu")
        inputs.update(A_log=torch.randn(H), dt_bias=torch.randn(H * K), o_norm_weight=torch.ones(V))
        run_layer_step(kda_layer_step, inputs)
    assert launches == [True, False]
