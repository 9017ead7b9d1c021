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
    """The CUDA-graph memory pool and the warm-up stream every decode step of one plan captures with. The steps
    replay one at a time on one stream, and each copies its logits out of the pool into a buffer of its own, so their
    scratch can be the same memory: a program decoding at batch 1, 2, ..., 16 held sixteen pools and sixteen warm-up
    streams' cached blocks (each pool a segment of its own), where the plan counts one step's workspace. The copy is
    what makes the sharing safe: logits allocated inside a capture can lie in the scratch an earlier step's replay
    writes (torch's rule for a shared pool: replay in the order captured, which an API user holding one step's logits
    across another's step does not)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()


class DecodeStep:
    """`step()` runs model.decode(tokens, positions) on the static buffers below and returns `logits` (the same
    tensor every call). Callers write the next tokens and positions into `tokens` / `positions` in place. `graph`:
    capture the step with that memory (None: run it eagerly)."""

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
        """Warm up on the side stream, then record one step into the pool, its logits copied out of it. The warm-up
        steps write garbage into the state; the engine resets the state (and overwrites the cache rows) before any
        real sequence uses it."""
        memory.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(memory.stream):
            for _ in range(WARMUP_STEPS):
                logits = self.eager()
        torch.cuda.current_stream().wait_stream(memory.stream)
        self.logits = torch.empty_like(logits)
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
