"""Choose the next token from logits on the device, with no host sync: greedy, or temperature with nucleus
(top-p) filtering, drawn by the exponential race (argmax p / E, E ~ Exp(1)), which samples p exactly."""
from __future__ import annotations

import math
import numbers

import torch

from klconvert.errors import KLError


def check_generate_args(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """KLError unless max_new_tokens is a whole number >= 0, temperature finite and >= 0, 0 < top_p <= 1 and the
    seed None or one torch.Generator takes (the CLI's flags hold them so; the Python API is held here: a NaN
    temperature sampled token 0 on every step, -1 new tokens returned none, 1.5 was a TypeError)."""
    if not (isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)
            and max_new_tokens >= 0):
        raise KLError(f"max_new_tokens {max_new_tokens!r} should be a whole number >= 0 (0 only prefills)")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature)
            and temperature >= 0):
        raise KLError(f"temperature {temperature!r} should be a finite number >= 0 (0 is greedy)")
    if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):   # NaN fails too
        raise KLError(f"top_p {top_p!r} should be in (0, 1] (1 keeps every token)")
    if seed is not None:
        try:
            torch.Generator().manual_seed(seed)
        except (RuntimeError, ValueError, TypeError):
            raise KLError(f"seed {seed!r} should be a whole number torch.Generator takes, 0 .. 2**64 - 1") from None


def sampling_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of the call's own: seeded with `seed`, or (None) from the OS -- never by torch.seed(), which
    reseeds torch's global generator under a caller who seeded it."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # Shifted so the top logit is 0 before dividing: a tiny temperature then sends every other logit to -inf (and
    # 0 / T, with T underflowing to 0 in fp32, is kept 0, not NaN), so the draw tends to greedy, never to NaN.
    shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(shifted < 0, shifted / temperature, 0.0), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        drop[..., 0] = False  # a top_p under fp32's least value compares as 0, which the first token's 0 reaches
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
