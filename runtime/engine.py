"""Engine: a loaded model with its memory plan -- whole-sequence prefill, one-token decode, sampling."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import Checkpoint
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.quant import QuantScheme
from klconvert.runtime.memory_plan import PREFILL_SEGMENT, MemoryPlan, weight_bytes
from klconvert.runtime.model import KimiLinear
from klconvert.runtime.sampling import sample
from klconvert.runtime.weights import HeldPacked, Packed, WeightLoader, kernel_takes, use_triton


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes from prefill; the rest from decode steps
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds and self.new_tokens > 1 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """A model on one device, with state buffers allocated once by its MemoryPlan."""

    def __init__(self, config: KimiLinearConfig, read: Callable[[str], torch.Tensor], device: torch.device,
                 dtype: torch.dtype, context: int, batch: int, biased_router_weights: bool = False,
                 packed: Packed | None = None, kernels: str = "torch",
                 stored_schemes: dict[str, QuantScheme] | None = None):
        """`read(name)` gives a canonical tensor (e.g. Checkpoint.get), `packed(name)` a quantized weight's stored
        parts (Checkpoint.packed) and `stored_schemes` how each packed weight is stored, so the plan can size
        the ones that stay packed; `kernels` picks PyTorch or Triton (auto: Triton on CUDA)."""
        self.config, self.device, self.dtype = config, device, dtype
        self.triton = use_triton(kernels, device)
        shapes = expected_tensors(config)
        held = {n: s for n, s in (stored_schemes or {}).items()
                if self.triton and kernel_takes(s, shapes[n].shape[1])}  # the rest is dequantized at load
        if context > self.config.model_max_length:
            raise KLError(f"--max-context {context} is over the model's model_max_length "
                          f"{self.config.model_max_length}; lower it")
        limit = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.plan = MemoryPlan(self.config, batch=batch, context=context,
                               weight_bytes=weight_bytes(self.config, dtype, HeldPacked(held)),
                               act_dtype=dtype, mla_cache_dtype=dtype, memory_limit=limit)
        if limit is not None and self.plan.total > limit:
            fit = self.plan.largest_context()
            raise KLError(f"the plan needs {self.plan.total / 2**30:.1f} GiB but {device} has {limit / 2**30:.1f} GiB; "
                          + (f"lower --max-context to {fit} or less" if fit else
                             "the weights alone do not fit: use a quantized model (klconvert quantize --bits 4)"))

        weights = WeightLoader(read, packed, device, dtype, self.triton)
        self.model = KimiLinear(self.config, weights, biased_router_weights=biased_router_weights)
        self.state = self.plan.allocate(device)
        self.stats = GenerationStats()

    # ---- checks ----------------------------------------------------------------------------------
    def _as_batch(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise KLError(f"input_ids must be [T] or [B, T] with T >= 1, got shape {list(ids.shape)}")
        if ids.shape[0] > self.plan.batch:
            raise KLError(f"batch {ids.shape[0]} is over the planned batch {self.plan.batch}; load with batch="
                          f"{ids.shape[0]} (--batch)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise KLError(f"token id {int(ids.max()) if int(ids.max()) >= 0 else int(ids.min())} is outside the "
                          f"vocabulary (0..{self.config.vocab_size - 1})")
        return ids.to(self.device)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse up front a request that would run past the planned context."""
        need = prompt_tokens + max_new_tokens
        if need > self.plan.context:
            raise KLError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} needs a "
                          f"context of {need} tokens but the memory plan holds {self.plan.context}; raise "
                          f"--max-context to {need} or more, or shorten the prompt")

    # ---- the two paths -----------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Run the prompt through fresh state, segment by segment; logits for every token or the last."""
        self.state.reset()
        out = []
        for start in range(0, ids.shape[1], PREFILL_SEGMENT):
            seg = ids[:, start:start + PREFILL_SEGMENT]
            last = start + seg.shape[1] == ids.shape[1]
            if all_logits or last:
                out.append(self.model(seg, self.state, start, last_only=not all_logits))
            else:
                self.model(seg, self.state, start, last_only=True)
        return torch.cat(out, dim=1)

    def forward(self, input_ids) -> torch.Tensor:
        """The prefill path over a whole sequence: input_ids [B, T] -> logits [B, T, vocab] fp32."""
        ids = self._as_batch(input_ids)
        self.check_fits(ids.shape[1], 0)
        return self._prefill(ids, all_logits=True)

    def decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """The one-token path: token [B, 1] at `position` -> logits [B, vocab]. Shapes never change."""
        return self.model(token, self.state, position, decode=True)[:, -1]

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids: frozenset[int] = frozenset(),
                 on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prefill, then decode up to `max_new_tokens`; returns the new ids [B, n] (n <= max_new_tokens).

        A sequence that emits a stop id is padded with that id; generation ends when all have stopped.
        `on_token` receives each new id of sequence 0 as it is made (for streaming).
        """
        ids = self._as_batch(input_ids)
        B, T = ids.shape
        self.check_fits(T, max_new_tokens)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        self.stats = GenerationStats(prompt_tokens=B * T)
        if max_new_tokens <= 0:
            return ids.new_empty(B, 0)

        t0 = time.perf_counter()
        logits = self._prefill(ids, all_logits=False)[:, -1]
        token = sample(logits, temperature, top_p, generator)                  # [B]
        _sync(self.device)
        t1 = time.perf_counter()
        self.stats.prefill_seconds = t1 - t0
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        done = torch.isin(token, stop)
        out = [token]
        if on_token:
            on_token(int(token[0]))
        for step in range(1, max_new_tokens):
            if bool(done.all()):
                break
            logits = self.decode_step(out[-1].unsqueeze(1), T + step - 1)
            token = torch.where(done, out[-1], sample(logits, temperature, top_p, generator))
            if on_token and not bool(done[0]):
                on_token(int(token[0]))
            done |= torch.isin(token, stop)
            out.append(token)
        _sync(self.device)
        self.stats.decode_seconds = time.perf_counter() - t1
        self.stats.new_tokens = len(out)
        return torch.stack(out, dim=1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         max_context: int = 4096, batch: int = 1, biased_router_weights: bool = False,
         kernels: str = "auto") -> Engine:
    """Open, check and load a Kimi Linear checkpoint folder; allocate its memory plan once.

    kernels: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch"."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KLError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise KLError(f"--dtype {dtype}: choose float32 or bfloat16")
        dtype = names[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if max_context < 1 or batch < 1:
        raise KLError(f"--max-context ({max_context}) and --batch ({batch}) must be at least 1")
    checkpoint = Checkpoint(path)
    schemes = {n: s.scheme for n, s in checkpoint.sources.items() if isinstance(s, QuantizedSource)}
    return Engine(checkpoint.config, checkpoint.get, device, dtype, max_context, batch, biased_router_weights,
                  packed=checkpoint.packed, kernels=kernels, stored_schemes=schemes)
