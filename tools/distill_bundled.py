"""Quantization-aware distillation of the bundled model: the weights a klconvert policy quantizes are tuned end to
end, through their round trip, so that the quantized model's next-token distribution follows the bf16 model's.

The student is runtime/model.py's training-mode KimiLinear filled from the bf16 folder; every weight the policy
quantizes (by its canonical name: experts, shared expert, dense MLP, KDA and MLA projections, lm_head) is seen
through the policy's own round trip (quant/groupwise.py's quantize_groupwise then dequantize_groupwise of the weight
rounded to bf16, as `klconvert quantize` and the runtime do), the gradient passing straight through the rounding.
The loss is KL(bf16 model || student) per token on random windows of the training split; only the quantized
weights move (norms, routers and their correction biases, embedding, convolutions stay as released). The weights
with the least KL on the validation split are kept, written as a bf16 folder, and quantized by `klconvert
quantize` with the same policy: the folder holds the standard scheme (the same groups, bits and scales rule), only
the codes differ from round-to-nearest of the released weights. The test split stays unseen.

    python tools/distill_bundled.py OUT [--bits 4 [--group-size 128] [--asym] | --recipe recipes/32gb.yaml]
                                        [--steps 800 --batch 32 --seq-len 512 --lr 5e-5] [--device cuda]
    python tools/quality_table.py --folder "int4 g128, distilled=OUT"

On an H200 a step of the defaults takes ~0.65 s (the training-mode forward is PyTorch's, chunked KDA included):
800 steps ~9 min. On a 2-core CPU a step of 4 x 256 tokens takes ~6 s. The learning rate matters most: each step
flips the codes of the weights nearest a rounding boundary, and a step of 2e-4 or more flips too many at once
(README, "Quality").
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bundled import canonical_state, learning_rate, sample_batch, token_splits, write_checkpoint  # noqa: E402

from klconvert.checkpoint.name_map import expected_tensors  # noqa: E402
from klconvert.checkpoint.reader import Checkpoint  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.quant.groupwise import dequantize_groupwise, quantize_groupwise  # noqa: E402
from klconvert.quant.scheme import QuantScheme  # noqa: E402
from klconvert.quantize import choose_policy, quantize  # noqa: E402
from klconvert.runtime import model as M  # noqa: E402
from klconvert.runtime.bind import bind  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402


class RoundTrip(nn.Module):
    """A weight as the quantized folder will hold it: rounded to bf16, quantized and dequantized by `scheme` in
    groups along its last dim (stacked experts: per expert, per row), the gradient passed straight through."""

    def __init__(self, scheme: QuantScheme):
        super().__init__()
        self.scheme = scheme

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        flat = w.detach().to(torch.bfloat16).reshape(-1, w.shape[-1])
        q, scale, zero = quantize_groupwise(flat, s.bits, s.group_size, s.symmetric, observer=s.observer)
        stored = dequantize_groupwise(q, scale, zero).to(w.dtype).view_as(w)
        return w + (stored - w).detach()


def training_model(folder: Path, device: torch.device) -> M.KimiLinear:
    """The folder's model in fp32 with the training-mode forward (the declared modules, a fresh causal pass),
    nothing trainable yet: the teacher as it is, the student once its round trips are attached."""
    checkpoint = Checkpoint(folder)
    return bind(M.KimiLinear(checkpoint.config), checkpoint.get, packed=None, held={}, device=device,
                dtype=torch.float32, triton=False, restack=False).train()


def quantized_parameters(model: M.KimiLinear, policy) -> dict[str, QuantScheme]:
    """{parameter name: the scheme the policy stores all of its checkpoint tensors with} for the parameters it
    quantizes (a stacked expert parameter holds many tensors: they must agree)."""
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


def attach_round_trips(model: M.KimiLinear, schemes: dict[str, QuantScheme]) -> list[nn.Parameter]:
    """Route every quantized parameter through its RoundTrip; returns the latent weights, now trainable."""
    latents = []
    for pname, scheme in schemes.items():
        owner, _, leaf = pname.rpartition(".")
        module = model.get_submodule(owner)
        getattr(module, leaf).requires_grad_(True)
        parametrize.register_parametrization(module, leaf, RoundTrip(scheme))
        latents.append(module.parametrizations[leaf].original)
    return latents


def detach_round_trips(model: M.KimiLinear, schemes: dict[str, QuantScheme]) -> None:
    """Back to plain parameters holding the latent (unrounded) weights."""
    for pname in schemes:
        owner, _, leaf = pname.rpartition(".")
        parametrize.remove_parametrizations(model.get_submodule(owner), leaf, leave_parametrized=False)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position's next-token distribution, [*]."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


@torch.no_grad()
def mean_kl(teacher: M.KimiLinear, student: M.KimiLinear, tokens: torch.Tensor, batch: int, seq_len: int,
            device: torch.device) -> float:
    """Mean per-token KL over the non-overlapping windows of `tokens`."""
    n = len(tokens) // seq_len
    x = tokens[:n * seq_len].view(n, seq_len)
    total = 0.0
    with parametrize.cached():
        for i in range(0, n, batch):
            xb = x[i:i + batch].to(device)
            total += kl_per_token(teacher(xb), student(xb)).sum().item()
    return total / (n * seq_len)


def distill(out: Path, source: Path = BUNDLED_DIR, bits: int | None = None, group_size: int | None = None,
            symmetric: bool | None = None, recipe: Path | None = None, steps: int = 800, batch: int = 32,
            seq_len: int = 512, lr: float = 5e-5, warmup: float = 0.05, eval_every: int = 100,
            validation_tokens: int | None = 16384, max_chars: int | None = None, seed: int = 0,
            device: str | None = None, log=print) -> dict:
    """Tune, keep the least-validation-KL weights, quantize them into `out`; returns the log (also out/distill.json)."""
    if out.exists() or out.is_symlink():  # before the tuning, not after it
        raise KLError(f"{out}: already exists; choose another output folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    layout = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "recipe": recipe}
    policy, _ = choose_policy(**layout)   # klconvert quantize's: the default policy at these options, or the recipe's
    if policy.kind != "int":
        raise KLError(f"{recipe}: distillation tunes integer schemes; this recipe stores {policy.kind}")
    data = token_splits(Tokenizer.from_folder(source), validation_tokens, max_chars)
    teacher = training_model(source, device).eval()
    student = training_model(source, device)
    schemes = quantized_parameters(student, policy)
    latents = attach_round_trips(student, schemes)
    optimizer = torch.optim.Adam(latents, lr=lr)
    g = torch.Generator().manual_seed(seed)
    val = mean_kl(teacher, student, data["validation"], batch, seq_len, device)
    log(f"{len(schemes)} quantized parameters ({sum(p.numel() for p in latents) / 1e6:.2f}M weights) on {device}; "
        f"validation KL before: {val:.4f}")
    history = {"step": [0], "train_kl": [None], "validation_kl": [val]}
    best = (val, 0, [p.detach().clone() for p in latents])
    running, running_n, started = 0.0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate((step - 1) / steps, lr, warmup, 0.0)
        x, _ = sample_batch(data["train"], batch, seq_len, g)
        x = x.to(device)
        with torch.no_grad():
            target = teacher(x)
        with parametrize.cached():  # each round trip once a step, not at every read of its weight
            loss = kl_per_token(target, student(x)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        running, running_n = running + loss.item(), running_n + 1
        if step % eval_every == 0 or step == steps:
            val = mean_kl(teacher, student, data["validation"], batch, seq_len, device)
            history["step"].append(step)
            history["train_kl"].append(running / running_n)
            history["validation_kl"].append(val)
            running, running_n = 0.0, 0
            if val < best[0]:
                best = (val, step, [p.detach().clone() for p in latents])
            log(f"step {step:4d}  train KL {history['train_kl'][-1]:.4f}  validation KL {val:.4f}  "
                f"{time.perf_counter() - started:.0f} s")
    with torch.no_grad():
        for p, kept in zip(latents, best[2]):
            p.copy_(kept)
    detach_round_trips(student, schemes)
    with tempfile.TemporaryDirectory() as tmp:
        tuned = Path(tmp) / "bf16"
        write_checkpoint(tuned, json.loads((source / "config.json").read_text()), canonical_state(student), source)
        quantize(tuned, out, **layout, device="cpu", progress=False)
    record = {"kept_step": best[1], "kept_validation_kl": best[0], "seconds": time.perf_counter() - started,
              "device": str(device), "settings": {**layout, "recipe": None if recipe is None else str(recipe),
                                                   "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
                                                   "warmup": warmup, "seed": seed,
                                                   "validation_tokens": len(data["validation"])}, **history}
    (out / "distill.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"kept step {best[1]} (validation KL {best[0]:.4f}); quantized into {out}")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="Output folder: the quantized model (compressed-tensors).")
    p.add_argument("--model", type=Path, default=BUNDLED_DIR, help="The bf16 folder (default: the bundled model).")
    p.add_argument("--bits", type=int, default=None, help="The default policy at these bits [default: 4].")
    p.add_argument("--group-size", type=int, default=None, help="[default: 128]")
    p.add_argument("--asym", dest="symmetric", action="store_const", const=False, default=None)
    p.add_argument("--recipe", type=Path, default=None, help="A recipe's policy instead of the default one.")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5, help="Peak learning rate (Adam), cosine to zero.")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu [default: cuda if present].")
    a = p.parse_args()
    try:
        distill(a.out, a.model, a.bits, a.group_size, a.symmetric, a.recipe, a.steps, a.batch, a.seq_len, a.lr,
                eval_every=a.eval_every, seed=a.seed, device=a.device)
    except KLError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
