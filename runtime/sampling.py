"""Choose the next token from logits on the device, with no host sync: greedy, or temperature with nucleus
(top-p) filtering, drawn by the exponential race (argmax p / E, E ~ Exp(1)), which samples p exactly."""
from __future__ import annotations

import math

import torch

from klconvert.errors import KLError, shown
from klconvert.scalars import as_number


# top_p's relative slack (four fp32 ulps): each fp32 probability is off by an ulp or two of itself, so a sum of them
# by as much of the sum
TOP_P_SLACK = 2.0 ** -21
SEEDS = 2**64  # a seed is 0 .. SEEDS - 1: what torch.Generator.manual_seed takes (it wraps -1 round to 2**64 - 1)


def check_generate_args(max_new_tokens, temperature, top_p, seed) -> tuple[int, float, float, int | None]:
    """max_new_tokens, temperature, top_p and seed as Python numbers (as_number: numpy and torch scalars taken); KLError
    unless max_new_tokens is a whole number >= 0, temperature finite and >= 0, 0 < top_p <= 1 and the seed None or a
    whole number 0 .. 2**64 - 1 (the CLI's flags hold them so; the Python API is held here: a NaN temperature sampled
    token 0 on every step, -1 new tokens returned none, 1.5 was a TypeError, seed -1 drew as 2**64 - 1)."""
    new_tokens = as_number(max_new_tokens, whole=True)
    if new_tokens is None or new_tokens < 0:
        raise KLError(f"max_new_tokens {shown(max_new_tokens)} should be a whole number >= 0 (0 only prefills)")
    t = as_number(temperature)
    if t is None or not math.isfinite(t) or t < 0:
        raise KLError(f"temperature {shown(temperature)} should be a finite number >= 0 (0 is greedy)")
    p = as_number(top_p)
    if p is None or not 0 < p <= 1:   # NaN fails too
        raise KLError(f"top_p {shown(top_p)} should be in (0, 1] (1 keeps every token)")
    s = None if seed is None else as_number(seed, whole=True)
    if seed is not None and (s is None or not 0 <= s < SEEDS):
        raise KLError(f"seed {shown(seed)} should be a whole number 0 .. 2**64 - 1 (or None for a fresh one)")
    return new_tokens, t, p, s


def sampling_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of the call's own: seeded with `seed`, or (None) from the OS -- never by torch.seed(), which
    reseeds torch's global generator under a caller who seeded it."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:   # int(): as check_generate_args took it, a numpy or torch integer too
        generator.manual_seed(int(seed) if generator.device.type != "cpu" else cpu_seed(int(seed)))
    return generator


def cpu_seed(seed: int) -> int:
    """What a seed of 0 .. 2**64 - 1 seeds torch's CPU generator with. That generator (mt19937) keeps a seed's low 32
    bits alone, so seeds 2**32 apart drew alike (1 and 2**32 + 1: a sweep in such steps repeated itself); the high
    half, scrambled by murmur3's 32-bit finalizer (a bijection taking 0 to 0), is folded into the low one. A seed
    below 2**32 is taken as it is. CUDA's generator (Philox) keeps all 64 bits."""
    h = seed >> 32
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ h >> shift) * multiplier) & 0xFFFFFFFF
    return (seed ^ h ^ h >> 16) & 0xFFFFFFFF


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, vocab] -> (token ids [B], finite [B]): temperature 0 is greedy. `finite` is False where a row held
    NaN or +inf, or only -inf (its largest value is not finite); that row's id is then a valid but meaningless one."""
    if temperature <= 0:
        top, token = logits.max(dim=-1)
        return token, top.abs() < math.inf   # NaN compares False; isfinite would be four launches, this two
    # Shifted so the top logit is 0 before dividing: a tiny temperature then sends every other logit to -inf (and
    # 0 / T, with T underflowing to 0 in fp32, is kept 0, not NaN), so the draw tends to greedy, never to NaN.
    top = logits.float().amax(dim=-1, keepdim=True)
    shifted = logits.float() - top
    probs = torch.softmax(torch.where(shifted < 0, shifted / temperature, 0.0), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays): the mass before each
        # token summed in float64, reaching top_p within TOP_P_SLACK of it -- softmax's fp32 probabilities of tied
        # logits sum a few ulps under a top_p they reach exactly (25 of 50 at 0.02 each: 0.49999999), which kept
        # one token more
        before = sorted_p.double().cumsum(dim=-1) - sorted_p.double()
        drop = before >= top_p * (1 - TOP_P_SLACK)
        drop[..., 0] = False  # a top_p under fp32's least value compares as 0, which the first token's 0 reaches
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1), top.squeeze(-1).abs() < math.inf
