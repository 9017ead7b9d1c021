"""MemoryPlan: every byte the runtime will hold, computed before any work, and its one allocation.

KDA state and conv tails are constant per sequence; only the MLA latent cache grows with the context,
and it is allocated up front for the planned context and batch, never grown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.quant.stored import stored_parts
from klconvert.runtime.cpu_modules import planned_copy_bytes
from klconvert.runtime.host_memory import host_allocation
from klconvert.runtime.kda import CHUNK
from klconvert.runtime.model import MLA_KEY_BLOCK
from klconvert.runtime.state import FP8, StateBuffers
from klconvert.kernels.int_layout import held_bytes   # no Triton: the plan is made on machines without
from klconvert.quant.group_rules import CHANNEL
from klconvert.runtime.weights import HeldPacked, held_in_fp32
from klconvert.units import size_text

if TYPE_CHECKING:
    from klconvert.quant import Policy, QuantScheme

# Prompt tokens run through the model at once. Measured on an H200 (2026-11-29, `python bench/prefill_segment.py`,
# 27 layers, int4, 128K prompt): 2048 -> 7.60 s, 4096 -> 6.20 s, 8192 -> 5.24 s (fewer expansions of each cached key
# block, fuller GEMMs); the workspace it costs stays 1.27 GiB at any context. 16384 with MLA key blocks of 32768
# (runtime/model.py): one MLA layer's attention over a 1M-token prompt 24.5 -> 19.9 s (2026-11-30, `python
# bench/mla_prefill.py`), the workspace then 2.65 GiB (2.80 where a plan holds forward_segments' logit rows:
# all_logits).
PREFILL_SEGMENT = 16384
# Prompts a prefill runs through the model at once: Engine prefills a batch's prompts one at a time, so the batch's
# state and cache grow with the batch and the prefill's workspace does not
PREFILL_ROWS = 1
# Positions whose logits the all-position path (Engine.forward_segments, which eval reads) makes at once: a segment's
# whole [S, vocab] would be 10.7 GB fp32 at 16384 positions of the release's 163,840-word vocabulary, which no plan
# could afford to count; 256 positions' are 168 MB, and the lm_head GEMM of 256 rows is still compute-bound
LOGIT_ROWS = 256
MAX_BATCH = 65_536  # sequences a plan sizes; the 48B's KDA state alone is ~2.9 TB at this many
# the copies of weights fp32 decode on the CPU holds beside them (runtime/cpu_modules.py); bind's other paths, none
DECODE_COPIES = "cpu_decode_copies"
WEIGHT_CATEGORIES = ("embedding", "lm_head", "attention", "kda_small", "experts", "shared_experts", "dense_mlp",
                     "router", "norm", DECODE_COPIES)


@dataclass(frozen=True)
class MemoryPlan:
    config: KimiLinearConfig = field(repr=False)
    batch: int
    context: int
    weight_bytes: dict[str, int]
    act_dtype: torch.dtype = torch.bfloat16
    kda_state_dtype: torch.dtype = torch.float32
    mla_cache_dtype: torch.dtype = torch.bfloat16
    memory_limit: int | None = None  # bytes on the device, if known
    # decode attention on the PyTorch path (the CPU's, kernels="torch"): its scores span the context; False: the
    # Triton kernel's, as a GPU runs it (plan_report.plan_for plans for a GPU)
    torch_decode_attention: bool = False
    # the all-position path's logits (Engine.forward and forward_segments: eval's) counted too, with the segment's last
    # hidden rows of each of the batch's prompts they are made from; False: generate's and prefill's, which make each
    # prompt's last logits alone (Engine checks a forward on such a plan against the room it has when called)
    all_logits: bool = False

    # ---- per-sequence and per-token figures ----------------------------------------------------
    @property
    def kda_state_bytes_per_seq(self) -> int:
        c = self.config
        return len(c.kda_layers) * c.kda_num_heads * c.kda_head_dim * c.kda_head_dim * \
            self.kda_state_dtype.itemsize

    @property
    def conv_bytes_per_seq(self) -> int:
        c = self.config
        return len(c.kda_layers) * 3 * c.kda_dim * (c.conv_kernel_size - 1) * self.act_dtype.itemsize

    @property
    def mla_bytes_per_token(self) -> int:
        """The cached values, plus one fp32 scale per row when the cache is e4m3."""
        c = self.config
        scale = 4 if self.mla_cache_dtype == FP8 else 0
        return len(c.full_attn_layers) * (c.mla_cache_width * self.mla_cache_dtype.itemsize + scale)

    # ---- totals ---------------------------------------------------------------------------------
    @property
    def weights(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def state_bytes(self) -> int:
        return self.batch * (self.kda_state_bytes_per_seq + self.conv_bytes_per_seq)

    @property
    def mla_cache_bytes(self) -> int:
        return self.batch * self.context * self.mla_bytes_per_token

    def workspace_for(self, context: int) -> int:
        """Peak temporaries: one prompt's prefill segment and a decode step of the whole batch, both held at once (on
        CUDA generate captures the step, whose graph keeps its temporaries, before it prefills)."""
        return self.prefill_workspace_for(context) + self.decode_workspace_for(context)

    def prefill_workspace_for(self, context: int) -> int:
        """Peak temporaries of a prefill segment of PREFILL_ROWS prompts: generate's, with the batch's prompts' last
        logits, fp32, twice (generate keeps each prompt's, then joins them), or where the plan holds all_logits and
        more, forward_segments', with the batch's last hidden rows and the rows of logits it handed on last (a caller
        keeps them while the next are made). An estimate from the shapes the code makes; the blocks' temporaries are
        bounded by the segment and MLA's key block, not the context (from one key block on they are the same at any
        context), nor the batch: the engine prefills the batch's prompts PREFILL_ROWS at a time.

        Per segment of S tokens, the blocks' temporaries, and for forward_segments the larger of those and its logits':
        every prompt's last hidden rows of the segment, [batch, S, hidden], held from the first prompt's blocks until
        the segment's logits are made (beside the blocks of the later prompts, where the batch has more than
        PREFILL_ROWS: one prompt's are the blocks' own output), and all positions' logits, logit_rows_for(context) rows
        at a time, beside them: lm_head's in the activations' dtype, then in fp32 (a caller's log-softmax of them,
        eval's, comes once they are handed on, in less).

        The blocks': hidden states and projections, the fp32 q/k/v/gate of a KDA layer, one
        chunk's pairwise decay tensor [B, H, C, C, K] fp32, C = min(64, S) (kda_chunked makes it no larger for a
        shorter segment; counted twice: a prefill's kda_chunked builds it in one tensor and multiplies by k in place,
        training's makes the product anew; the second also for the chunk's other temporaries), or once and four fp32
        states [B, H, K, V] where that is more (a short chunk's): kda_chunked's decayed state, its update and their
        sum, with the previous chunk's; fla-core's chunk_kda makes a chunk's state h and its final state at any length
        (kernels.kda_chunk's temporaries grow with S alone, [B, S, H, 64] its in-chunk products), and MLA's prefill
        (model.PrefillAttention): one key block's rows dequantized and expanded into per-head keys and values,
        the segment's queries, one block's output and the fp32 running output with its merge temporaries.
        """
        c, B = self.config, PREFILL_ROWS
        S, block = min(PREFILL_SEGMENT, context), min(MLA_KEY_BLOCK, context)
        a = self.act_dtype.itemsize
        chunk = min(CHUNK, S)
        decay = B * c.kda_num_heads * max(2 * chunk * chunk, chunk * chunk + 4 * c.kda_head_dim) * c.kda_head_dim * 4
        kda = B * S * c.kda_dim * (3 * a + 6 * 4) + decay
        H, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        rows = B * block * c.mla_cache_width * (a + (4 if self.mla_cache_dtype == FP8 else 0))
        expanded = B * block * H * ((dn + dv) + (dn + dr)) * a          # kv_b's output, then the keys with the rope key
        queries = B * S * H * ((dn + dr) * a + dv * (a + 4 * 4))         # q, a block's output, fp32 running + merge
        mla = rows + expanded + queries
        blocks = self._hidden_and_ffn(B * S, max(kda, mla))
        generate = blocks + 2 * self.batch * c.vocab_size * 4
        if not self.all_logits:
            return generate
        hidden = self.batch * S * c.hidden_size * a
        beside_blocks = hidden if self.batch > B else 0
        logit_values = self.logit_rows_for(context) * c.vocab_size
        # .float() of fp32 logits is the same tensor
        made = hidden + logit_values * (4 + (a if self.act_dtype != torch.float32 else 0))
        return max(generate, max(blocks + beside_blocks, made) + logit_values * 4)

    def logit_rows_for(self, context: int) -> int:
        """Rows (positions times sequences) of logits the all-position path (Engine.forward_segments) makes at once:
        LOGIT_ROWS, no more than the batch's segments hold, or one position of each sequence of a larger batch."""
        return max(self.batch, min(LOGIT_ROWS, self.batch * min(PREFILL_SEGMENT, context)))

    def decode_workspace_for(self, context: int) -> int:
        """Peak temporaries of a decode step of the whole batch (one token a sequence) and the logits it samples
        from, an estimate from the shapes model.decode makes: hidden states, a KDA layer's projections and fp32 q/k/v/
        gate with one fp32 state [B, H, K, V] (kda_step's update; the state itself changes in place), or MLA's
        absorbed queries and outputs, with, on the PyTorch path (torch_decode_attention), each sequence's fp32 scores
        over the cached rows (model.LatentAttention: the scores, the masked scores and their softmax, the
        probabilities in the cache's dtype) and an e4m3 cache's rows dequantized -- the Triton kernel's per-split
        partials are a few MB at any context; and its logits, lm_head's in the activations' dtype, then in fp32, and
        on the Triton path, which CUDA captures in a graph, the fp32 buffer outside the graphs' pool that every
        captured step copies them into (decode_step.GraphMemory)."""
        c, B = self.config, self.batch
        a = self.act_dtype.itemsize
        kda = B * c.kda_dim * (3 * a + 6 * 4) + B * c.kda_num_heads * c.kda_head_dim * c.kda_head_dim * 4
        H, dn, dr, dv, r = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                            c.kv_lora_rank)
        mla = B * H * (dn + dr + 2 * r + dv) * a                         # q, q_lat, o_lat, o
        if self.torch_decode_attention:
            mla += B * context * H * (3 * 4 + a)
            if self.mla_cache_dtype == FP8:
                mla += B * context * c.mla_cache_width * (4 + a)
        logits = a + 4 + (0 if self.torch_decode_attention else 4)
        return self._hidden_and_ffn(B, max(kda, mla)) + B * c.vocab_size * logits

    def _hidden_and_ffn(self, tokens: int, mixer: int) -> int:
        """Temporaries of `tokens` tokens through a block: six hidden rows, and the larger of the mixer's (`mixer`)
        and the feed-forward's (the dense MLP's, or the routed experts' gate and up rows of every expert a token
        picks)."""
        c, a = self.config, self.act_dtype.itemsize
        ffn = tokens * max(2 * c.intermediate_size, 2 * c.moe_intermediate_size * c.num_experts_per_token) * a
        return tokens * c.hidden_size * a * 6 + max(mixer, ffn)

    @property
    def workspace(self) -> int:
        return self.workspace_for(self.context)

    def total_for(self, context: int) -> int:
        return (self.weights + self.state_bytes + self.batch * context * self.mla_bytes_per_token
                + self.workspace_for(context))

    @property
    def total(self) -> int:
        return self.total_for(self.context)

    @property
    def headroom(self) -> int | None:
        return None if self.memory_limit is None else self.memory_limit - self.total

    def largest_context(self) -> int | None:
        """The largest context that fits the memory limit: a multiple of 64 (capped at model_max_length), or where
        none fits the largest under 64 that does (a large batch's: a context of 1 was all a refusal named, where 40
        fitted); 0 where no context fits."""
        if self.memory_limit is None:
            return None
        chunks = self._largest_fitting(self.config.model_max_length // CHUNK, CHUNK)
        return chunks * CHUNK if chunks else self._largest_fitting(min(CHUNK - 1, self.config.model_max_length), 1)

    def _largest_fitting(self, most: int, step: int) -> int:
        """The largest n in 0 .. most whose context n * step fits the memory limit (0 where none does)."""
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.total_for(mid * step) <= self.memory_limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def allocate(self, device: torch.device | str) -> StateBuffers:
        """The one allocation the runtime makes for state; nothing grows after this. The CPU allocator's refusal is
        HostMemoryExhausted (a MemoryError)."""
        what = f"the memory plan's state and MLA cache ({size_text(self.state_bytes + self.mla_cache_bytes)})"
        with host_allocation(what):
            return self._allocate(device)

    def _allocate(self, device: torch.device | str) -> StateBuffers:
        c, B = self.config, self.batch
        n_kda, n_mla = len(c.kda_layers), len(c.full_attn_layers)
        return StateBuffers(
            kda_state=torch.zeros(n_kda, B, c.kda_num_heads, c.kda_head_dim, c.kda_head_dim,
                                  dtype=self.kda_state_dtype, device=device),
            conv_state=torch.zeros(n_kda, B, 3 * c.kda_dim, c.conv_kernel_size - 1, dtype=self.act_dtype,
                                   device=device),
            mla_cache=torch.zeros(n_mla, B, self.context, c.mla_cache_width, dtype=self.mla_cache_dtype,
                                  device=device),
            mla_scale=torch.ones(n_mla, B, self.context, dtype=torch.float32, device=device)
            if self.mla_cache_dtype == FP8 else None,
        )


HOST_PARTS = ("weight_shape",)  # metadata read into Python at load, never held on the device


def stored_bytes(shape: tuple[int, ...], scheme: QuantScheme, dtype: torch.dtype) -> int:
    """Bytes of one [out, in] weight stored with `scheme` (scales in `dtype`), summed over the parts the converter
    writes (quant.stored) that stay on the device: not weight_shape, nor bitsandbytes' JSON quant state."""
    return sum(math.prod(s) * d.itemsize for part, d, s in stored_parts(shape, dtype, scheme)
               if part not in HOST_PARTS)


def held_packed_bytes(shape: tuple[int, int], scheme: QuantScheme, scale_dtype: torch.dtype) -> int:
    """Bytes of one [out, in] weight that bind keeps packed for the Triton kernels (scales in `scale_dtype`): as the
    repack holds it (int_layout.held_bytes), its rows padded to whole blocks and zero points as wide as the scales:
    more than it is stored (the 48B at int4 g128 asymmetric: 565,956,288 bytes more)."""
    rows, cols = shape
    return held_bytes(rows, cols, scheme.bits, cols if scheme.group_size == CHANNEL else scheme.group_size,
                      not scheme.symmetric, scale_dtype)


def weight_bytes(config: KimiLinearConfig, dtype: torch.dtype, policy: Policy | HeldPacked | None = None,
                 decode_copies: bool = False) -> dict[str, int]:
    """Bytes of weights by category as the runtime holds them: each tensor as `policy.scheme_for` stores
    it (scales in `dtype`) -- a HeldPacked policy's as the Triton kernels hold them (held_packed_bytes, scales as
    stored where it knows) --, fp32 where the runtime keeps fp32, `dtype` otherwise. No policy: unquantized.
    `decode_copies`: bind gives the CPU forms (bind.cpu_forms_bound), whose copies are foreseen too."""
    out = dict.fromkeys(WEIGHT_CATEGORIES, 0)
    if decode_copies:
        out[DECODE_COPIES] = planned_copy_bytes(config)
    for spec in expected_tensors(config).values():
        scheme = policy.scheme_for(spec.name, spec.shape) if policy is not None else None
        if scheme is not None:
            size = held_packed_bytes(spec.shape, scheme, policy.scale_dtypes.get(spec.name, dtype)) \
                if isinstance(policy, HeldPacked) else stored_bytes(spec.shape, scheme, dtype)
        elif held_in_fp32(spec.name, spec.category):
            size = math.prod(spec.shape) * 4
        else:
            size = math.prod(spec.shape) * dtype.itemsize
        out[spec.category] += size
    return out
