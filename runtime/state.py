"""StateBuffers: the memory plan's one allocation -- KDA recurrent state, conv tails, the MLA latent cache -- and
the only ways the model reads and writes it (per sequence, by position, fp8 rows quantized on the way in)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from klconvert.kernels.naive_mla import quantize_mla_cache_rows

FP8 = torch.float8_e4m3fn
MLA_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": FP8}  # the latent cache's dtypes, by name


def cache_rows(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cached MLA rows [..., W] in dtype: e4m3 values times their per-row fp32 scale [...], else a cast."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale[..., None]).to(dtype)


@dataclass
class StateBuffers:
    """Per-sequence recurrent state and the MLA latent cache, allocated once for the planned batch and context."""

    kda_state: torch.Tensor   # [n_kda, B, H, K, V]
    conv_state: torch.Tensor  # [n_kda, B, 3*H*K, W-1]: the last W-1 projected inputs
    mla_cache: torch.Tensor   # [n_mla, B, context, kv_lora_rank + qk_rope_head_dim], bf16/fp32 or e4m3
    mla_scale: torch.Tensor | None = None  # [n_mla, B, context] fp32 when the cache is e4m3, else None

    @property
    def batch(self) -> int:
        return self.kda_state.shape[1]

    @property
    def context(self) -> int:
        return self.mla_cache.shape[2]

    def rows(self, start: int, stop: int) -> "StateBuffers":
        """Views of sequences start..stop-1 (prefill runs each prompt on its own rows)."""
        sl = slice(start, stop)
        return replace(self, kda_state=self.kda_state[:, sl], conv_state=self.conv_state[:, sl],
                       mla_cache=self.mla_cache[:, sl],
                       mla_scale=None if self.mla_scale is None else self.mla_scale[:, sl])

    def upto(self, n: int) -> "StateBuffers":
        """Views of the cache's first n positions of every sequence (the recurrent state whole)."""
        return replace(self, mla_cache=self.mla_cache[:, :, :n],
                       mla_scale=None if self.mla_scale is None else self.mla_scale[:, :, :n])

    def reset(self) -> None:
        """Start new sequences: recurrent state and conv tails to zero (the cache is overwritten as it fills)."""
        self.kda_state.zero_()
        self.conv_state.zero_()

    def mla_scale_of(self, slot: int) -> torch.Tensor | None:
        return None if self.mla_scale is None else self.mla_scale[slot]

    def write_mla(self, slot: int, positions: slice, rows: torch.Tensor) -> None:
        """rows [B, T, W] into positions (a slice) of every sequence."""
        if self.mla_scale is None:
            self.mla_cache[slot][:, positions] = rows.to(self.mla_cache.dtype)
        else:
            self.mla_cache[slot][:, positions], self.mla_scale[slot][:, positions] = quantize_mla_cache_rows(rows)

    def write_mla_at(self, slot: int, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [B, W], sequence b's at positions[b] (a device tensor: no host sync)."""
        b = torch.arange(rows.shape[0], device=rows.device)
        if self.mla_scale is None:
            self.mla_cache[slot].index_put_((b, positions), rows.to(self.mla_cache.dtype))
        else:
            values, scale = quantize_mla_cache_rows(rows)
            self.mla_cache[slot].index_put_((b, positions), values)
            self.mla_scale[slot].index_put_((b, positions), scale)
