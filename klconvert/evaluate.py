"""`klconvert eval`: how far a (quantized) model's predictions and routing drift from its reference on one text."""
from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import Checkpoint
from klconvert.config import KimiLinearConfig
from klconvert.devices import checked_device
from klconvert.errors import KLError, a_type, argument, flag_value, shown
from klconvert.extras import require
from klconvert.models import model_folder
from klconvert.runtime.bind import cpu_forms_bound
from klconvert.runtime.device_memory import (ContextDoesNotFit, DeviceMemoryExhausted, WeightsDoNotFit,
                                             device_allocation, device_exhausted)
from klconvert.runtime.host_malloc import give_back_free_pages
from klconvert.runtime.host_memory import NAMED_FIT_SHARE, HostMemory, host_allocation, host_memory
from klconvert.runtime.logits_not_finite import LogitsNotFinite
from klconvert.runtime.memory_plan import MemoryPlan, weight_bytes
from klconvert.scalars import as_number
from klconvert.text_input import text_tokens
from klconvert.tokenizer import BPE_FILE, TOKENIZER_CONFIG_FILE, Tokenizer
from klconvert.units import counted, size_text

MIN_SCORED_TOKENS = 2  # a next-token prediction takes a token and the one after it to score
KL_QUANTILE = 0.99
KL_ROWS = 256  # positions per step of the KL sum: [256, 163840] fp32 temporaries are 168 MB each
KL_TEMPORARIES = 3  # [KL_ROWS, vocab] fp32 tensors alive at once in a step of the KL sum: exp(p), p - q, their product
# what eval holds on the host beside the model (_host_bytes: both models' fp32 log-probabilities and router choices,
# the logits in hand) may take this share of what the host and the process's limits leave once the model's plan is
# counted whole (as the engine checks it); the rest is left to what no figure counts (the checkpoint's files mapped
# while a model binds, the allocator's slack, the threads) and the machine.
HOST_SHARE = 0.8
# config fields that leave the model's function alone (token ids, the context it is sized for, whether lm_head is
# stored or read from the embedding: a quantized copy of a tied model stores it, untied); every other field of
# KimiLinearConfig must agree between a model and its reference
NOT_ARCHITECTURE = ("model_max_length", "bos_token_id", "eos_token_ids", "pad_token_id", "tie_word_embeddings")
LAYER_LISTS = ("kda_layers", "full_attn_layers")  # 0-indexed in KimiLinearConfig, 1-indexed in config.json
# what sets the context eval plans (its text's tokens), and so asks it for less of the device, as the Python API names
# it (the command line's line: COMMAND_LEVERS)
CONTEXT_ARGUMENT = argument("max_tokens", "--max-tokens")
LESS_ON_DEVICE = (f"lower {CONTEXT_ARGUMENT}",)


@dataclass(frozen=True)
class LayerRouting:
    """Router agreement of one MoE layer over the text's tokens."""

    layer: int
    overlap: float    # mean |chosen_ref & chosen_model| / top-k
    unchanged: float  # share of tokens whose whole top-k set is the same


@dataclass(frozen=True)
class EvalResult:
    """A model measured against its reference on the same tokens (KL is D(reference || model), in nats)."""

    tokens: int
    reference_perplexity: float
    model_perplexity: float
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    routing: tuple[LayerRouting, ...]

    @property
    def routing_overlap(self) -> float:
        return sum(r.overlap for r in self.routing) / len(self.routing) if self.routing else 1.0

    @property
    def routing_unchanged(self) -> float:
        """Share of (token, MoE layer) decisions whose whole expert set is unchanged."""
        return sum(r.unchanged for r in self.routing) / len(self.routing) if self.routing else 1.0

    @property
    def worst_layer(self) -> LayerRouting | None:
        return min(self.routing, key=lambda r: (r.overlap, r.unchanged)) if self.routing else None


@dataclass
class ModelRun:
    """What one model leaves behind on the CPU: log-probs [T, V] fp32 and expert ids per MoE layer [T, k]."""

    log_probs: torch.Tensor
    expert_ids: dict[int, torch.Tensor]
    moe_layers: tuple[int, ...]
    config: KimiLinearConfig


def run_model(path: Path, ids: list[int], device: str | torch.device | None, dtype: str | None,
              named: str | None = None, reference: bool = False) -> ModelRun:
    """Load one model, run the ids through Engine.forward recording each MoE layer's choices, free it. The CPU
    allocator refusing any of it (loading, the log-probs, a segment's logits) is HostMemoryExhausted (a
    MemoryError), naming the model as `named` (as the user gave it: "--model tiny"; default: its path); the GPU's,
    in the engine or out of it, DeviceMemoryExhausted naming it too, and a model of fewer bits only where it is not
    the `reference`; a plan past the room that fewer tokens fit, ContextDoesNotFit naming it and max_tokens; one
    that no context fits beside the weights, WeightsDoNotFit naming it, and fewer bits as the GPU's refusal does;
    logits that are not finite, LogitsNotFinite naming it."""
    try:
        return _run_model(path, ids, device, dtype, named)
    except ContextDoesNotFit as e:   # the context planned is the text's tokens, which max_tokens sets
        raise e.ran_by(named or str(path), CONTEXT_ARGUMENT) from None
    except WeightsDoNotFit as e:
        raise e.ran_by(named or str(path), not reference) from None
    except LogitsNotFinite as e:   # either model's weights may overflow: the line says whose did
        raise e.ran_by(named or str(path)) from None
    except (DeviceMemoryExhausted, RuntimeError) as e:   # torch.OutOfMemoryError is a RuntimeError
        exhausted = e if isinstance(e, DeviceMemoryExhausted) else device_exhausted(e, LESS_ON_DEVICE)
        if exhausted is None:
            raise
        # eval runs two models: the line says which ran out
        raise exhausted.ran_by(named or str(path), LESS_ON_DEVICE, not reference) from None


def _run_model(path: Path, ids: list[int], device: str | torch.device | None, dtype: str | None,
               named: str | None) -> ModelRun:
    from klconvert.runtime.engine import load

    with host_allocation(f"a run of {named or path} over {len(ids):,} tokens (the model, its log-probabilities and "
                         "logits)"):
        engine = load(path, device=device, dtype=dtype, max_context=len(ids), all_logits=True)
        c = engine.config
        chosen: dict[int, list[torch.Tensor]] = {}
        for layer, block in enumerate(engine.model.blocks):
            if c.is_moe(layer):
                def record(module, args, result, out=chosen.setdefault(layer, [])):
                    out.append(result[0].cpu())  # expert ids, one [B*S, k] per prefill segment, in order
                block.ffn.gate.register_forward_hook(record)
        # on the host, in fp32 whatever the caller's default dtype and device; the device holds a few positions' at a
        # time (forward_segments' rows, which the plan counts with their log-softmax)
        log_probs = torch.empty(len(ids), c.vocab_size, dtype=torch.float32, device="cpu")
        start = 0
        # the log-softmax of each segment's logits runs on their device, outside the engine's calls: the device
        # refusing it is said as the engine's refusals are, with its plan and whether fewer bits would hold less
        with device_allocation("taking the log-probabilities of the logits", engine.plan.total, LESS_ON_DEVICE,
                               engine.fewer_bits):
            for logits in engine.forward_segments(torch.tensor([ids], device="cpu")):  # [1, R, V] fp32
                log_probs[start:start + logits.shape[1]] = torch.log_softmax(logits[0].float(), dim=-1)
                start += logits.shape[1]
        run = ModelRun(log_probs, {k: torch.cat(v) for k, v in chosen.items()}, tuple(chosen), c)
    del engine
    gc.collect()
    # the pages of the freed weights' blocks handed back, so that the next model's plan sees them free: glibc keeps
    # them resident, which the host's MemAvailable and a cgroup count as used (as CUDA's cache, emptied below, holds
    # the GPU's)
    give_back_free_pages()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run


def _same_architecture(got: KimiLinearConfig, ref: KimiLinearConfig, model: str, reference: str) -> None:
    """Every architecture field of the model's config must equal its reference's (a different top-k, say, would make
    the router figures meaningless); the error names the fields that differ, the layer lists 1-indexed as
    config.json writes them."""
    def field(config: KimiLinearConfig, name: str) -> str:
        value = getattr(config, name)
        return shown([i + 1 for i in value] if name in LAYER_LISTS else value)
    differ = [f"{name}{' (1-indexed)' if name in LAYER_LISTS else ''} {field(got, name)} vs {field(ref, name)}"
              for name in (f.name for f in fields(ref) if f.compare and f.name not in NOT_ARCHITECTURE)
              if getattr(got, name) != getattr(ref, name)]
    if differ:
        more = f"; {len(differ) - 3} more" if len(differ) > 3 else ""
        raise KLError(f"{model} is not the same architecture as {reference} ({'; '.join(differ[:3])}{more}); "
                      "compare a model with its own source")


def _same_tokenizer(folder: Path, reference: Tokenizer, model: str, reference_name: str) -> None:
    """The model folder's own tokenizer, where it has one, must be the reference's (the same BPE ranks, every special
    token at the same id): eval reads the text with the reference's and scores the model on those ids, which a model
    of another tokenizer reads as other tokens. A folder of weights alone (no tokenizer files) says nothing against
    it."""
    if not any(os.path.lexists(folder / name) for name in (BPE_FILE, TOKENIZER_CONFIG_FILE)):
        return
    own = Tokenizer.from_folder(folder)
    flag, reference_flag = model.split(" ", 1)[0], reference_name.split(" ", 1)[0]
    differ = None
    if own.bpe_digest != reference.bpe_digest:
        differ = (f"its {BPE_FILE} ranks other tokens than {reference_flag}'s (sha256 {own.bpe_digest[:12]}... vs "
                  f"{reference.bpe_digest[:12]}...)")
    else:
        theirs, ours = reference.special_tokens, own.special_tokens
        for text, token_id in sorted(theirs.items(), key=lambda item: item[1]):
            if ours.get(text) != token_id:
                differ = (f"special token {shown(text)} is id {ours[text]} in {flag}'s tokenizer, {token_id} in "
                          f"{reference_flag}'s" if text in ours else
                          f"special token {shown(text)} (id {token_id} in {reference_flag}'s tokenizer) is not in "
                          f"{flag}'s")
                break
        else:
            extra = next((text for text in ours if text not in theirs), None)
            if extra is not None:
                differ = (f"special token {shown(extra)} (id {ours[extra]} in {flag}'s tokenizer) is not in "
                          f"{reference_flag}'s")
    if differ is not None:
        raise KLError(f"{model}'s tokenizer is not {reference_name}'s: {differ}; eval reads the text with the "
                      "reference's token ids, which this model reads as other tokens -- compare a model with its own "
                      "source (a quantized folder carries its source's tokenizer files)")


def _perplexity(log_probs: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each next token (positions 0..T-2 predict 1..T-1)."""
    targets = torch.tensor(ids[1:], device="cpu")
    return math.exp(-log_probs[:-1].gather(1, targets[:, None]).mean().item())


def _layer_routing(layer: int, ref: torch.Tensor, got: torch.Tensor) -> LayerRouting:
    """ref, got [T, k] expert ids -> overlap of the two sets per token (order does not matter)."""
    shared = (ref[:, :, None] == got[:, None, :]).any(-1).sum(-1)        # [T]
    k = ref.shape[1]
    return LayerRouting(layer, (shared.float() / k).mean().item(), (shared == k).float().mean().item())


def evaluate(model: str | Path, reference: str | Path, text: str, max_tokens: int = 2048, device: str | None = None,
             dtype: str | None = None) -> EvalResult:
    """Measure `model` against `reference` (folders; `tiny`: the bundled model) on `text` (tokenized with the
    reference's tokenizer, cut to `max_tokens`: only as much of it is encoded as that takes). The reference runs first
    and is freed before the model loads: peak memory is one model. A text whose run the host could not hold is refused
    before either loads; the CPU allocator refusing anyway is HostMemoryExhausted (a MemoryError)."""
    names = f"--model {model}", f"--reference {reference}"   # as given: `tiny`, not where it is installed
    model, reference = (model_folder(value, name) for value, name in zip((model, reference), names))
    device = checked_device(device)
    tokens = as_number(max_tokens, whole=True)
    if tokens is None or tokens < MIN_SCORED_TOKENS:
        raise KLError(f"{argument('max_tokens', '--max-tokens', max_tokens)} should be a whole number >= "
                      f"{MIN_SCORED_TOKENS}: a next-token prediction takes {MIN_SCORED_TOKENS} tokens to score")
    if not isinstance(text, str):
        raise KLError(f"text should be the evaluation text as a str (what --text-file holds), got "
                      f"{a_type(text)}")
    configs = [KimiLinearConfig.from_file(folder / CONFIG_FILE, flag) for folder, flag in
               ((model, "--model"), (reference, "--reference"))]
    _same_architecture(*configs, *names)   # before either runs
    tokenizer = Tokenizer.from_folder(reference)
    _same_tokenizer(model, tokenizer, *names)
    checkpoint = Checkpoint(model)   # its shards and headers checked before the reference runs (a 48B one: minutes)
    if any(isinstance(s, QuantizedSource) and s.scheme.kind == "nf4" for s in checkpoint.sources.values()):
        require("bitsandbytes.functional", f"{names[0]} (NF4 weights)")   # so is what reading them needs
    ids = text_tokens(text, "the evaluation text", tokenizer, tokens).ids[:tokens]   # not the whole of a long text
    if len(ids) < MIN_SCORED_TOKENS:
        raise KLError(f"the evaluation text (--text-file) is {counted(len(ids), 'token')} long; give at least "
                      f"{MIN_SCORED_TOKENS} tokens of text to evaluate on")
    for config, name in zip(configs, names):   # before either runs: the model's limit was met after the reference ran
        if len(ids) > config.model_max_length:
            raise KLError(f"the evaluation text's {len(ids):,} tokens are over {name}'s "
                          f"{config.model_max_length_name} {config.model_max_length:,}; give "
                          f"{flag_value(argument('max_tokens', '--max-tokens'), config.model_max_length)} or fewer")
    plan = _plan_on_the_host(configs[1], len(ids), device, dtype)
    _refuse_past_host_memory(len(ids), configs[1], plan, host_memory())

    ref = run_model(reference, ids, device, dtype, names[1], reference=True)
    # again once the reference is freed: what it left behind (its log-probabilities, and free blocks the model's
    # weights alone can take) is known now, and the model's run is refused before it loads, not a block into it
    _refuse_past_host_memory(len(ids), configs[1], plan, host_memory(), names[0])
    got = run_model(model, ids, device, dtype, names[0])
    with host_allocation(f"the KL sum's rows ([{KL_ROWS}, {configs[1].vocab_size:,}] fp32)"):
        return compare(ref, got, ids, *names)


def _plan_on_the_host(config: KimiLinearConfig, tokens: int, device: str | torch.device, dtype: str | None
                      ) -> MemoryPlan | None:
    """The memory plan a CPU engine makes to run `tokens` tokens, every position's logits among them (all_logits, as
    run_model loads it), before any model loads: every weight as bound on the CPU (dequantized: the packed kernels are
    Triton's, on CUDA), at the dtype load takes (device_and_dtype), and in fp32 the decode copies the CPU forms hold
    beside them.
    None on a GPU, where the model and its logits live (the engine checks its own plan against the device)."""
    from klconvert.runtime.engine import device_and_dtype

    if torch.device(device).type != "cpu":
        return None
    cpu, act = device_and_dtype("cpu", dtype)
    held = weight_bytes(config, act, decode_copies=cpu_forms_bound(cpu, act, triton=False))   # kernels auto: torch
    return MemoryPlan(config, batch=1, context=tokens, weight_bytes=held, act_dtype=act, mla_cache_dtype=act,
                      torch_decode_attention=True, all_logits=True)


def _host_bytes(tokens: int, config: KimiLinearConfig, plan: MemoryPlan | None, runs: int = 2
                ) -> tuple[int, int, int]:
    """What eval holds on the host at its peak for `tokens` tokens, in three parts: the fp32 log-probs and int64
    expert ids (kept until compare) of `runs` runs (both; 1: the model's, once the reference's are held); the model
    on the CPU (its plan: weights, state, cache, a segment's workspace, with the logits a few positions at a time
    and their log-softmax; 0 on a GPU); and the logits in hand once both have run, the KL sum's rows."""
    c = config
    moe_layers = sum(c.is_moe(layer) for layer in range(c.num_hidden_layers))
    kept = runs * tokens * (c.vocab_size * 4 + moe_layers * c.num_experts_per_token * 8)
    return kept, 0 if plan is None else plan.total_for(tokens), KL_TEMPORARIES * KL_ROWS * c.vocab_size * 4


def _refuse_past_host_memory(tokens: int, config: KimiLinearConfig, plan: MemoryPlan | None,
                             host: HostMemory | None, model_run: str | None = None) -> None:
    """What eval holds at its peak (_host_bytes) must fit in the memory the host (and the process's limits) leave,
    the allocator's free blocks counted as room for the weights alone (HostMemory.for_weights): the model's plan
    whole, as the engine checks it, and what no plan counts (log-probs, logits) within HOST_SHARE of it; the refusal
    names the largest --max-tokens that fits NAMED_FIT_SHARE of it (the next run measures the host anew), and the
    host's bound's remedy where all of its memory would hold the tokens asked (or the fewest, where none fit), as the
    engine's refusals do (HostMemory.remedy_for). Before the reference runs (`model_run` None), what its run will
    leave out of the model's room is counted with the log-probs -- HostMemory.left_mapped of its plan besides the
    weights; under ulimit -d the bundled model's reference left 10-15 MB (free blocks past its weights, and what else
    stayed mapped) where that counts 12 MB, 22-27 MB for 21 MB, 16-19 MB for 37 MB -- so that the --max-tokens it
    names passes the check once the reference ran. `model_run`: once the reference has run, the model (its flag and
    value, as the refusal names it), whose run alone is counted: the reference's log-probs are held already."""
    if host is None:
        return
    host = host.for_weights(plan.weights if plan else 0)
    runs = 2 if model_run is None else 1

    def left(tokens: int) -> int:   # what the reference's run, freed, keeps of the model's room
        return 0 if plan is None or model_run is not None else host.left_mapped(plan.total_for(tokens) - plan.weights)

    def room_taken(tokens: int) -> int:   # what must be available for the run of `tokens` tokens to fit
        kept, model, logits = _host_bytes(tokens, config, plan, runs)
        return math.ceil(model + (kept + left(tokens) + logits) / HOST_SHARE)

    if room_taken(tokens) <= host.available:
        return
    fits, past = 1, tokens   # the most tokens that fit (below MIN_SCORED_TOKENS, none does), the fewest that do not
    while past - fits > 1:
        mid = (fits + past) // 2
        fits, past = (mid, past) if room_taken(mid) <= host.available * NAMED_FIT_SHARE else (fits, mid)
    (kept, model, logits), left_behind = _host_bytes(tokens, config, plan, runs), left(tokens)
    whose = "both models'" if model_run is None else "its"
    held = (f"{whose} log-probabilities and router choices over a "
            f"{config.vocab_size:,}-word vocabulary ({size_text(kept)}), "
            + (f"one model on the CPU with its memory plan ({size_text(model)}), " if plan else "")
            + (f"the reference's state, cache and workspace, which stay mapped once it is freed "
               f"({size_text(left_behind)}), " if left_behind else "")
            + f"the logits in hand ({size_text(logits)})")
    whom = "eval" if model_run is None else f"{model_run}: once the reference ran, its run"
    said = (f"{whom} would hold {size_text(kept + model + left_behind + logits)} on the host for {tokens:,} tokens "
            f"-- {held} -- more than fits (the model's plan, and the rest within {HOST_SHARE:.0%}) in the {host}; ")
    if fits >= MIN_SCORED_TOKENS:
        remedy = host.remedy_for(room_taken(tokens))
        # the number to type back as --max-tokens, in the digits 0-9 alone that it reads (no flag reads "4,294")
        raise KLError(f"{said}lower --max-tokens to {fits} or less" + ("" if remedy is None else f", or {remedy}"))
    remedy = host.remedy_for(room_taken(MIN_SCORED_TOKENS))
    raise KLError(f"{said}not even {MIN_SCORED_TOKENS} tokens fit"
                  + (f": {remedy}" if remedy else f", nor would in all of this host's {size_text(host.total)}"))


def compare(ref: ModelRun, got: ModelRun, ids: list[int], model: str = "the model",
            reference: str = "the reference") -> EvalResult:
    """The figures of `got` against `ref`, both run on `ids` (one reference run can serve many models); `model`
    and `reference` name them in an error."""
    _same_architecture(got.config, ref.config, model, reference)

    kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(ref.log_probs.split(KL_ROWS),
                                                                  got.log_probs.split(KL_ROWS))]).clamp_min(0)  # [T]
    return EvalResult(
        tokens=len(ids),
        reference_perplexity=_perplexity(ref.log_probs, ids),
        model_perplexity=_perplexity(got.log_probs, ids),
        kl_mean=kl.mean().item(),
        kl_p99=torch.quantile(kl, KL_QUANTILE).item(),
        top1_agreement=(ref.log_probs.argmax(-1) == got.log_probs.argmax(-1)).float().mean().item(),
        routing=tuple(_layer_routing(layer, ref.expert_ids[layer], got.expert_ids[layer]) for layer in ref.moe_layers),
    )


def render_eval(r: EvalResult, model: str, reference: str) -> str:
    """The result as an aligned text table, one row per figure, then one row per MoE layer."""
    rows = [
        ("tokens", f"{r.tokens:,}"),
        ("perplexity, reference", f"{r.reference_perplexity:.4f}"),
        ("perplexity, model",
         f"{r.model_perplexity:.4f} ({100 * (r.model_perplexity / r.reference_perplexity - 1):+.2f}%)"),
        ("KL(reference || model) / token, mean", f"{r.kl_mean:.5f} nats"),
        ("KL(reference || model) / token, p99", f"{r.kl_p99:.5f} nats"),
        ("top-1 agreement", f"{100 * r.top1_agreement:.2f}%"),
        ("router: mean top-k overlap", f"{100 * r.routing_overlap:.2f}%"),
        ("router: expert set unchanged", f"{100 * r.routing_unchanged:.2f}%"),
    ]
    worst = r.worst_layer
    if worst is not None:
        rows.append(("router: worst layer", f"layer {worst.layer}: overlap {100 * worst.overlap:.2f}%, "
                                            f"unchanged {100 * worst.unchanged:.2f}%"))
        rows += [(f"  layer {x.layer}", f"overlap {100 * x.overlap:6.2f}%, unchanged {100 * x.unchanged:6.2f}%")
                 for x in r.routing]
    width = max(len(k) for k, _ in rows)
    head = f"{model} against {reference}"
    return "\n".join([head] + [f"{k:<{width}}  {v}" for k, v in rows])
