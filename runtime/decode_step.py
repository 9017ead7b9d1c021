"""The decode step -- the seam that matters most. One token per sequence at its own position, against state the
plan allocated once: every shape is fixed, nothing waits on the host, so on CUDA the step is captured once per
batch size in a CUDA graph and replayed; elsewhere it runs eagerly, the same code."""
from __future__ import annotations

import torch

from klconvert.runtime.model import Experts, KimiLinear
from klconvert.runtime.state import StateBuffers

WARMUP_STEPS = 2  # eager runs on a side stream before capture: Triton compiles, cuBLAS picks its kernels


def autocast_off(device: torch.device) -> torch.autocast:
    """The caller's torch.autocast switched off on `device`'s type while the engine runs the model, which runs in the
    dtype it was loaded in: inside an app's autocast(cpu, bfloat16) its products ran in bf16 and its tokens differed."""
    return torch.autocast(device.type, enabled=False)


def capturable(model: KimiLinear, batch: int) -> bool:
    """Whether the decode step of `batch` sequences can be captured: the reference expert loop (model.Experts)
    asks the host which experts were chosen, so a model still holding it (dense or unfusable experts) decodes
    eagerly; dense experts bind adopted as DeviceExperts do not ask up to their token limit."""
    return all(m.on_device(batch) for m in model.modules() if isinstance(m, Experts))


class GraphMemory:
    """The CUDA-graph memory pool, the warm-up stream and the logits buffer every decode step of one plan (of `rows`
    sequences) captures with. The steps replay one at a time on one stream, and each copies its logits out of the
    pool into its rows of the one buffer, so their scratch can be the same memory: a program decoding at batch 1, 2,
    ..., 16 held sixteen pools and sixteen warm-up streams' cached blocks (each pool a segment of its own), where the
    plan counts one step's workspace. The copy is what makes the sharing safe: logits allocated inside a capture can
    lie in the scratch a step captured before writes (torch's rule for a shared pool: replay in the order captured).
    One buffer for every batch size, as the plan counts one: a copy a step, kept, held 89 MB at batch 1..16 of the
    48B's vocabulary where the plan counts 10.5 (h295). So a step's logits hold until the next step of any batch
    size, as the state's rows, which every step decodes from, do."""

    def __init__(self, rows: int):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.rows = rows
        self._logits: torch.Tensor | None = None

    def logits_like(self, made: torch.Tensor) -> torch.Tensor:
        """The buffer's first rows for a step's logits shaped as `made` [B, vocab] (its warm-up's), the buffer made
        with the first step captured."""
        if self._logits is None:
            self._logits = torch.empty(self.rows, *made.shape[1:], dtype=made.dtype, device=made.device)
        return self._logits[:made.shape[0]]


class DecodeStep:
    """`step()` runs model.decode(tokens, positions) on the static buffers below and returns `logits` (the same
    tensor every call). Callers write the next tokens and positions into `tokens` / `positions` in place. `graph`:
    capture the step with that memory (None: run it eagerly), whose logits buffer every captured step writes."""

    def __init__(self, model: KimiLinear, state: StateBuffers, graph: GraphMemory | None):
        B = state.batch
        device = state.kda_state.device
        self.model, self.state = model, state
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph is not None:
            self._capture(graph)

    def eager(self) -> torch.Tensor:
        """The step run eagerly (no graph), on the same buffers."""
        with autocast_off(self.tokens.device):
            return self.model.decode(self.tokens, self.state, self.positions)

    @torch.inference_mode()
    def _capture(self, memory: GraphMemory) -> None:
        """Warm up on the side stream, then record one step into the pool, its logits copied out of it into the
        memory's buffer. The warm-up steps write garbage into the state; the engine resets the state (and overwrites
        the cache rows) before any real sequence uses it."""
        memory.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(memory.stream):
            for _ in range(WARMUP_STEPS):
                logits = self.eager()
        torch.cuda.current_stream().wait_stream(memory.stream)
        self.logits = memory.logits_like(logits)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=memory.pool):
            self.logits.copy_(self.eager())
        self.state.reset()

    def _used_rows(self) -> StateBuffers:
        """The state an eager step attends over. Off CUDA the host reads the positions for nothing, so the cache
        is viewed up to the furthest one: a step costs the tokens so far, not the planned context (the bundled model
        on a 2-core CPU decoded 2.4 tokens/s planned for 1,000,000 tokens when it read them all, 192 now)."""
        if self.state.kda_state.device.type == "cuda":
            return self.state
        return self.state.upto(int(self.positions.max()) + 1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        if self.graph is None:
            with autocast_off(self.tokens.device):
                self.logits = self.model.decode(self.tokens, self._used_rows(), self.positions)
        else:
            self.graph.replay()
        return self.logits
