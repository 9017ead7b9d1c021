"""Quantization-aware distillation of the bundled model: the weights a klconvert policy quantizes are tuned end to
end, through their round trip, so that the quantized model's next-token distribution follows the bf16 model's.

The student is runtime/model.py's training-mode KimiLinear filled from the bf16 folder; every weight the policy
quantizes (by its canonical name: experts, shared expert, dense MLP, KDA and MLA projections, lm_head) is seen
through the policy's own round trip (quant/groupwise.py's quantize_groupwise then dequantize_groupwise of the weight
rounded to bf16, as `klconvert quantize` and the runtime do), the gradient passing straight through the rounding
(--scale-gradient: also through each group's min-max scale, LSQ's gradient, to the weights that set it).
The loss is KL(bf16 model || student) per token on random windows of the training split (--generated-windows N:
a share of each batch drawn instead from N windows of the bf16 model's own text, sampled once before the tuning by
the runtime's engine, each from one token of the training split: fresh text, where the training split repeats every
~85 steps of the defaults; --hidden-weight W: plus W times the sum over the blocks of the student's output residual
stream's squared distance from the bf16 model's, relative to the latter's mean square -- each layer held to its
reference, not only the last; on by default at HIDDEN_WEIGHT, whose comment says why; 0: the KL alone); only the
quantized weights move (norms, routers and their correction biases, embedding, convolutions stay as released).
The weights with the least KL on the validation split are kept, written as a bf16 folder, and quantized by
`klconvert quantize` with the same policy: the folder holds the standard scheme (the same groups, bits and scales
rule), only the codes differ from round-to-nearest of the released weights. The test split stays unseen.

    python tools/distill_bundled.py OUT [--bits 4 [--group-size 128] [--asym] | --recipe recipes/32gb.yaml]
                                        [--steps 800 --batch 32 --seq-len 512 --lr 5e-5] [--scale-gradient]
                                        [--generated-windows N [--generated-share 0.5]] [--generated-file F]
                                        [--hidden-weight W]
                                        [--time-budget-s S] [--device cuda]
    python tools/quality_table.py --folder "int4 g128, distilled=OUT"

On an H200 a step of the defaults takes ~0.3 s with the KDA layers through fla-core's chunk_kda (FlaChunk, on CUDA
where fla-core is installed; 0.38 s with --scale-gradient), 0.62 s through the PyTorch chunks; --time-budget-s
ends the schedule in time. On a 2-core CPU a step of 4 x 256 tokens takes ~6 s. The learning rate matters most:
each step flips the codes of the weights nearest a rounding boundary, and a step of 2e-4 or more flips too many at
once (README, "Quality").
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import bf16_checkpoint, positive_float, positive_int, run_tool, seed_number  # noqa: E402

from typing import TYPE_CHECKING  # noqa: E402

from record_bundled import file_checksums  # noqa: E402
from train_bundled import (canonical_state, learning_rate, refuse_short_splits, run_progress,  # noqa: E402
                           sample_batch, token_splits, write_checkpoint)

from klconvert.checkpoint.folder_files import CONFIG_FILE  # noqa: E402
from klconvert.checkpoint.name_map import expected_tensors  # noqa: E402
from klconvert.convert.output_folder import interrupted_quantize, partial_path, refuse_out_over_source  # noqa: E402
from klconvert.devices import checked_device  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.quant import Policy  # noqa: E402
from klconvert.quant.scheme import QuantScheme  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402
from klconvert.whole_folder import refuse_taken, whole_folder  # noqa: E402

if TYPE_CHECKING:   # torch, its modules here (distill_modules) and klconvert's that import it are imported in the
    # functions that use them: --help and a refusal of the arguments import no torch (~2 s of CPU)
    import torch
    from torch import nn

    from klconvert.quantize import QuantizeResult
    from klconvert.runtime import model as M

# --hidden-weight's default: at W = 1 the test KL of the default policy's folder fell ~10% against the KL alone, on
# the 2-core CPU (120 steps of 4 x 256: 0.0501 -> 0.0450) and on an H200 (the defaults, 230 steps each, three runs at
# once: 0.0413 -> 0.0372; W = 4 0.0380), and on the 32 GB recipe on the CPU 0.0243 -> 0.0200; one full-budget run
# alone on the H200 with 4,096 sampled windows read 0.0384 against the KL alone's 0.0360 in another call, within the
# spread of single runs; README "Quality"
HIDDEN_WEIGHT = 1.0
DISTILL_LOG = "distill.json"


def training_model(folder: Path, device: torch.device, fla: bool = False) -> M.KimiLinear:
    """The folder's model in fp32 with the training-mode forward (the declared modules, a fresh causal pass),
    nothing trainable yet: the teacher as it is, the student once its round trips are attached. fla: the KDA
    layers' delta rule through FlaChunk."""
    import torch
    from distill_modules import FlaChunk

    from klconvert.checkpoint.reader import Checkpoint
    from klconvert.runtime import model as M
    from klconvert.runtime.bind import bind

    checkpoint = Checkpoint(folder)
    model = bind(M.KimiLinear(checkpoint.config), checkpoint.get, packed=None, held={}, device=device,
                 dtype=torch.float32, triton=False, restack=False).train()
    if fla:
        for module in model.modules():
            if isinstance(module, M.KDAMixer):
                module.chunk = FlaChunk()
    return model


def fla_installed() -> bool:
    """fla-core importable (FlaChunk's kernels), without importing it."""
    return importlib.util.find_spec("fla") is not None


def quantized_parameters(model: M.KimiLinear, policy) -> dict[str, QuantScheme]:
    """{parameter name: the scheme the policy stores all of its checkpoint tensors with} for the parameters it
    quantizes (a stacked expert parameter holds many tensors: they must agree)."""
    from klconvert.runtime import model as M

    c = model.config
    specs = expected_tensors(c)
    out = {}
    for pname, _ in model.named_parameters():
        schemes = {policy.scheme_for(name, specs[name].shape) for name, _ in M.canonical_names(c, pname)}
        if len(schemes) > 1:
            raise ValueError(f"{pname}: its checkpoint tensors take different schemes {schemes}")
        scheme = schemes.pop()
        if scheme is not None:
            out[pname] = scheme
    return out


def attach_round_trips(model: M.KimiLinear, schemes: dict[str, QuantScheme],
                       scale_gradient: bool = False) -> list[nn.Parameter]:
    """Route every quantized parameter through its RoundTrip; returns the latent weights, now trainable."""
    from distill_modules import RoundTrip
    from torch.nn.utils import parametrize

    latents = []
    for pname, scheme in schemes.items():
        owner, _, leaf = pname.rpartition(".")
        module = model.get_submodule(owner)
        getattr(module, leaf).requires_grad_(True)
        parametrize.register_parametrization(module, leaf, RoundTrip(scheme, scale_gradient))
        latents.append(module.parametrizations[leaf].original)
    return latents


def detach_round_trips(model: M.KimiLinear, schemes: dict[str, QuantScheme]) -> None:
    """Back to plain parameters holding the latent (unrounded) weights."""
    from torch.nn.utils import parametrize

    for pname in schemes:
        owner, _, leaf = pname.rpartition(".")
        parametrize.remove_parametrizations(model.get_submodule(owner), leaf, leave_parametrized=False)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position's next-token distribution, [*]."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


class BlockOutputs:
    """Each block's output (the residual stream after it) in a model's forwards while armed, kept until taken
    (which disarms); forwards while disarmed (validation) keep nothing."""

    def __init__(self, model: M.KimiLinear):
        self.outputs: list[torch.Tensor] = []
        self.armed = False
        for block in model.model.layers:
            block.register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        if self.armed:
            self.outputs.append(out)

    def arm(self) -> None:
        self.armed = True

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs, self.armed = self.outputs, [], False
        return outputs


def hidden_distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The sum over blocks of |h_student - h_teacher|^2 / |h_teacher|^2 (means over every value, fp32)."""
    return sum(((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean() for s, t in zip(student, teacher))


def mean_kl(teacher: M.KimiLinear, student: M.KimiLinear, tokens: torch.Tensor, batch: int, seq_len: int,
            device: torch.device) -> float:
    """Mean per-token KL over the non-overlapping windows of `tokens`."""
    import torch
    from torch.nn.utils import parametrize

    n = len(tokens) // seq_len
    x = tokens[:n * seq_len].view(n, seq_len)
    total = 0.0
    with torch.no_grad(), parametrize.cached():
        for i in range(0, n, batch):
            xb = x[i:i + batch].to(device)
            total += kl_per_token(teacher(xb), student(xb)).sum().item()
    return total / (n * seq_len)


def teacher_windows(source: Path, first: torch.Tensor, seq_len: int, seed: int, device: torch.device,
                    chunk: int | None = None, log=None) -> torch.Tensor:
    """[len(first), seq_len] token windows of the model's own text: window i opens with first[i] and goes on as the
    model samples it at temperature 1 (the runtime's engine, `chunk` sequences at a time; the same ids for a seed
    and chunk). The default chunk (None) is the largest batch whose decode step the engine captures on CUDA with the
    bf16 folder's dense experts (their dispatch stays on the device up to DeviceExperts.MAX_TOKENS); a larger chunk
    decodes eagerly through the reference expert loop, which asks the host at every MoE layer (before the experts
    stayed on the device, on an H200 on 2026-12-01, 4096 windows of 512 tokens did not finish in 540 s 64 at a
    time, and took 239 s 1024 at a time)."""
    import torch

    from klconvert.runtime.device_experts import DeviceExperts
    from klconvert.runtime.engine import load

    chunk = DeviceExperts.MAX_TOKENS if chunk is None else chunk
    engine = load(source, device, max_context=seq_len, batch=min(chunk, len(first)))
    windows, t0 = [], time.perf_counter()
    for i in range(0, len(first), chunk):
        prompts = first[i:i + chunk].view(-1, 1)
        sampled = engine.generate(prompts, seq_len - 1, temperature=1.0, seed=seed + i,
                                  stop_ids=frozenset())   # whole windows: on past an end of turn
        windows.append(torch.cat([prompts, sampled.cpu()], dim=1))
        if log:
            log(f"sampled {min(i + chunk, len(first))} of {len(first)} windows, {time.perf_counter() - t0:.0f} s")
    return torch.cat(windows)


def teacher_id(source: Path) -> str:
    """The bf16 folder's identity for saved windows: sha256 over its files' checksums (weights, config,
    tokenizer), so that windows sampled from other weights -- the bundled model retrained -- are refused."""
    return hashlib.sha256(json.dumps(file_checksums(source), sort_keys=True).encode()).hexdigest()


def save_windows(path: Path, windows: torch.Tensor, source: Path, vocab_size: int) -> None:
    """`windows` [n, seq_len] into a safetensors file (int16 ids where the vocabulary allows: 4,096 windows of 512
    tokens then make 4 MiB), marked with the bf16 folder's teacher_id; written whole or not at all."""
    import torch
    from safetensors.torch import save_file

    dtype = torch.int16 if vocab_size <= 1 << 15 else torch.int32
    partial = path.with_name(path.name + ".partial")
    try:
        save_file({"windows": windows.to(dtype).contiguous()}, str(partial), metadata={"teacher": teacher_id(source)})
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise KLError(f"{path}: the sampled windows could not be written ({e}); free space or name another file") \
            from None


def load_windows(path: Path, source: Path, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The windows save_windows wrote for this bf16 folder, checked: [n >= 1, seq_len] integer ids below the
    vocabulary size, from the same teacher. Any other file is a KLError naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            teacher = (f.metadata() or {}).get("teacher")
            if teacher != teacher_id(source):
                raise KLError(f"{path}: its windows were not sampled from {source} (another model, or the model "
                              "since changed); sample new ones into another file")
            if set(f.keys()) != {"windows"}:
                raise KLError(f"{path}: expected one tensor 'windows', found {sorted(f.keys())}")
            header = f.get_slice("windows")  # checked from the header, before any of it is read
            dtype, shape = header.get_dtype(), header.get_shape()
            if dtype not in ("I16", "I32", "I64") or len(shape) != 2 or shape[0] < 1 or shape[1] != seq_len:
                raise KLError(f"{path}: windows of {dtype} {shape}, expected integer ids [n, {seq_len}] "
                              "(--seq-len); sample windows this long into another file")
            windows = f.get_tensor("windows").long()
    except (SafetensorError, OSError) as e:
        raise KLError(f"{path}: not a readable safetensors file ({e}); sample the windows again") from None
    if windows.min() < 0 or windows.max() >= vocab_size:
        raise KLError(f"{path}: token ids outside 0..{vocab_size - 1}; sample the windows again")
    return windows


def training_batch(train: torch.Tensor, own: torch.Tensor | None, batch: int, seq_len: int, share: float,
                   g: torch.Generator) -> torch.Tensor:
    """`batch` windows [batch, seq_len]: random windows of the training split, of which round(batch * share) are
    replaced by windows drawn from `own` (the model's own text) when there is any."""
    import torch

    n_own = 0 if own is None else round(batch * share)
    parts = [sample_batch(train, batch - n_own, seq_len, g)[0]] if batch > n_own else []
    if n_own:
        parts.append(own[torch.randint(0, len(own), (n_own,), generator=g)])
    return torch.cat(parts)


def write_log(folder: Path, record: dict) -> None:
    """The run's `record` as DISTILL_LOG in `folder` (whole_folder lists it in the output record with the rest)."""
    (folder / DISTILL_LOG).write_text(json.dumps(record, indent=1) + "\n")


def distilled_card(title: str, source: Path, policy: Policy, result: QuantizeResult) -> str:
    """The model card of the quantized folder `title` (quantize's `result`): quantize's, naming the bf16 folder the
    weights were distilled from as the source, and saying that they were tuned."""
    from klconvert.convert.model_card import model_card
    from klconvert.convert.provenance import source_origin

    card = model_card(title, source_origin(source), policy, result.totals, result.shards, version("klconvert"))
    return card + (f"\n## Distilled\n\nThe quantized weights were tuned before quantizing, by quantization-aware "
                   f"distillation from the source (tools/distill_bundled.py): the run's settings and losses are in "
                   f"`{DISTILL_LOG}`.\n")


def distill(out: Path, source: Path = BUNDLED_DIR, bits: int | None = None, group_size: int | None = None,
            symmetric: bool | None = None, recipe: Path | None = None, steps: int = 800, batch: int = 32,
            seq_len: int = 512, lr: float = 5e-5, warmup: float = 0.05, eval_every: int = 100,
            validation_tokens: int | None = 16384, max_chars: int | None = None, seed: int = 0,
            scale_gradient: bool = False, time_budget_s: float | None = None, generated_windows: int = 0,
            generated_share: float = 0.5, generated_file: Path | None = None, hidden_weight: float = HIDDEN_WEIGHT,
            device: str | None = None, log=print) -> dict:
    """Tune, keep the least-validation-KL weights, quantize them into `out`, written whole with the log (DISTILL_LOG)
    in it, which it returns.
    The run stops at `steps` or `time_budget_s` (tuning and validation), whichever comes first; the learning rate
    follows whichever is further along. generated_file: where the sampled windows are kept -- read from it when it
    exists (all of them), else sampled (`generated_windows` of them) and saved there for the next run.
    hidden_weight: the weight of the blocks' hidden-state distance (hidden_distance) in the training loss; the
    validation KL, which picks the kept weights, is the KL alone."""
    import torch
    from torch.nn.utils import parametrize

    from klconvert.quantize import MODEL_CARD_FILE, quantize
    from klconvert.quantize_options import choose_policy

    refuse_out_over_source(source, out, "quantized model")
    if out.exists() or out.is_symlink():  # before the tuning, not after it
        raise KLError(f"{out}: already exists; choose another output folder")
    refuse_taken(out)   # and a parent that takes files, a name no run's temporary has
    if interrupted_quantize(partial_path(out)):   # a folder at OUT would leave that run unfinishable
        raise KLError(f"{partial_path(out)}: holds an interrupted `klconvert quantize` into {out}; rerun that command "
                      "to finish it, or delete it, or choose another output folder")
    if time_budget_s is not None and not time_budget_s > 0:
        raise KLError(f"--time-budget-s {time_budget_s}: give a positive number of seconds (or leave it out)")
    if not 0 <= hidden_weight < float("inf"):
        raise KLError(f"--hidden-weight {hidden_weight}: give a weight >= 0")
    if generated_windows < 0 or not 0 < generated_share <= 1:
        raise KLError(f"--generated-windows {generated_windows}, --generated-share {generated_share}: give a "
                      "number of windows >= 0 and a share of each batch in (0, 1]")
    # the teacher as a bf16 folder, checked now: a quantized one was tuned against for minutes, then refused by the
    # quantize of the tuned weights (its config's quantization_config copied with them)
    vocab_size = bf16_checkpoint(source).config.vocab_size
    saved = None
    if generated_file is not None:
        if generated_file.exists() or generated_file.is_symlink():
            saved = load_windows(generated_file, source, seq_len, vocab_size)
            if generated_windows not in (0, len(saved)):
                raise KLError(f"{generated_file}: holds {len(saved)} windows, not --generated-windows "
                              f"{generated_windows}; leave that out to take them all, or name another file")
        elif not generated_windows:
            raise KLError(f"{generated_file}: no such file; give --generated-windows N to sample N windows and "
                          "save them there")
        elif not generated_file.parent.is_dir():
            raise KLError(f"{generated_file}: its folder does not exist; create it first or name another file")
    device = checked_device(device)
    torch.manual_seed(seed)
    layout = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "recipe": recipe}
    policy, _ = choose_policy(**layout)   # klconvert quantize's: the default policy at these options, or the recipe's
    if policy.kind != "int":
        raise KLError(f"{recipe}: distillation tunes integer schemes; this recipe stores {policy.kind}")
    data = token_splits(Tokenizer.from_folder(source), validation_tokens, max_chars)
    refuse_short_splits(data, seq_len)
    fla = device.type == "cuda" and fla_installed()
    teacher = training_model(source, device, fla).eval()
    student = training_model(source, device, fla)
    schemes = quantized_parameters(student, policy)
    latents = attach_round_trips(student, schemes, scale_gradient)
    blocks = (BlockOutputs(teacher), BlockOutputs(student)) if hidden_weight else None
    optimizer = torch.optim.Adam(latents, lr=lr)
    g = torch.Generator().manual_seed(seed)
    own, generated_s = saved, 0.0
    if saved is not None:
        generated_windows = len(saved)
        log(f"{generated_windows} windows of {seq_len} tokens of the bf16 model's own text read from {generated_file}")
    elif generated_windows:
        t0 = time.perf_counter()
        first = data["train"][torch.randint(0, len(data["train"]), (generated_windows,), generator=g)]
        own = teacher_windows(source, first, seq_len, seed, device, log=log)
        generated_s = time.perf_counter() - t0
        log(f"{generated_windows} windows of {seq_len} tokens of the bf16 model's own text sampled in "
            f"{generated_s:.0f} s")
        if generated_file is not None:
            save_windows(generated_file, own, source, vocab_size)
    val = mean_kl(teacher, student, data["validation"], batch, seq_len, device)
    log(f"{len(schemes)} quantized parameters ({sum(p.numel() for p in latents) / 1e6:.2f}M weights) on {device}; "
        f"validation KL before: {val:.4f}; KDA through {'fla-core' if fla else 'PyTorch'}")
    history = {"step": [0], "train_kl": [None], "validation_kl": [val]}

    def evaluate(step: int, best: tuple) -> tuple:
        nonlocal running, running_n
        val = mean_kl(teacher, student, data["validation"], batch, seq_len, device)
        history["step"].append(step)
        history["train_kl"].append(running / running_n)
        history["validation_kl"].append(val)
        running, running_n = 0.0, 0
        log(f"step {step:4d}  train KL {history['train_kl'][-1]:.4f}  validation KL {val:.4f}  "
            f"{time.perf_counter() - started:.0f} s")
        return (val, step, [p.detach().clone() for p in latents]) if val < best[0] else best

    best = (val, 0, [p.detach().clone() for p in latents])
    running, running_n, step, started = 0.0, 0, 0, time.perf_counter()
    while step < steps:
        elapsed = time.perf_counter() - started
        if run_progress(step, steps, elapsed, time_budget_s) >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run_progress(step + 1, steps, elapsed, time_budget_s), lr, warmup, 0.0)
        x = training_batch(data["train"], own, batch, seq_len, generated_share, g).to(device)
        for outputs in blocks or ():
            outputs.arm()
        with torch.no_grad():
            target = teacher(x)
        with parametrize.cached():  # each round trip once a step, not at every read of its weight
            kl = kl_per_token(target, student(x)).mean()
            loss = kl + hidden_weight * hidden_distance(blocks[1].take(), blocks[0].take()) if blocks else kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        step += 1
        running, running_n = running + kl.item(), running_n + 1  # the training KL alone, as validation's
        if step == 1:  # on a fresh GPU machine the kernels' compiles and autotunes fall here
            log(f"first step done at {time.perf_counter() - started:.0f} s")
        if step % eval_every == 0 or step == steps:
            best = evaluate(step, best)
    if running_n:  # stopped by the time budget between evaluations
        best = evaluate(step, best)
    with torch.no_grad():
        for p, kept in zip(latents, best[2]):
            p.copy_(kept)
    detach_round_trips(student, schemes)
    # OUT whole, its log in it, or nothing (a kill between the quantize and the log left a finished-looking OUT
    # without it): quantize's own folder takes no file it did not write, so it quantizes into a folder of OUT's name
    # (its model card's title) in the one whole_folder renames to OUT, whose files then move up beside the log
    with tempfile.TemporaryDirectory() as tmp, whole_folder(out) as staged:
        tuned, quantized = Path(tmp) / "bf16", staged / out.name
        write_checkpoint(tuned, json.loads((source / CONFIG_FILE).read_text()), canonical_state(student), source)
        result = quantize(tuned, quantized, **layout, device="cpu", progress=False)
        # its card named the tuned folder, a temporary gone once the run ends, as the source
        (quantized / MODEL_CARD_FILE).write_text(distilled_card(out.name, source, policy, result))
        for entry in quantized.iterdir():
            entry.rename(staged / entry.name)
        quantized.rmdir()
        record = {"kept_step": best[1], "kept_validation_kl": best[0], "steps_run": step,
                  "seconds": time.perf_counter() - started, "device": str(device),
                  "settings": {**layout, "recipe": None if recipe is None else str(recipe), "steps": steps,
                               "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup, "seed": seed,
                               "scale_gradient": scale_gradient, "time_budget_s": time_budget_s,
                               "kda": "fla" if fla else "torch", "hidden_weight": hidden_weight,
                               "generated_windows": generated_windows,
                               "generated_share": generated_share if generated_windows else None,
                               "generated_seconds": generated_s,
                               "generated_file": None if generated_file is None else str(generated_file),
                               "validation_tokens": len(data["validation"])}, **history}
        write_log(staged, record)
    log(f"kept step {best[1]} (validation KL {best[0]:.4f}); quantized into {out}")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=script_summary(__file__))
    p.add_argument("out", type=Path, help="Output folder: the quantized model (compressed-tensors).")
    p.add_argument("--model", type=Path, default=BUNDLED_DIR, help="The bf16 folder (default: the bundled model).")
    p.add_argument("--bits", type=int, default=None, help="The default policy at these bits [default: 4].")
    p.add_argument("--group-size", type=int, default=None, help="[default: 128]")
    p.add_argument("--asym", dest="symmetric", action="store_const", const=False, default=None)
    p.add_argument("--recipe", type=Path, default=None, help="A recipe's policy instead of the default one.")
    p.add_argument("--steps", type=positive_int, default=800)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--lr", type=positive_float, default=5e-5, help="Peak learning rate (Adam), cosine to zero.")
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="Stop tuning after this many seconds even before --steps (the schedule follows it).")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--scale-gradient", action="store_true",
                   help="Pass the gradient through each group's scale too (LSQ's), to the weights that set it.")
    p.add_argument("--generated-windows", type=int, default=0,
                   help="Sample this many windows of the bf16 model's own text before tuning [default: none].")
    p.add_argument("--generated-share", type=float, default=0.5,
                   help="The share of each batch drawn from them [default: 0.5].")
    p.add_argument("--generated-file", type=Path, default=None,
                   help="Keep the sampled windows here: read when it exists, else sampled and saved for next time.")
    p.add_argument("--hidden-weight", type=float, default=HIDDEN_WEIGHT,
                   help=f"Also hold each block's output to the bf16 model's, at this weight; 0: the KL alone "
                        f"[default: {HIDDEN_WEIGHT:g}].")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="[default: cuda if present].")
    a = p.parse_args()
    try:
        distill(a.out, a.model, a.bits, a.group_size, a.symmetric, a.recipe, a.steps, a.batch, a.seq_len, a.lr,
                eval_every=a.eval_every, seed=a.seed,
                scale_gradient=a.scale_gradient, time_budget_s=a.time_budget_s,
                generated_windows=a.generated_windows, generated_share=a.generated_share,
                generated_file=a.generated_file, hidden_weight=a.hidden_weight, device=a.device)
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    run_tool(main)
