"""klconvert bench: decode speed of the bound model at given contexts and batch sizes, checked before it is timed,
against the bandwidth floor of that configuration and (optionally) transformers measured in the same call; and
prefill time of given prompt lengths, checked first (prefill then one decode step against prefill alone), with the
peak memory the allocator reserved against the plan's total.

With a preset, the weights are random quantized tensors made directly on the GPU (random int codes, scales sized so
activations stay O(1)), and the caches are filled to the asked context with random values, so a 1M-token context is
timed without a 1M-token prefill.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError, flag_value
from klconvert.quant import QuantScheme, decompress_weight, policy_from_options
from klconvert.quant.defaults import DEFAULT, LM_HEAD_BITS
from klconvert.quant.pack_quantized import weight_shape_tensor
from klconvert.release import NUM_SPECIAL_TOKENS
from klconvert.runtime.device_memory import ContextDoesNotFit, DepthCheckDoesNotFit, device_room, free_the_gpu
from klconvert.runtime.engine import DEFAULT_DTYPES, Engine, check_e4m3_cache_readable, checked_mla_cache_dtype
from klconvert.runtime.memory_plan import PREFILL_SEGMENT, MemoryPlan, weight_bytes
from klconvert.runtime.model import MLA_KEY_BLOCK
from klconvert.runtime.weights import HeldPacked
from klconvert.synth.checkpoint import synth_values, tensor_generator
from klconvert.units import counted, size_text

RESIDUAL_OUTPUTS = ("o_proj.weight", "w2.weight", "down_proj.weight")  # what each layer adds to the residual
CHECK_PROMPT = 64       # tokens of the depth check's prompt
CHECK_DECODE = 8        # decode steps compared after it
GRAPH_CHECK_STEPS = 4   # graph replays compared bit for bit with eager steps
DECODE_SPARE_ROWS = 16  # cache rows a decode row plans past its context and its timed tokens
PREFILL_CHECK_TOKENS = 2 * MLA_KEY_BLOCK + PREFILL_SEGMENT // 2 + 1  # over two key blocks, in several segments
PREFILL_CHECK_BOUND = 5e-2  # relative error of the last token's logits past which nothing is timed
# the depth check's bound, past which nothing is timed: relative error of the Triton path's logits against the
# PyTorch bf16 path's at most DEPTH_CHECK_BOUND, a top-1 of it at DEPTH_CHECK_TOP1 of the positions at least (27
# layers on calm weights read 0.32-0.36% relative, top-1 100%; BENCHMARKS.md)
DEPTH_CHECK_BOUND = 2e-2
DEPTH_CHECK_TOP1 = 0.9
FILL_SLICE_ROWS = 65536  # cache rows fill_state draws at a time, over the batch
PEER_PROMPT_TOKENS = 512  # the prompt transformers' peer decodes after
PEER_KDA_CHUNK = 64  # the tokens of a chunk in transformers' plain-PyTorch chunk_kimi_delta_attention
# fp32 [1, heads, chunks, chunk, chunk, head_dim] tensors that plain-PyTorch KDA holds at once on the peer's prompt
# (the decay mask and the two products of the intra-chunk sum), and a fourth for what the CUDA allocator reserves
# past them: the peer peaked 1.51-2.08 GB past the plan's count on an H100 at 2, 4 and 22 layers (h298's F1), where
# four are 2.15 GB
PEER_KDA_BLOCKS = 4


@dataclass
class Weights:
    """A checkpoint's interface as the Engine takes it: read(name) dense, packed(name) stored parts, schemes."""

    read: Callable[[str], torch.Tensor]
    packed: Callable[[str], tuple[dict[str, torch.Tensor], QuantScheme] | None]
    schemes: dict[str, QuantScheme]


def preset_label(bits: int) -> str:
    """What random_quantized_weights makes, in a word: `int4 g128, lm_head int8`."""
    return f"int{bits} g{DEFAULT.group_size}, lm_head int{LM_HEAD_BITS}"


def random_quantized_weights(config: KimiLinearConfig, bits: int, device: str, calm: bool = False) -> Weights:
    """The default policy at `bits` (preset_label), every quantized weight made as random codes on `device` (the
    others as synth makes them), from seed 0.

    `calm` pins each MoE layer's experts with a wide margin and scales the residual branches by 1/4 (as
    tests/calm_checkpoint.py does), so bf16 rounding cannot flip expert choices and a comparison between two
    correct paths measures the paths, not router chaos."""
    specs = expected_tensors(config)
    policy = policy_from_options(bits, DEFAULT.group_size).check_against([(n, s.shape) for n, s in specs.items()])
    schemes = {n: s for n, spec in specs.items() if (s := policy.scheme_for(n, spec.shape)) is not None}
    k = config.num_experts_per_token

    def packed(name: str):
        scheme = schemes.get(name)
        if scheme is None:
            return None
        n, kk = specs[name].shape
        g = tensor_generator(name, 0, device)
        codes = torch.randint(-2**31, 2**31, (n, kk * scheme.bits // 32), generator=g, dtype=torch.int64,
                              device=device).to(torch.int32)
        spread = math.sqrt((4 ** scheme.bits - 1) / 12)        # std of a uniform code around its midpoint
        scale = 1.0 / (math.sqrt(kk) * spread) * (0.25 if calm and name.endswith(RESIDUAL_OUTPUTS) else 1.0)
        scales = torch.empty(n, kk // scheme.group_size, device=device).uniform_(0.5, 1.5, generator=g) * scale
        return {"weight_packed": codes, "weight_scale": scales.to(torch.bfloat16),
                "weight_shape": weight_shape_tensor((n, kk))}, scheme

    def read(name: str) -> torch.Tensor:
        found = packed(name)
        if found is not None:
            return decompress_weight(*found)
        if calm and name.endswith("e_score_correction_bias"):
            pinned = (torch.arange(k, device=device) + k * int(name.split(".")[2])) % specs[name].shape[0]
            return torch.zeros(specs[name].shape, device=device).index_fill_(0, pinned, 10.0)
        value = synth_values(specs[name], 0, device)
        return value * 0.25 if calm and name.endswith(RESIDUAL_OUTPUTS) else value

    return Weights(read, packed, schemes)


def check_ids(config: KimiLinearConfig, tokens: int) -> torch.Tensor:
    """The checks' [1, tokens] prompt: random ordinary ids, drawn on the host from seed 0 (the same on any device)."""
    return torch.randint(0, config.vocab_size - NUM_SPECIAL_TOKENS, (1, tokens), device="cpu",
                         generator=torch.Generator(device="cpu").manual_seed(0))


def _top1_agreement(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """The share of positions (rows) where `fast`'s top-1 is a top-1 of `ref`: the PyTorch bf16 path's logits tie at
    the top, where argmax takes the first of the tie (at 8 layers of calm weights, over half the positions: 0.297 of
    them agreed, with the Triton path agreeing with the fp32 path at every one; BENCHMARKS.md)."""
    chosen = ref.gather(-1, fast.argmax(-1, keepdim=True)).squeeze(-1)
    return (chosen == ref.max(-1).values).float().mean().item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _refuse_a_reference_that_does_not_fit(config: KimiLinearConfig, device: torch.device, context: int) -> None:
    """KLError when the PyTorch path depth_check compares against -- every weight dequantized, 98 GB in bf16 at the
    release's 27 layers -- does not fit the GPU: the Engine's own refusal told a bench of a quantized preset on an
    80 GB card to quantize its model. It says to stop what else holds the GPU where the whole card would hold it, as
    the Engine's refusals do."""
    if device.type != "cuda":
        return
    dtype = DEFAULT_DTYPES[device.type]
    plan = MemoryPlan(config, batch=1, context=context, weight_bytes=weight_bytes(config, dtype, HeldPacked({})),
                      act_dtype=dtype, mla_cache_dtype=dtype, torch_decode_attention=True)
    limit = device_room(device, 0)
    if plan.total > limit:
        raise DepthCheckDoesNotFit(f"--check compares against the PyTorch path, whose weights are dequantized to "
                                   f"{str(dtype).removeprefix('torch.')} ({size_text(plan.total)} at "
                                   f"{counted(config.num_hidden_layers, 'layer')}), more than the {size_text(limit)} "
                                   f"{device} has free for this process; pass --no-check (the CUDA graph is still "
                                   "checked against the eager step)", free_the_gpu(device, plan.total))


def depth_check(config: KimiLinearConfig, weights: Weights, device: torch.device, prompt: int = CHECK_PROMPT) -> dict:
    """The Triton path against the PyTorch path in bf16 on the same (calm) weights, at the depth being timed:
    prefill logits of a `prompt`-token prompt, then CHECK_DECODE graph-captured decode steps. Refuses to go on
    (KLError) past DEPTH_CHECK_BOUND relative or under DEPTH_CHECK_TOP1 of the same top-1."""
    ids = check_ids(config, prompt + CHECK_DECODE).to(device)
    _refuse_a_reference_that_does_not_fit(config, device, ids.shape[1] + 8)
    logits = {}
    for kernels in ("torch", "triton"):
        engine = Engine(config, weights.read, device, DEFAULT_DTYPES[device.type], ids.shape[1] + 8, 1,
                        packed=weights.packed, kernels=kernels, stored_schemes=weights.schemes)
        step = engine.decoder(1)
        prefill = engine.forward(ids[:, :prompt])[0]                      # [T, vocab]
        decoded = []
        for t in range(prompt, ids.shape[1]):
            step.tokens.copy_(ids[:, t])
            step.positions.fill_(t)
            decoded.append(step.step()[0].clone())
        logits[kernels] = torch.cat([prefill, torch.stack(decoded)])
        del engine, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fast, ref = logits["triton"], logits["torch"]
    check = {"rel_err": _rel(fast, ref), "top1": _top1_agreement(fast, ref)}
    if not (check["rel_err"] <= DEPTH_CHECK_BOUND and check["top1"] >= DEPTH_CHECK_TOP1):
        raise KLError(f"bench check failed: the Triton path against the PyTorch bf16 path at "
                      f"{counted(config.num_hidden_layers, 'layer')}: rel err {check['rel_err']:.3g} "
                      f"(bound {DEPTH_CHECK_BOUND}), "
                      f"top-1 {check['top1']:.3f} (at least {DEPTH_CHECK_TOP1}); nothing was timed")
    return check


def fill_state(engine: Engine, context: int) -> None:
    """Random latents in the first `context` cache rows of every sequence (drawn FILL_SLICE_ROWS rows of the batch's
    sequences together at a time: a 1M-token fp32 draw would be 2.4 GB per layer and sequence, which the plan does
    not hold), a small random KDA state; from seed 0."""
    g = torch.Generator(device=engine.device).manual_seed(0)
    state = engine.state
    width = state.mla_cache.shape[-1]
    rows_per_draw = max(1, FILL_SLICE_ROWS // state.batch)
    for slot in range(state.mla_cache.shape[0]):
        for start in range(0, context, rows_per_draw):
            stop = min(context, start + rows_per_draw)
            rows = torch.randn(state.batch, stop - start, width, device=engine.device, generator=g)
            state.write_mla(slot, slice(start, stop), rows)
    state.kda_state.normal_(0, 0.1, generator=g)
    state.conv_state.zero_()


def check_graph_matches_eager(engine: Engine, batch: int, context: int) -> str:
    """GRAPH_CHECK_STEPS replays of the captured step equal the same steps run eagerly, bit for bit (else KLError);
    what was checked, as the row records it. The state the steps overwrite, and the logits they give, are kept on the
    host: on the device they are a batch's KDA state more (640 MiB at the 48B preset's batch 16) and 120 MiB of
    logits, which the row's peak would count as the runtime's."""
    step = engine.decoder(batch)
    if step.graph is None:
        return "no graph: the eager step is what runs"
    kda, conv = engine.state.kda_state.to("cpu", copy=True), engine.state.conv_state.to("cpu", copy=True)
    tokens = torch.randint(0, engine.config.vocab_size, (GRAPH_CHECK_STEPS, batch), device=engine.device)
    runs = []
    for eager in (True, False):
        engine.state.kda_state.copy_(kda)
        engine.state.conv_state.copy_(conv)
        step.positions.fill_(max(context - GRAPH_CHECK_STEPS, 0))   # inside the cache at a context under 4 too
        got = []
        for t in range(GRAPH_CHECK_STEPS):
            step.tokens.copy_(tokens[t])
            with torch.inference_mode():
                got.append((step.eager() if eager else step.step()).to("cpu", copy=True))   # as the state, off the GPU
            step.positions += 1
        runs.append(torch.stack(got))
    engine.state.kda_state.copy_(kda)
    engine.state.conv_state.copy_(conv)
    if not torch.equal(runs[0], runs[1]):
        raise KLError(f"bench check failed: the CUDA-graph decode step differs from the eager step (max |diff| "
                      f"{(runs[0] - runs[1]).abs().max().item():.3g}); nothing was timed")
    return f"graph = eager bit for bit over {GRAPH_CHECK_STEPS} steps"


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10, after 2 warm-ups)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
    return nbytes / sorted(times[2:])[len(times[2:]) // 2]


def module_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """A module's own weights: its parameters and, for the Triton linears, its packed weight's tensors (a whole stack
    of packed experts' where it holds one)."""
    from klconvert.kernels.fused_moe import PackedExperts
    from klconvert.kernels.int_linear import PackedLinear

    p = getattr(module, "packed", None)
    packed = [p] if isinstance(p, PackedLinear) else [p.gate, p.up, p.down] if isinstance(p, PackedExperts) else []
    return [*module.parameters(recurse=False), *(t for x in packed for t in x.weight_tensors())]


def bytes_per_step(engine: Engine, context: int, batch: int, experts_touched: int) -> int:
    """What must move per decode step: every weight once (one embedding row per token; of each MoE layer's
    routed experts, the `experts_touched` distinct ones), the KDA state and conv tails read and written, and
    `context` cache rows per sequence per MLA layer read."""
    from klconvert.runtime.kernel_modules import FusedExperts
    from klconvert.runtime.model import Experts

    c, total = engine.config, 0
    counted: set[int] = set()   # tensors' addresses: FusedKDAStep and the KDA chunk module hold their mixer's
    # parameters again (f_b, g_b, o_norm, dt_bias), which count once, as they are read
    for name, module in engine.model.named_modules():
        if isinstance(module, FusedExperts):
            p = module.packed
            per_expert = sum(sum(t[0].numel() * t.element_size() for t in x.weight_tensors())
                             for x in (p.gate, p.up, p.down))
            total += per_expert * (experts_touched + int(p.has_shared))
        elif isinstance(module, Experts):
            total += sum(t[0].numel() * t.element_size() for t in (module.w13, module.w2)) * experts_touched
        elif name == "model.embed_tokens":
            total += batch * c.hidden_size * module.weight.element_size()
        else:
            for t in module_weights(module):
                if t.data_ptr() not in counted:
                    counted.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    state = engine.state
    total += 2 * batch * (state.kda_state[:, 0].numel() * state.kda_state.element_size()
                          + state.conv_state[:, 0].numel() * state.conv_state.element_size())
    return total + batch * context * engine.plan.mla_bytes_per_token


def experts_touched(engine: Engine, batch: int) -> int:
    """Distinct routed experts per MoE layer in one decode step (the mean over layers), from the router's choice,
    with a different random token in each sequence (as the timed loop's random first logits give)."""
    seen: list[int] = []
    hooks = [block.ffn.gate.register_forward_hook(lambda m, a, r: seen.append(int(r[0].unique().numel())))
             for layer, block in enumerate(engine.model.blocks) if engine.config.is_moe(layer)]
    step = engine.decoder(batch)
    g = torch.Generator(device=engine.device).manual_seed(batch)
    step.tokens.copy_(torch.randperm(engine.config.vocab_size, generator=g, device=engine.device)[:batch])
    with torch.inference_mode():
        step.eager()
    for h in hooks:
        h.remove()
    return round(sum(seen) / len(seen)) if seen else 0


class SpreadRouting(torch.nn.Module):
    """Bench only: the token of sequence i always goes to its own fixed random `k` experts (rows drawn
    independently: ~100 distinct of 256 at batch 16, as tokens of real text spread), with the weights of the
    router it wraps. Random weights route every row of a batch alike (~11 distinct experts at batch 16), which
    would time a step that reads a tenth of the experts a real batch reads. Where the wrapped router folds the MoE
    layer's residual add and norm into its launch (add_norm_route), that launch still runs and only its choices are
    swapped: the step runs the launches it runs unwrapped."""

    def __init__(self, router: torch.nn.Module, batch: int, num_experts: int, k: int, device, seed: int):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.router = router
        self.ids = torch.stack([torch.randperm(num_experts, generator=g, device=device)[:k] for _ in range(batch)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.router(x)
        return self.ids[:x.shape[0]].to(ids.dtype), weights

    @property
    def FUSED_ROUTER_TOKENS(self) -> int:
        return getattr(self.router, "FUSED_ROUTER_TOKENS", 0)

    def add_norm_route(self, norm: torch.nn.Module, x: torch.Tensor, branch: torch.Tensor, h_sums=None):
        x, h, ids, weights = self.router.add_norm_route(norm, x, branch, h_sums)
        return x, h, self.ids[:x.shape[0]].to(ids.dtype), weights


def spread_routing(engine: Engine, batch: int) -> None:
    """Wrap (or re-wrap, after a resize) every MoE layer's router in SpreadRouting for `batch` sequences; take it
    before the decode step is captured."""
    c = engine.config
    for layer, block in enumerate(engine.model.blocks):
        if c.is_moe(layer):
            router = block.ffn.gate.router if isinstance(block.ffn.gate, SpreadRouting) else block.ffn.gate
            block.ffn.gate = SpreadRouting(router, batch, c.num_experts, c.num_experts_per_token, engine.device,
                                           seed=layer)


def time_decode(engine: Engine, batch: int, context: int, new_tokens: int, warmup: bool = True) -> float:
    """Seconds per decode step: greedy generation through Engine.decode_loop (graph replay, on-device sampling,
    async token copies) from cache rows 0..context-1, after one untimed warm-up loop (with `warmup`)."""
    step = engine.decoder(batch)
    logits = torch.randn(batch, engine.config.vocab_size, device=engine.device)
    for n in ((8,) if warmup else ()) + (new_tokens,):
        step.positions.fill_(context)
        engine.decode_loop(step, logits, n)
    return engine.stats.decode_seconds / engine.stats.timed_steps


def prefill_check(config: KimiLinearConfig, weights: Weights, device: torch.device, tokens: int,
                  mla_cache_dtype: torch.dtype) -> dict:
    """The last token's logits two ways on the Triton path (calm weights): a `tokens`-long prefill, against a prefill
    of all but the last token and one decode step (the absorbed latent-attention kernel over the whole cache, the
    KDA step from the prefill's final state). Refuses to go on when they differ past PREFILL_CHECK_BOUND."""
    ids = check_ids(config, tokens)
    engine = Engine(config, weights.read, device, DEFAULT_DTYPES[device.type], tokens, 1, packed=weights.packed,
                    kernels="triton", stored_schemes=weights.schemes, mla_cache_dtype=mla_cache_dtype)
    whole = engine.prefill(ids)
    engine.prefill(ids[:, :-1])
    stepped = engine.decode_step(ids[:, -1], tokens - 1)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    check = {"tokens": tokens, "rel_err": _rel(stepped, whole), "top1": bool(stepped.argmax() == whole.argmax())}
    if not check["rel_err"] <= PREFILL_CHECK_BOUND:
        raise KLError(f"bench check failed: a {tokens:,}-token prefill and prefill + one decode step differ by "
                      f"{check['rel_err']:.3g} relative (bound {PREFILL_CHECK_BOUND}); nothing was timed")
    return check


def time_prefill(engine: Engine, tokens: int, warmup: bool = True) -> float:
    """Seconds to prefill one `tokens`-long random prompt (up to its last logits), after an untimed two-segment
    warm-up (kernel compilation and autotuning; with `warmup`)."""
    ids = torch.randint(0, engine.config.vocab_size, (1, tokens), device=engine.device)
    wait = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    if warmup:
        engine.prefill(ids[:, :min(tokens, 2 * engine.prefill_segment)])
        wait()
    t0 = time.perf_counter()
    engine.prefill(ids)
    wait()
    return time.perf_counter() - t0


@dataclass
class PrefillRow:
    tokens: int
    mla_cache_dtype: str
    seconds: float
    tokens_per_s: float
    peak_reserved_gib: float   # what the allocator held at most, weights and state included
    peak_allocated_gib: float  # live tensors at most (the rest of what was reserved: the allocator's cache)
    plan_total_gib: float
    plan_workspace_gib: float


@dataclass
class BenchRow:
    context: int
    batch: int
    mla_cache_dtype: str
    ms_per_step: float   # a decode step of the whole batch, `batch` tokens
    tokens_per_s: float
    peak_reserved_gib: float
    plan_total_gib: float
    experts_touched_per_layer: int
    bytes_per_step: int
    floor_ms: float
    floor_ratio: float
    graph_check: str


@dataclass
class BenchResult:
    gpu: str
    layers: int
    bits: int | str
    copy_gb_s: float
    depth_check: dict = field(default_factory=dict)
    rows: list[BenchRow] = field(default_factory=list)
    peer: dict = field(default_factory=dict)
    prefill_check: dict = field(default_factory=dict)
    prefill_rows: list[PrefillRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _row_refusal(refusal: ContextDoesNotFit, flag: str, planned_past: int = 0) -> KLError:
    """The engine's refusal of a row's plan, said by bench's `flag` for the row's context (--context or --prefill):
    a decode row plans `planned_past` tokens past its --context (its --new-tokens and DECODE_SPARE_ROWS), which the
    context the engine named as fitting holds too."""
    fit = refusal.fit - planned_past
    if fit < 1:
        return KLError(f"{refusal.said}; at most {counted(refusal.fit, 'token')} of context fit, and a decode row "
                       f"plans {planned_past:,} past its --context (--new-tokens and {DECODE_SPARE_ROWS} spare cache "
                       "rows): lower --new-tokens or --batch"
                       + ("" if refusal.remedy is None else f", or {refusal.remedy}"))
    return ContextDoesNotFit(refusal.said, fit, refusal.or_less, flag, refusal.remedy)


def check_new_tokens(config: KimiLinearConfig, new_tokens: int) -> None:
    """KLError where `new_tokens` decoded (and DECODE_SPARE_ROWS) leave no context to decode at in the model's
    longest context: bench fills each decode row's context short by them, and that context came out 0 or negative."""
    context_left = config.model_max_length - new_tokens - DECODE_SPARE_ROWS
    if context_left < 1:
        raise KLError(f"{flag_value('--new-tokens', new_tokens)} leaves no context to decode at: the decoded tokens "
                      f"and {DECODE_SPARE_ROWS} spare cache rows must fit the model's {config.model_max_length_name} "
                      f"of {counted(config.model_max_length, 'token')}; give "
                      f"{flag_value('--new-tokens', config.model_max_length - DECODE_SPARE_ROWS - 1)} or fewer")


def bench(config: KimiLinearConfig, weights: Weights, *, bits, contexts: list[int], batches: list[int],
          mla_cache_dtype: str = "bfloat16", new_tokens: int = 128, calm_weights: Weights | None = None,
          report: Callable[[str], None] = print, device: str = "cuda", check_prompt: int = CHECK_PROMPT,
          spread: bool = False, prefills: list[int] = (),
          prefill_check_tokens: int = PREFILL_CHECK_TOKENS, warmup: bool = True) -> BenchResult:
    """Check, then time every (context, batch) on one bound model, then every prefill length in `prefills` (batch
    1). calm_weights: run the depth check (and with prefills, the prefill check) on them. spread: route each
    sequence to its own random experts (SpreadRouting) instead of the weights' router. device "cpu" runs the same
    code on the CPU (Triton's interpreter; for tests of this code, not for figures), where warmup=False skips the
    untimed warm-ups (nothing compiles there, and each interpreted step costs seconds)."""
    cache = checked_mla_cache_dtype(mla_cache_dtype)
    check_new_tokens(config, new_tokens)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KLError("klconvert bench times the CUDA path and needs a CUDA GPU; none is visible")
    check_e4m3_cache_readable(config, device, DEFAULT_DTYPES[device.type], True, cache)   # before minutes of checks
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    copy = copy_bandwidth(device, 2 << 30 if cuda else 1 << 24)
    result = BenchResult(gpu, config.num_hidden_layers, bits, copy / 1e9)
    report(f"{result.gpu}: copy {result.copy_gb_s:.0f} GB/s; {counted(config.num_hidden_layers, 'layer')}, {bits}")
    if calm_weights is not None:
        result.depth_check = depth_check(config, calm_weights, device, check_prompt)
        report(f"check: Triton vs PyTorch bf16 path at {counted(config.num_hidden_layers, 'layer')} (calm weights): "
               f"rel err {result.depth_check['rel_err']:.4f}, top-1 {result.depth_check['top1']:.3f}")
    if prefills and calm_weights is not None:
        result.prefill_check = prefill_check(config, calm_weights, device, prefill_check_tokens, cache)
        report(f"check: {prefill_check_tokens:,}-token prefill vs prefill + one decode step (calm weights): rel err "
               f"{result.prefill_check['rel_err']:.4f}, same top-1: {result.prefill_check['top1']}")
    engine = None
    for asked in contexts:
        # the decoded tokens must fit the model's longest context too: at model_max_length the cache is filled
        # that many tokens short of it (check_new_tokens left it at least one)
        context = min(asked, config.model_max_length - new_tokens - DECODE_SPARE_ROWS)
        for batch in batches:
            plan_context = context + new_tokens + DECODE_SPARE_ROWS
            try:
                if engine is None:
                    engine = Engine(config, weights.read, device, DEFAULT_DTYPES[device.type], plan_context, batch,
                                    packed=weights.packed, kernels="triton", stored_schemes=weights.schemes,
                                    mla_cache_dtype=cache)
                else:
                    engine.resize(plan_context, batch, cache)
            except ContextDoesNotFit as e:
                raise _row_refusal(e, "--context", new_tokens + DECODE_SPARE_ROWS) from None
            if spread:
                spread_routing(engine, batch)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fill_state(engine, context)
            graph_check = check_graph_matches_eager(engine, batch, context)
            touched = experts_touched(engine, batch)
            fill_state(engine, context)
            seconds = time_decode(engine, batch, context, new_tokens, warmup)
            moved = bytes_per_step(engine, context, batch, touched)
            floor = moved / (result.copy_gb_s * 1e9)
            row = BenchRow(context, batch, mla_cache_dtype, seconds * 1e3, batch / seconds,
                           torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0, engine.plan.total / 2**30,
                           touched, moved, floor * 1e3, seconds / floor, graph_check)
            result.rows.append(row)
            report(f"context {context:,} batch {batch} cache {mla_cache_dtype}: {row.ms_per_step:.3f} ms/step, "
                   f"{row.tokens_per_s:,.0f} tokens/s; floor {row.floor_ms:.3f} ms ({moved / 1e9:.2f} GB/step, "
                   f"{touched} experts/layer) -> {row.floor_ratio:.2f}x the floor; peak reserved "
                   f"{row.peak_reserved_gib:.1f} GiB vs plan {row.plan_total_gib:.1f} GiB; {graph_check}")
    for tokens in prefills:
        try:
            if engine is None:
                engine = Engine(config, weights.read, device, DEFAULT_DTYPES[device.type], tokens, 1,
                                packed=weights.packed, kernels="triton", stored_schemes=weights.schemes,
                                mla_cache_dtype=cache)
            else:
                engine.resize(tokens, 1, cache)
        except ContextDoesNotFit as e:
            raise _row_refusal(e, "--prefill") from None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = time_prefill(engine, tokens, warmup)
        row = PrefillRow(tokens, mla_cache_dtype, seconds, tokens / seconds,
                         torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
                         torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, engine.plan.total / 2**30,
                         engine.plan.workspace / 2**30)
        result.prefill_rows.append(row)
        report(f"prefill {tokens:,} tokens cache {mla_cache_dtype}: {row.seconds:.2f} s, {row.tokens_per_s:,.0f} "
               f"tokens/s; peak reserved {row.peak_reserved_gib:.1f} GiB (live {row.peak_allocated_gib:.1f}) vs plan "
               f"{row.plan_total_gib:.1f} GiB (workspace {row.plan_workspace_gib:.2f} GiB)")
    return result


def transformers_peer() -> tuple[type, type]:
    """transformers' KimiLinearConfig and KimiLinearForCausalLM, or a KLError naming what to install: asked before
    anything is timed (after the whole bench, its timings were lost and no --json written)."""
    try:
        from transformers import KimiLinearConfig, KimiLinearForCausalLM
    except ImportError as e:
        raise KLError(f"--peer transformers needs transformers with Kimi Linear support ({e}); "
                      "pip install 'klconvert[test]'") from None
    return KimiLinearConfig, KimiLinearForCausalLM


def peer_bytes(raw_config: dict, new_tokens: int) -> int:
    """About what transformers' bf16 model of `raw_config` holds on the GPU decoding `new_tokens` after its prompt:
    what an engine of its weights dequantized to bf16 plans (the weights, 98 GB at 27 layers of the release, are
    nearly all of it), and what plain-PyTorch KDA allocates for the prompt past that (peer_kda_workspace)."""
    config = KimiLinearConfig.from_dict(raw_config)
    return MemoryPlan(config, batch=1, context=PEER_PROMPT_TOKENS + new_tokens,
                      weight_bytes=weight_bytes(config, torch.bfloat16, HeldPacked({})), act_dtype=torch.bfloat16,
                      mla_cache_dtype=torch.bfloat16, torch_decode_attention=True).total + peer_kda_workspace(config)


def peer_kda_workspace(config: KimiLinearConfig) -> int:
    """What transformers' plain-PyTorch chunk_kimi_delta_attention allocates running the peer's prompt through a KDA
    layer (PEER_KDA_BLOCKS blocks, 512 MiB each for the release's 32 heads of 128 over 512 tokens), freed before the
    next layer. transformers runs it wherever flash-linear-attention is not importable (klconvert[test] does not
    install it) and on the CPU; fla's kernels hold less, so with fla the count errs on the safe side."""
    if not config.kda_layers:
        return 0
    chunks = -(-PEER_PROMPT_TOKENS // PEER_KDA_CHUNK)
    return PEER_KDA_BLOCKS * config.kda_num_heads * chunks * PEER_KDA_CHUNK ** 2 * config.kda_head_dim * 4


def refuse_a_peer_that_does_not_fit(peer_config: Callable[[int], dict], layers: int, asked: str,
                                    new_tokens: int) -> None:
    """KLError when the peer of `layers` layers (`peer_config(n)`: its config at n layers) does not fit what the GPU
    has free for this process, asked before anything is timed: it ran after the whole bench, whose timings were then
    lost and no --json written (--peer-layers 27 on an 80 GB card). `asked`: how the command named the peer. The
    bench frees what it held before the peer runs, so the room now is the peer's. No GPU: bench says so itself."""
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda")
    room = device_room(device, 0)
    need = peer_bytes(peer_config(layers), new_tokens)
    if need <= room:
        return
    fit = max((n for n in range(1, layers) if peer_bytes(peer_config(n), new_tokens) <= room), default=0)
    fewer = f"give --peer-layers {fit} or fewer" if fit else "drop --peer"
    remedy = free_the_gpu(device, need)
    raise KLError(f"{asked}: transformers' bf16 model of {counted(layers, 'layer')} needs about {size_text(need)}, "
                  f"more than the {size_text(room)} {device} has free for this process; {fewer}"
                  + (f", or {remedy}" if remedy is not None else ""))


def time_transformers(raw_config: dict, new_tokens: int, report: Callable[[str], None] = print) -> dict:
    """transformers' KimiLinearForCausalLM in bf16 on the same config, greedy decode of `new_tokens` (bench's
    --new-tokens) after a prompt of PEER_PROMPT_TOKENS, warmed until two successive timings agree within 5% (at most 8
    rounds)."""
    HFConfig, KimiLinearForCausalLM = transformers_peer()
    torch.cuda.empty_cache()   # what the bench held, released to the peer (refuse_a_peer_that_does_not_fit's room)
    with torch.device("cuda"):   # made in bf16: made in fp32 and cast, it held twice what peer_bytes sizes (h295)
        model = KimiLinearForCausalLM._from_config(HFConfig(**raw_config), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, raw_config["vocab_size"] - NUM_SPECIAL_TOKENS, (1, PEER_PROMPT_TOKENS), device="cuda")

    def seconds(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timings: list[float] = []   # decode only: (time for n tokens - time for 1 token) / (n - 1)
    with torch.no_grad():
        while len(timings) < 8:
            timings.append((seconds(new_tokens) - seconds(1)) / (new_tokens - 1) * 1e3)
            if len(timings) >= 2 and abs(timings[-1] - timings[-2]) <= 0.05 * timings[-2]:
                break
    report(f"peer: transformers KimiLinearForCausalLM bf16, {counted(raw_config['num_hidden_layers'], 'layer')}: "
           f"{timings[-1]:.2f} ms/token (timings while warming: {', '.join(f'{t:.1f}' for t in timings)})")
    model = None  # free it before anything else runs
    torch.cuda.empty_cache()
    return {"name": "transformers KimiLinearForCausalLM bf16", "layers": raw_config["num_hidden_layers"],
            "prompt_tokens": PEER_PROMPT_TOKENS, "new_tokens": new_tokens, "ms_per_token": timings[-1],
            "warmup_ms": timings}
