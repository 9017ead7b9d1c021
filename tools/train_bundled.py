"""Train the bundled small Kimi Linear from scratch on the Shakespeare corpus, with the project's own model code.

The model is runtime/model.py's KimiLinear declared from BUNDLED_CONFIG and given fresh values through
runtime/bind.py (the same fill a checkpoint goes through), its training-mode forward (no state: a fresh causal
pass, KDA in the chunked form) trained with AdamW in fp32 (TF32 matmuls on CUDA). After every step the routers'
correction biases move the way the release's auxiliary-loss-free balancing does -- bias_e += u * sign(mean load
- load_e), no gradient -- from the expert choices a forward hook reads off each router.

The run stops at --steps or --time-budget-s, whichever comes first (the learning rate follows whichever is further
along), and keeps the weights with the best validation loss. A step that would not fit the memory left (the host's
on the CPU, the GPU's) is refused before the training, naming a --batch that fits. It writes into --out:
config.json, model-0000i-of-0000N.safetensors (shards of <= 15 MiB), model.safetensors.index.json, the bundled
tokenizer's files (tools/train_tokenizer.py), loss.json (train and validation loss by step, expert loads, settings),
loss.png (when matplotlib is installed; else `python tools/plot_loss.py OUT/loss.json`) and the record of what it
wrote.

    python tools/train_bundled.py --out OUT [--steps 1500 --batch 32 --seq-len 512 --time-budget-s 150]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import nonnegative_float, positive_float, positive_int, run_tool, seed_number  # noqa: E402

from typing import TYPE_CHECKING  # noqa: E402

import bundled_corpus  # noqa: E402

from klconvert.checkpoint.folder_files import CONFIG_FILE, INDEX_FILE  # noqa: E402
from klconvert.checkpoint.name_map import TensorSpec, expected_tensors  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.devices import checked_device  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.runtime.device_memory import device_room, free_the_gpu  # noqa: E402
from klconvert.runtime.host_memory import NAMED_FIT_SHARE, host_memory  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.shell_command import shell_command  # noqa: E402
from klconvert.release import NUM_SPECIAL_TOKENS, RELEASED_CONFIG, config_token_ids, layer_lists  # noqa: E402
from klconvert.tokenizer import (TOKENIZER_CONFIG_FILE, TOKENIZER_FILES, Tokenizer, read_special_tokens,  # noqa: E402
                                 read_tokenizer_config)
from klconvert.units import counted, size_text  # noqa: E402
from klconvert.whole_folder import refuse_taken, whole_folder  # noqa: E402

if TYPE_CHECKING:   # torch, and klconvert's modules that import it, are imported in the functions that use them:
    # --help and a refusal of the arguments import no torch (~2 s of CPU)
    import torch

    from klconvert.runtime import model as M

BPE_RANKS = 4096
MAX_SHARD_BYTES = 15 << 20      # files coming back from the GPU machine are capped at 16 MiB

# The released structure at small size: 8 layers (KDA x3, MLA, KDA x3, MLA), dense layer 0, MoE layers of 8
# experts (top 2, sigmoid, correction bias) plus a shared expert. Every linear input is a multiple of 128 (hidden
# 256, KDA 2 heads x 128, MLA 4 heads x v 64, kv_lora_rank 128, intermediate sizes 512 and 128), so the Triton
# int kernels take every layer at group 128. 11.76M parameters, 23.5 MB in bf16.
BUNDLED_CONFIG = {
    **copy.deepcopy(RELEASED_CONFIG),
    **config_token_ids(BPE_RANKS),
    "head_dim": 64,
    "hidden_size": 256,
    "intermediate_size": 512,
    "kv_lora_rank": 128,
    "linear_attn_config": {**layer_lists(8), "head_dim": 128, "num_heads": 2, "short_conv_kernel_size": 4},
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_token": 2,
    "num_hidden_layers": 8,
    "num_key_value_heads": 4,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "vocab_size": BPE_RANKS + NUM_SPECIAL_TOKENS,
}
TIME_BUDGET_S = 150.0  # the committed weights' run; longer overfits the training split (README, "The bundled model")
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", ".w2.weight")  # scaled down at init: residual writers
# fp32 copies of the weights a run holds besides them: their gradients, AdamW's two moments, the best ones kept
TRAINING_COPIES = 4
# KDA chunks in the window held_per_token measures: two, the second holding what every later chunk does (the carried
# state's terms)
PROBE_CHUNKS = 2
# A step's peak over what held_per_token counts: the backward pass's own temporaries and what the allocator keeps of
# the forward's freed ones. Peak RSS on the CPU (bundled config, 3 steps, 2026-12-07) over the counted bytes, the
# weights' copies aside: 1.64x at 512 tokens a step, 1.38x at 1,024, 1.23x at 2,048, 1.16-1.18x at 4,096; this share
# of the counted bytes of the step's tokens and the measured window's (which the process keeps after measuring it)
# covers each, by 1-15%
PEAK_OVER_COUNTED = 1.3


# ---- the model -------------------------------------------------------------------------------------------
def init_value(spec: TensorSpec, num_layers: int, seed: int) -> torch.Tensor:
    """A fresh fp32 value for one canonical tensor: N(0, 1/fan_in) linears (residual writers further over
    sqrt(2 * layers)), unit norms, zero correction bias; A_log, dt_bias and the convs as synth makes them."""
    import torch

    from klconvert.synth.checkpoint import synth_values, tensor_generator

    name, shape = spec.name, spec.shape
    if name.endswith(("A_log", "dt_bias")) or "conv1d" in name:
        return synth_values(spec, seed).float()
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    if spec.category == "norm":
        return torch.ones(shape)
    g = tensor_generator(name, seed)
    std = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
    if name.endswith(OUTPUT_PROJECTIONS):
        std /= math.sqrt(2 * num_layers)
    return torch.randn(shape, generator=g) * std


def fresh_model(c: KimiLinearConfig, device: torch.device, seed: int) -> M.KimiLinear:
    """KimiLinear declared from `c`, filled with init values through bind, trainable (fp32)."""
    import torch

    from klconvert.runtime import model as M
    from klconvert.runtime.bind import bind

    specs = expected_tensors(c)
    model = bind(M.KimiLinear(c), lambda name: init_value(specs[name], c.num_hidden_layers, seed), packed=None,
                 held={}, device=device, dtype=torch.float32, triton=False, restack=False)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("e_score_correction_bias"))  # moved by the balancing rule, not by SGD
    return model.train()


def routers(model: M.KimiLinear) -> dict[int, M.Router]:
    """{layer: its MoE router}."""
    return {i: block.block_sparse_moe.gate for i, block in enumerate(model.blocks)
            if hasattr(block, "block_sparse_moe")}


class ExpertLoads:
    """Counts the tokens each router sends to each expert, through forward hooks on the routers."""

    def __init__(self, model: M.KimiLinear):
        self.num_experts = model.config.num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = [router.register_forward_hook(self._hook(layer)) for layer, router in routers(model).items()]

    def _hook(self, layer: int):
        def record(module, inputs, output):
            import torch

            ids = output[0].detach().flatten()
            count = torch.bincount(ids, minlength=self.num_experts).float()
            self.counts[layer] = self.counts[layer] + count if layer in self.counts else count
        return record

    def take(self) -> dict[int, torch.Tensor]:
        counts, self.counts = self.counts, {}
        return counts


def balance(model: M.KimiLinear, counts: dict[int, torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e), per MoE layer."""
    import torch

    with torch.no_grad():
        for layer, router in routers(model).items():
            load = counts[layer]
            router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def load_spread(counts: dict[int, torch.Tensor]) -> dict[str, dict]:
    """Per MoE layer: each expert's share of the routed tokens, and max/min share over the even share."""
    out = {}
    for layer, count in sorted(counts.items()):
        share = (count / count.sum()).tolist()
        even = 1.0 / len(share)
        out[str(layer)] = {"share": [round(s, 4) for s in share], "max_over_even": round(max(share) / even, 3),
                           "min_over_even": round(min(share) / even, 3)}
    return out


def held_per_token(model: M.KimiLinear, seq_len: int, device: torch.device) -> float:
    """The bytes a training step holds per token of its batch at its peak, the backward pass's start: what autograd
    keeps for the backward pass (counted as a forward of one window of probe_tokens(seq_len) tokens saves it --
    the weights, saved by reference, not counted, nor a tensor twice) and the logits' gradient, fp32. Measured rather
    than worked out from the shapes: the model's code decides what it saves (a KDA chunk's pairwise decay and its
    product with k, [H, C, C, K] fp32 each, are two thirds of it)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}   # by address, each kept to the end: one a dropped branch freed would lend its address to another

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage
        return tensor

    tokens = probe_tokens(seq_len)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(torch.zeros(1, tokens, dtype=torch.long, device=device))
    return sum(storage.nbytes() for storage in saved.values()) / tokens + model.config.vocab_size * 4


def probe_tokens(seq_len: int) -> int:
    """The tokens of the window held_per_token measures: PROBE_CHUNKS KDA chunks, or a window of seq_len if shorter."""
    from klconvert.runtime.kda import CHUNK

    return min(seq_len, PROBE_CHUNKS * CHUNK)


def refuse_unfitting_step(model: M.KimiLinear, batch: int, seq_len: int, device: torch.device) -> None:
    """KLError where a training step of `batch` windows of `seq_len` tokens, with the weights' TRAINING_COPIES, needs
    more than the device has left (on the CPU host_memory's room: --batch 100000 was ended by the OOM killer; on a GPU
    device_room), naming the largest --batch that fits, or where none does the largest --seq-len at --batch 1. The
    room is taken before held_per_token's window runs, which is counted with the step's tokens."""
    host = None if device.type == "cuda" else host_memory()
    if device.type != "cuda" and host is None:   # not Linux: nothing known to check against
        return
    room, where = (device_room(device, 0), f"on {device}") if host is None else (host.available, host.bound)
    per_token = PEAK_OVER_COUNTED * held_per_token(model, seq_len, device)
    copies = TRAINING_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    probe = probe_tokens(seq_len)
    needed = copies + per_token * (batch * seq_len + probe)
    if needed <= room:
        return
    remedy = free_the_gpu(device, int(needed)) if host is None else host.remedy_for(int(needed))
    tokens = (room * NAMED_FIT_SHARE - copies) / per_token - probe
    fit_batch, fit_window = int(tokens // seq_len), int(tokens)
    lower = (f"lower --batch to {fit_batch}" if fit_batch >= 1 else
             f"lower {'' if batch == 1 else '--batch to 1 and '}--seq-len to {fit_window}" if fit_window >= 1 else
             f"the weights' gradients, optimizer moments and best copy alone need {size_text(copies)}")
    raise KLError(f"--batch {batch} of --seq-len {seq_len}: a training step holds about {size_text(int(needed))} "
                  f"({size_text(int(per_token))} a token, {batch * seq_len:,} tokens, with the weights' "
                  f"{size_text(copies)} of gradients, optimizer moments and best copy), where "
                  f"{size_text(room)} is available {where}; {lower}" + ("" if remedy is None else f", or {remedy}"))


# ---- data ------------------------------------------------------------------------------------------------
def token_splits(tokenizer: Tokenizer, validation_tokens: int | None = None,
                 max_chars: int | None = None) -> dict[str, torch.Tensor]:
    """{"train", "validation"}: the corpus splits as 1-D token tensors (each from its first `max_chars`
    characters), validation cut to its first `validation_tokens` (the test split is never read here)."""
    import torch

    splits = bundled_corpus.split()
    out = {name: torch.tensor(tokenizer.encode(splits[name][:max_chars]), dtype=torch.long)
           for name in ("train", "validation")}
    out["validation"] = out["validation"][:validation_tokens]
    return out


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, g: torch.Generator):
    """`batch` random windows: inputs and next-token targets, [batch, seq_len] each; any start whose window and next
    token fit, the last one included."""
    import torch

    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=g)
    window = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def mean_loss(model: M.KimiLinear, tokens: torch.Tensor, batch: int, seq_len: int, device: torch.device) -> float:
    """Mean next-token loss over the non-overlapping windows of `tokens`."""
    import torch
    import torch.nn.functional as F

    n = (len(tokens) - 1) // seq_len
    x = tokens[:n * seq_len].view(n, seq_len)
    y = tokens[1:n * seq_len + 1].view(n, seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            logits = model(x[i:i + batch].to(device))
            total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].to(device).flatten(),
                                     reduction="sum").item()
    return total / (n * seq_len)


def run_progress(step: int, steps: int, elapsed_s: float, time_budget_s: float | None) -> float:
    """How far a run is, 0 to 1: by its steps or by its time budget (None: no budget), whichever is further along;
    the run stops at 1 and the learning rate follows it."""
    return max(step / steps, elapsed_s / time_budget_s if time_budget_s else 0.0)


def learning_rate(progress: float, peak: float, warmup: float, floor: float) -> float:
    """Linear warm-up over the first `warmup` of the run, then cosine down to floor * peak. `progress`: how far the
    run is once the step is taken (run_progress of step + 1), so the first step of the warm-up moves the weights, as
    the usual (step + 1) / warm-up steps does (at its start, 0, a one-step run kept its initial weights)."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---- output ----------------------------------------------------------------------------------------------
def canonical_state(model: M.KimiLinear) -> dict[str, torch.Tensor]:
    """{canonical checkpoint name: value on the CPU, in its stored dtype} (fp32 for A_log, dt_bias and the
    correction bias, as released; bf16 otherwise)."""
    import torch

    from klconvert.runtime import model as M
    from klconvert.synth.checkpoint import FP32_TENSORS

    c = model.config
    out = {}
    for pname, p in model.named_parameters():
        for name, index in M.canonical_names(c, pname):
            value = p.detach()[index] if index != () else p.detach()
            out[name] = value.to("cpu", torch.float32 if name.endswith(FP32_TENSORS) else torch.bfloat16).clone()
    return out


def write_checkpoint(out: Path, config: dict, state: dict[str, torch.Tensor], tokenizer_dir: Path) -> list[str]:
    """The released folder layout in `out`: config, shards, index, tokenizer files. Returns the files written."""
    from klconvert.checkpoint.safetensors_writer import (PlannedTensor, index_json, shard_names, split_into_shards,
                                                         write_shard)

    c = KimiLinearConfig.from_dict(config)
    expected = expected_tensors(c)
    if set(state) != set(expected):
        raise ValueError(f"state names differ from the checkpoint's: {sorted(set(state) ^ set(expected))[:4]}")
    planned = [PlannedTensor(n, state[n].dtype, tuple(state[n].shape), lambda n=n: state[n]) for n in expected]
    shards = split_into_shards(planned, MAX_SHARD_BYTES)
    names = shard_names(len(shards))
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for shard, name in zip(shards, names):
        write_shard(out / name, shard)
    (out / INDEX_FILE).write_text(index_json(shards, names) + "\n")
    copied = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]   # special_tokens_map optional
    for name in copied:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return [CONFIG_FILE, *names, INDEX_FILE, *copied]


def named_special_tokens(tokenizer_dir: Path) -> dict[str, int]:
    """{content: id} of the special tokens the folder's tokenizer_config.json names: with the BPE ranks, the ids the
    tokenizer itself has. Tokenizer.from_folder pads up to config.json's vocab_size with placeholders, which made a
    smaller tokenizer look the model's size (tools/train_tokenizer.py --vocab 1000 in its place ran garbled)."""
    path = tokenizer_dir / TOKENIZER_CONFIG_FILE
    return read_special_tokens(read_tokenizer_config(path), path)


def refuse_short_splits(data: dict[str, torch.Tensor], seq_len: int, validation_flag: str | None = None) -> None:
    """KLError unless every split holds a window of `seq_len` tokens and its next token (--validation-tokens 10
    under windows of 32 divided by zero; 0 once 'measured' a perplexity of 1); `validation_flag`: the caller's flag
    that sets the validation split's length, offered with --seq-len where that split is short."""
    for split, tokens in data.items():
        if len(tokens) <= seq_len:
            more = f" (or raise {validation_flag})" if split == "validation" and validation_flag else ""
            raise KLError(f"the {split} split has {counted(len(tokens), 'token')}, not one window of --seq-len "
                          f"{seq_len} and its next token; lower --seq-len{more}")


# ---- the run ---------------------------------------------------------------------------------------------
def train(out: Path, config: dict = BUNDLED_CONFIG, steps: int = 1500, batch: int = 32, seq_len: int = 512,
          lr: float = 2e-3, warmup: float = 0.03, lr_floor: float = 0.1, weight_decay: float = 0.1,
          bias_rate: float = 5e-3, time_budget_s: float = TIME_BUDGET_S, eval_every: int = 50,
          validation_tokens: int | None = None, max_chars: int | None = None, seed: int = 0,
          device: str | None = None, tokenizer_dir: Path = BUNDLED_DIR, plot: bool = True,
          log=print) -> dict:
    """Train, keep the best-validation weights, write the checkpoint and loss.json (and loss.png) to `out`, a new
    folder, whole or not at all. Returns the loss log."""
    import torch
    import torch.nn.functional as F

    refuse_taken(out)   # before the training, not after it
    if not 0 <= time_budget_s < float("inf"):
        raise KLError(f"--time-budget-s {time_budget_s}: give seconds >= 0 (0: no budget)")
    t0 = time.perf_counter()
    device = checked_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    c = KimiLinearConfig.from_dict(config)
    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    ranks, specials = len(tokenizer.bpe_ranks), len(named_special_tokens(tokenizer_dir))
    if ranks + specials != c.vocab_size:
        raise KLError(f"{tokenizer_dir}: its tokenizer has {ranks + specials:,} ids ({ranks:,} BPE ranks, {specials} "
                      f"special tokens), the model's config {c.vocab_size:,}; train one of "
                      f"{c.vocab_size - specials:,} ranks (tools/train_tokenizer.py --vocab), or change BPE_RANKS")
    data = token_splits(tokenizer, validation_tokens, max_chars)
    refuse_short_splits(data, seq_len, "--validation-tokens")
    model = fresh_model(c, device, seed)
    refuse_unfitting_step(model, batch, seq_len, device)   # before the first batch is drawn, let alone run
    loads = ExpertLoads(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "conv1d" not in n]
    others = [p for p in params if all(p is not q for q in decayed)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=False)
    g = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters on {device}; train {counted(len(data['train']), 'token')}, validation "
        f"{len(data['validation']):,}; start-up {time.perf_counter() - t0:.1f} s")

    history = {"step": [], "train_loss": [], "validation_step": [], "validation_loss": [], "lr": []}
    best = (float("inf"), -1, None)
    running, running_n, step = 0.0, 0, 0
    train_start = time.perf_counter()
    while step < steps:
        elapsed = time.perf_counter() - train_start
        if run_progress(step, steps, elapsed, time_budget_s) >= 1.0:
            break
        rate = learning_rate(run_progress(step + 1, steps, elapsed, time_budget_s), lr, warmup, lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = rate
        x, y = sample_batch(data["train"], batch, seq_len, g)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        balance(model, loads.take(), bias_rate)
        step += 1
        running += loss.item()
        running_n += 1
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["train_loss"].append(running / running_n)
            history["lr"].append(rate)
            running, running_n = 0.0, 0
            val = mean_loss(model, data["validation"], batch, seq_len, device)
            loads.take()  # the validation pass's choices are not training loads
            history["validation_step"].append(step)
            history["validation_loss"].append(val)
            if val < best[0]:
                best = (val, step, {n: p.detach().clone() for n, p in model.named_parameters()})
            log(f"step {step:5d}  train {history['train_loss'][-1]:.4f}  validation {val:.4f}  lr {rate:.2e}  "
                f"{time.perf_counter() - train_start:.0f} s")
    train_seconds = time.perf_counter() - train_start
    if best[2] is None:  # too few steps for an evaluation: keep the last weights
        best = (mean_loss(model, data["validation"], batch, seq_len, device), step, None)
    else:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(best[2][n])
    loads.take()
    mean_loss(model, data["validation"], batch, seq_len, device)   # the kept weights' loads on held-out text
    spread = load_spread(loads.take())
    record = {
        "kept_step": best[1], "kept_validation_loss": best[0], "steps_run": step, "train_seconds": train_seconds,
        "parameters": n_params, "device": str(device), "tokens_per_step": batch * seq_len,
        "settings": {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup,
                     "lr_floor": lr_floor, "weight_decay": weight_decay, "bias_rate": bias_rate,
                     "time_budget_s": time_budget_s, "eval_every": eval_every,
                     "validation_tokens": len(data["validation"]), "seed": seed},
        "expert_load_validation": spread, **history,
    }
    with whole_folder(out) as folder:
        files = write_checkpoint(folder, config, canonical_state(model), tokenizer_dir)
        (folder / "loss.json").write_text(json.dumps(record, indent=1) + "\n")
        files.append("loss.json")
        # in the folder before it is sealed, so that its record lists the picture (one made after it kept `klconvert
        # synth --force` from replacing the folder); a failed one is said and the weights kept
        if plot:
            try:
                from plot_loss import plot_loss
                plot_loss(folder / "loss.json", folder / "loss.png")
                files.append("loss.png")
            except Exception as e:   # noqa: BLE001 -- matplotlib missing or broken, a backend error: said, not fatal
                (folder / "loss.png").unlink(missing_ok=True)   # a half-written one is no picture
                log(f"no loss.png ({type(e).__name__}: {e}); plot later with "
                    f"`{shell_command('python', 'tools/plot_loss.py', out / 'loss.json')}`")
    worst = max((s["max_over_even"] for s in spread.values()), default=1.0)
    log(f"kept step {best[1]} (validation loss {best[0]:.4f}, perplexity {math.exp(best[0]):.2f}); {step} steps "
        f"in {train_seconds:.0f} s; busiest expert {worst:.2f}x its even share; wrote {len(files)} files to {out}")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=script_summary(__file__))
    p.add_argument("--out", type=Path, required=True,
                   help="Folder to write, which must not exist or must be empty (written under a hidden name beside "
                        "it, renamed when complete).")
    p.add_argument("--steps", type=positive_int, default=1500)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--lr", type=positive_float, default=2e-3, help="Peak learning rate.")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.1)
    p.add_argument("--bias-rate", type=nonnegative_float, default=5e-3, help="Correction-bias update speed u.")
    p.add_argument("--time-budget-s", type=float, default=TIME_BUDGET_S,
                   help="Stop training after this many seconds (0: no budget, --steps alone).")
    p.add_argument("--eval-every", type=positive_int, default=50)
    p.add_argument("--validation-tokens", type=positive_int, default=None, help="Validate on the first N tokens only "
                   "[default: the whole validation split].")
    p.add_argument("--seed", type=seed_number, default=0, help="A run repeats bit for bit on one machine with "
                   "--time-budget-s 0; under a budget the learning rate follows the clock too.")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="[default: cuda if present].")
    a = p.parse_args()
    try:
        train(a.out, steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, weight_decay=a.weight_decay,
              bias_rate=a.bias_rate, time_budget_s=a.time_budget_s, eval_every=a.eval_every,
              validation_tokens=a.validation_tokens, seed=a.seed, device=a.device)
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    run_tool(main)
