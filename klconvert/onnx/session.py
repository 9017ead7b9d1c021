"""OnnxEngine: a folder written by `klconvert export-onnx`, run with onnxruntime. Each call feeds the state back
(present -> past, as genai_config.json maps them); prompts prefill through the same graph that decodes; generation
shares the runtime engine's sampling, stop handling, statistics and hold on the engine (runtime/engine.py Runner)."""
from __future__ import annotations

import functools
import numbers
import os
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError, a_type, first_line, refuse_out_of_descriptors, shown, unreadable_reason
from klconvert.models import resolve_model
from klconvert.checkpoint.folder_files import CONFIG_FILE, GENAI_CONFIG, refuse_link_out
from klconvert.checkpoint.regular_file import open_regular, read_json
from klconvert.onnx import refuse_export_under_way
from klconvert.onnx.export_folder import (ATTENTION_KEY_BLOCK, DATA_FILE, KEY_BLOCK_GRAPH, LOGITS_SHAPE,
                                         LOGITS_TO_KEEP, ONNX_FILE, state_spec)
from klconvert.onnx.interruptible import interruptible
from klconvert.onnx.subgraphs import subgraph_names
from klconvert.runtime.engine import (GenerationStats, Runner, as_batch, as_prompts, as_stop_ids, check_callbacks,
                                      no_new_ids, whole_numbers)
from klconvert.runtime.host_memory import exhausted, host_memory
from klconvert.runtime.sampling import check_generate_args, sampling_generator
from klconvert.scalars import as_number
from klconvert.tokenizer import check_tokenizer_if_any, model_stop_ids
from klconvert.units import counted, size_text

State = dict[str, np.ndarray]  # past input name -> value
MAX_GENAI_CONFIG_BYTES = 1 << 20  # export-onnx writes a few KB
# JSON's names for the values that parse into these types (the rest are numbers): a line says which a file held
JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
# onnxruntime's log severity (0 verbose, 1 info, 2 warning, 3 error, 4 fatal) for loading and running: a graph's
# warnings are no line of a run's output, and a failure is one KLError line, not onnxruntime's log line besides
ORT_FATAL_ONLY = 4
# What onnxruntime's messages wrap their reason in: "[ONNXRuntimeError] : 1 : FAIL : ", its C++ source position
# ("bfc_arena.cc:376 ") and the C++ function it failed in ("void* onnxruntime::BFCArena::AllocateRawInternal(size_t,
# bool) "), each of which may come alone
ORT_WRAPPING = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : |\S+\.(?:cc|h):\d+ |(?:\S+ )?\w+(?:::\w+)+\([^()]*\) ")
GRAPH_INPUTS = ("input_ids", "position")  # what every export takes besides the state (and LOGITS_TO_KEEP)
# A prompt prefills in calls of as many tokens as keep one MLA layer's fp32 scores [batch, heads, tokens, keys] under
# this, keys being the cached rows the graph attends at once (genai_config.json's attention_key_block): onnxruntime
# writes that tensor out a few times over. With export-onnx's 1,024-row blocks: 4,096 tokens a call of the bundled
# model (4 heads), 512 of the release (32). An export from before key blocks attends every cached row at once, so its
# calls shrink as the prompt grows (one call of 24,000 tokens of the bundled model took over 18 GB).
SCORE_BYTES = 64 << 20
# The key block of every export written before graphs recorded theirs (ATTENTION_KEY_BLOCK in their metadata)
EARLIER_KEY_BLOCK = 1024
# The most intra-op threads OnnxEngine asks onnxruntime for: above the logical CPUs of the largest machines (a
# two-socket server of 192-core CPUs with SMT has 768), so no machine's count is refused, while onnxruntime starts
# every thread up front -- 1024 took 39 s to start on 2 cores, 10**6 hung taking ~7 GB.
MAX_THREADS = 1024
# onnxruntime's CPU allocations share one arena per process, capped at this share of what the host leaves when the
# first export loads (host_memory): a graph that asks for more -- a damaged one asked 6 GB more at each step until the
# kernel killed the process at 24 GB -- then fails that allocation, which run names in one line
ARENA_SHARE = 0.9
ARENA_EXTEND_AS_REQUESTED = 1   # OrtArenaCfg's arena_extend_strategy kSameAsRequested: no power-of-two overshoot
# The run option that hands the CPU arena's wholly free regions back to the system when a run ends. Each prefill call
# (and decode step) attends to more cached keys than the last, so asks for larger blocks than any region it freed, and
# the arena, which never reused nor shrank those, grew with the sum of all calls': a 16,784-token prompt of the
# bundled model peaked at 7.0 GB, one of 33,567 ran out of the 19 GB cap (before the key blocks, whose scores are the
# same size at any context). Now what grows is the latent cache each run returns, a step's or call's rows longer than
# the last's: bundled int4, one thread, 2026-12-07, 800 new tokens of a 17-token prompt peak 46 MB over their start
# where they took 811, 4,500 tokens in calls of 64 (the release's 512 a call are as many for a prompt eight times as
# long) 56 MB where they took 250; a prompt of 16,784 in this SCORE_BYTES's 4,096-token calls 449 MB where it took 483
# (and kept 165 MB after it, not 483) -- tests/test_onnx_export.py's long-prompt and decode peak tests fail without it.
ARENA_SHRINKAGE = ("memory.enable_memory_arena_shrinkage", "cpu:0")


def _reason(error: Exception) -> str:
    """onnxruntime's reason for `error`, without its wrapping (the innermost message of the nested ones it quotes),
    cut to 200 characters."""
    parts = [part.strip() for part in ORT_WRAPPING.split(first_line(error)) if part and part.strip()]
    return (parts[-1] if parts else first_line(error))[:200]


def _out_of_memory(error: Exception) -> bool:
    """Whether onnxruntime's error is an allocation it could not make (its BFCArena's "Failed to allocate memory" and,
    past its cap, "Available memory of ... is smaller than requested bytes", std::bad_alloc): the whole message is
    read, the words can lie past the first line's cut (at 245 characters)."""
    return any(word in str(error).lower() for word in ("allocate", "bad_alloc", "available memory of"))


@functools.cache
def process_arena_cap() -> int | None:
    """The bytes onnxruntime's shared CPU arena may hold: ARENA_SHARE of what the host leaves, registered on the first
    call, once per process (onnxruntime refuses a second). None where the host's memory is unknown (not Linux) or
    the process already shares an arena registered otherwise: sessions then keep their own."""
    host = host_memory()
    if host is None:
        return None
    cap = max(1, int(host.available * ARENA_SHARE))   # max_mem 0 is onnxruntime's "no limit"
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    arena = ort.OrtArenaCfg({"max_mem": cap, "arena_extend_strategy": ARENA_EXTEND_AS_REQUESTED})
    try:
        ort.create_and_register_allocator(memory, arena)
    except Exception:  # onnxruntime's own Fail: "an allocator for this device has already been registered"
        return None
    return cap


def _shape(spec: dict, batch: int, rows: int) -> list[int]:
    """A state tensor's shape (state_spec's `spec`) for `batch` sequences whose latent caches hold `rows` tokens."""
    return [batch if d == "batch" else rows if d == "past_sequence" else d for d in spec["shape"]]


def _pass_a_state(batch: int) -> str:
    """What to do with a state `run` refuses (of `batch` sequences)."""
    return f"pass the state empty_state({batch}) or run returned"


class _SessionStep:
    """The decode step Runner.decode_loop drives: it writes `tokens` and `positions`, step() runs one token per
    sequence through the graph and keeps the state."""

    def __init__(self, engine: "OnnxEngine", state: State, positions: list[int]):
        self.engine, self.state = engine, state
        self.tokens = torch.zeros(len(positions), dtype=torch.long, device="cpu")
        self.positions = torch.tensor(positions, dtype=torch.long, device="cpu")

    def step(self) -> torch.Tensor:
        logits, self.state = self.engine._run(self.tokens.numpy()[:, None], self.state, self.positions.numpy(),
                                              state_is_ours=True)
        return torch.from_numpy(logits[:, -1])


class OnnxEngine(Runner):
    """An exported model in an onnxruntime session (CPU), with the calls a runner needs."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        """folder: an export (`tiny` names the bundled model, as the CLI does: no export); threads: onnxruntime's
        intra-op threads, 0 to MAX_THREADS (None or 0: its own choice, one per core); checked before anything is read
        (1.5 was blamed on the export, -5 taken, 10**6 hung onnxruntime)."""
        count = 0 if threads is None else as_number(threads, whole=True)
        if count is None or not 0 <= count <= MAX_THREADS:
            raise KLError(f"threads={shown(threads)} should be a whole number from 0 to {MAX_THREADS} (onnxruntime's "
                          "intra-op threads; 0 or None: its own choice, one per core)")
        given, folder = folder, resolve_model(folder)
        refuse_export_under_way(folder, given)
        # absent only: one that is there but no regular file of the folder (a link to /dev/zero) is refused reading it
        if not os.path.lexists(folder / GENAI_CONFIG):   # named as given: `tiny`, not where it is installed
            raise KLError(f"{given}: no {GENAI_CONFIG} here; --engine onnxruntime runs a folder written by "
                          "`klconvert export-onnx --model DIR --out FOLDER` -- export one first")
        self.folder, self.config = folder, KimiLinearConfig.from_file(folder / CONFIG_FILE)
        # The state's names and shapes come from config.json (checked and bounded), the graph's file name is
        # export-onnx's own; GENAI_CONFIG (untrusted: it sizes every allocation here) must agree with both.
        self.states = state_spec(self.config)
        key_block = self._checked_genai_config(folder / GENAI_CONFIG)
        # where generate stops unless told otherwise (export-onnx copies the tokenizer, if the model has one)
        self.stop_ids = model_stop_ids(self.config, check_tokenizer_if_any(folder, self.config))
        self.device = torch.device("cpu")
        for name in (ONNX_FILE, DATA_FILE):  # onnxruntime would wait on a FIFO as long as nothing writes to it
            if name == ONNX_FILE or (folder / name).exists():
                refuse_link_out(folder / name)   # as every other file of the folder is read: its own only
                try:
                    open_regular(folder / name).close()
                except OSError as e:
                    refuse_out_of_descriptors(e, folder / name)
                    raise KLError(f"{folder / name}: onnxruntime cannot load it ({e.strerror}); export the folder "
                                  "again") from None
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = count
            options.log_severity_level = ORT_FATAL_ONLY
            # onnxruntime records a memory pattern for each set of input shapes a session runs and keeps them all;
            # each decode step's state is a row longer than the last's, so each step added one, and since the MLA
            # layers' If (absorbed decode, expanded prefill) what they hold grew with every new token (bundled int4,
            # 17-token prompt: 0.32 GB peak at 20 new tokens, 0.90 GB at 800, where it now stays at 0.33) and a
            # 3,976-token prompt's prefill peaked at 0.90 GB (now 0.70). Decode and prefill are no slower without.
            options.enable_mem_pattern = False
            if process_arena_cap() is not None:
                options.add_session_config_entry("session.use_env_allocators", "1")
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a missing or damaged file
            refuse_out_of_descriptors(e, folder / ONNX_FILE)
            if _out_of_memory(e):
                raise exhausted(f"loading {folder / ONNX_FILE} into onnxruntime", e) from None
            raise KLError(f"{folder / ONNX_FILE}: onnxruntime cannot load it ({_reason(e)}); "
                          "export the folder again") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._check_names(folder / ONNX_FILE)
        self.key_block = self._graphs_key_block(key_block, folder / GENAI_CONFIG)
        # an export from before LOGITS_TO_KEEP computes every position's logits, of which _run keeps those asked for
        self.takes_logits_to_keep = LOGITS_TO_KEEP in {i.name for i in self.session.get_inputs()}
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = ORT_FATAL_ONLY
        self._run_options.add_run_config_entry(*ARENA_SHRINKAGE)
        logits = next((o.shape for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None or len(logits) != 3 or logits[2] != self.config.vocab_size:
            raise KLError(f"{folder / ONNX_FILE}: its logits output is {logits if logits is not None else 'missing'}, "
                          f"where config.json's vocab_size makes it [{', '.join(LOGITS_SHAPE)}, "
                          f"{self.config.vocab_size}]; export the folder again")
        self.stats = GenerationStats()
        self._returned: State = {}   # the state the last run returned (the one a decode loop feeds back)

    def _check_names(self, path: Path) -> None:
        """The graph takes exactly the inputs and gives at least the outputs that config.json's state implies (a graph
        exported from another config failed mid-run, naming an input it does not have)."""
        inputs = {i.name for i in self.session.get_inputs()}
        wanted = {*GRAPH_INPUTS, *(s["past"] for s in self.states)}
        missing = sorted(wanted - inputs) + sorted({"logits", *(s["present"] for s in self.states)} - set(self.outputs))
        extra = sorted(inputs - wanted - {LOGITS_TO_KEEP})
        if missing or extra:
            problem = f"lacks {', '.join(missing[:3])}" if missing else f"takes {', '.join(extra[:3])} besides"
            raise KLError(f"{path}: the graph {problem}{' ...' if len(missing or extra) > 3 else ''}, which this "
                          "folder's config.json does not make; export the folder again")

    def _graphs_key_block(self, block: int | None, path: Path) -> int | None:
        """GENAI_CONFIG's attention_key_block (`block`; `path` names the file) once it is the graph's: what the graph
        records, or, in a graph from before that record, EARLIER_KEY_BLOCK if it has the key-block Loop, else none
        (an export from before key blocks). A hand-edited block sized every prefill call wrongly: 1,024 given to a
        graph that attends every cached row at once peaked at 2.5 GB where its own calls took 0.7 (8,000 tokens)."""
        recorded = self.session.get_modelmeta().custom_metadata_map.get(ATTENTION_KEY_BLOCK)
        if recorded is not None and not re.fullmatch(r"[1-9][0-9]{0,9}", recorded):
            raise KLError(f"{self.folder / ONNX_FILE}: the graph records {ATTENTION_KEY_BLOCK} {shown(recorded)}, "
                          "where export-onnx records a whole number of at least 1; export the folder again")
        if recorded is not None:
            graphs = int(recorded)
        elif not self.config.full_attn_layers:
            return block   # no MLA layer, no Loop to tell by: nor any scores for a block to size
        else:
            graphs = EARLIER_KEY_BLOCK if KEY_BLOCK_GRAPH in self._subgraph_names() else None
        if block != graphs:
            said = f"is {shown(block)}" if block is not None else "is missing"
            attends = f"{graphs} cached rows" if graphs is not None else "every cached row (it has no key blocks)"
            raise KLError(f"{path}: its {ATTENTION_KEY_BLOCK} {said}, where its graph attends {attends} at once; "
                          "export the folder again")
        return block

    def _subgraph_names(self) -> set[str]:
        """subgraph_names of the graph onnxruntime loaded; one that cannot be read (changed since) is one line."""
        path = self.folder / ONNX_FILE
        try:
            return subgraph_names(path)
        except (OSError, ValueError) as e:
            refuse_out_of_descriptors(e, path)
            raise KLError(f"{path}: cannot read its nodes ({unreadable_reason(e, 120)}); export the folder "
                          "again") from None

    def _checked_genai_config(self, path: Path) -> int | None:
        """The cached rows the graph's MLA layers attend at once, as GENAI_CONFIG says once it is checked (None: an
        export from before key blocks, which attends all of them); _graphs_key_block holds it to the graph's."""
        refuse_link_out(path)
        try:
            config = read_json(path, MAX_GENAI_CONFIG_BYTES, GENAI_CONFIG)
        except (OSError, ValueError, RecursionError) as e:
            refuse_out_of_descriptors(e, path)
            raise KLError(f"{path}: cannot read it ({unreadable_reason(e, 120)}); export the folder again") from None
        spec = config.get("model") if isinstance(config, dict) else None
        if not (isinstance(spec, dict) and "file" in spec and "state" in spec):
            got = (f"a JSON {JSON_KINDS.get(type(config), 'number')}" if not isinstance(config, dict) else
                   "an object with no 'model' object" if not isinstance(spec, dict) else
                   f"a 'model' object with no '{'file' if 'file' not in spec else 'state'}'")
            raise KLError(f"{path}: holds {got}, where export-onnx writes an object whose 'model' object names the "
                          "graph's 'file' and its 'state' tensors; export the folder again")
        if spec["file"] != ONNX_FILE or spec["state"] != self.states:
            raise KLError(f"{path}: its graph file or state tensors are not what export-onnx writes for this folder's "
                          "config.json; export the folder again")
        block = spec.get(ATTENTION_KEY_BLOCK)
        if block is not None and not (type(block) is int and block >= 1):   # JSON's true is no block
            raise KLError(f"{path}: its {ATTENTION_KEY_BLOCK} is {shown(block)}, where export-onnx writes a whole "
                          "number of at least 1; export the folder again")
        return block

    def empty_state(self, batch: int) -> State:
        """The state of `batch` sequences before any token: zero recurrent states and conv tails, no cached latent
        rows. KLError unless batch is a whole number >= 1 whose state fits what the host leaves (-1 and 1.5 were
        numpy's errors, 10**12 its MemoryError of 116 PiB)."""
        if not (isinstance(batch, numbers.Integral) and not isinstance(batch, bool) and batch >= 1):
            raise KLError(f"empty_state: batch {batch!r} should be a whole number >= 1 (the sequences the state holds)")
        batch = int(batch)
        per_sequence = sum(int(np.prod(_shape(s, 1, 0))) * np.dtype(s["dtype"]).itemsize for s in self.states)
        host = host_memory()
        if host is not None and batch * per_sequence > host.available:
            fit = host.available // per_sequence
            raise KLError(f"empty_state: a state of {counted(batch, 'sequence')} takes "
                          f"{size_text(batch * per_sequence)}, more than the {host}; "
                          + (f"lower batch ({fit:,} fit), or " if fit else "") + host.remedy)
        return {s["past"]: np.zeros(_shape(s, batch, 0), s["dtype"]) for s in self.states}

    def run(self, ids: np.ndarray, state: State, positions: np.ndarray) -> tuple[np.ndarray, State]:
        """ids [B, T] at positions [B] (of ids[:, 0]) -> (logits [B, T, vocab], the state after them). `state` is
        empty_state(B)'s or what run returned; each position is where its sequence's next token goes (the longest
        sequence's: the tokens the state holds). Refused with a KLError naming the argument otherwise: onnxruntime
        ran most such input into an error that blamed the export, and a position past the state's silently."""
        return self._run(ids, state, positions, state_is_ours=False)

    def _run(self, ids, state: State, positions, state_is_ours: bool, keep: int = 0) -> tuple[np.ndarray, State]:
        """run's work, giving the logits of the last `keep` positions ([B, keep, vocab]; 0: every position's);
        `state_is_ours`: the state is one this engine made (empty, batched, or the graph's own, fed back), so NaN in it
        is the graph's, not the caller's."""
        ids = self._checked_ids(ids)
        B, T = ids.shape
        rows = self._state_rows(state, B)
        positions = self._checked_positions(positions, B, T, rows)
        feed = {"input_ids": ids, "position": positions, **state}
        if self.takes_logits_to_keep:
            feed[LOGITS_TO_KEEP] = np.array(keep, np.int64)
        stopped_by: list[int] = []   # the signal that terminated the run, if one did
        try:
            with interruptible(self._run_options) as stopped_by:
                out = dict(zip(self.outputs, self.session.run(None, feed, self._run_options)))
        except Exception as e:  # onnxruntime's own exception types (Fail, InvalidArgument, ...) share no base
            if stopped_by:   # its handler raises as soon as this thread runs Python again; if it does not, here
                raise KeyboardInterrupt from None
            refuse_out_of_descriptors(e, self.folder / ONNX_FILE)   # no fault of the export
            reason = _reason(e)
            if _out_of_memory(e):
                cap = process_arena_cap()
                capped = "" if cap is None else (f"; its memory is capped at {size_text(cap)}, {ARENA_SHARE:.0%} of "
                                                 "what the host had available when this process first loaded an export")
                raise KLError(f"{self.folder / ONNX_FILE}: onnxruntime ran out of memory running it ({reason})"
                              f"{capped}; give fewer or shorter prompts, or free memory and start again -- if a short "
                              "prompt fails too, the graph is damaged: export the folder again") from None
            raise KLError(f"{self.folder / ONNX_FILE}: onnxruntime failed running it ({reason}); export the folder "
                          "again") from None
        logits = self._checked(out["logits"], state, state_is_ours)
        if keep and not self.takes_logits_to_keep:
            # a copy: a view of the last rows would keep the call's whole logits [B, tokens, vocab] alive
            logits = logits[:, -keep:].copy()
        after = {s["past"]: self._checked_present(s, out[s["present"]], B, (rows or 0) + T) for s in self.states}
        self._returned = after
        return logits, after

    def _checked_present(self, spec: dict, value: np.ndarray, batch: int, rows: int) -> np.ndarray:
        """A state tensor the graph returned, refused as the graph's fault unless it is of the dtype and shape its
        past input takes next (`rows` tokens held): fed back, it was refused as the caller's state."""
        want = _shape(spec, batch, rows)
        if value.dtype != spec["dtype"] or list(value.shape) != want:
            raise KLError(f"{self.folder / ONNX_FILE}: the graph returned {spec['present']} {value.dtype} "
                          f"{list(value.shape)}, where config.json makes it {spec['dtype']} {want}; export the folder "
                          "again")
        return value

    def _checked_ids(self, ids) -> np.ndarray:
        """Token ids as the graph takes them, [B >= 1, T >= 1] int64 inside the vocabulary (its Gather wraps a
        negative id round to the vocabulary's end)."""
        ids = as_batch(ids, self.config.vocab_size)
        return ids.contiguous().numpy()

    def _state_rows(self, state, batch: int) -> int | None:
        """The tokens `state` holds -- its latent caches' rows (None where the model has no MLA layer to count them)
        -- once it is checked to be a state of `batch` sequences as empty_state and run give: every past input the
        graph takes, each a numpy array of its dtype and shape."""
        take = _pass_a_state(batch)
        if not isinstance(state, dict):
            raise KLError(f"state should be the dict of arrays that empty_state({batch}) or run returns, got a "
                          f"{type(state).__name__}")
        names = [s["past"] for s in self.states]
        missing, extra = [n for n in names if n not in state], sorted(map(str, set(state) - set(names)))
        if missing or extra:
            problem = (f"lacks {missing[0]}, which the graph takes" if missing else
                       f"holds {extra[0][:80]}, which the graph does not take")
            raise KLError(f"state {problem}; {take}")
        rows = {}
        for s in self.states:
            value = state[s["past"]]
            axis = s["shape"].index("past_sequence") if "past_sequence" in s["shape"] else None
            fits = isinstance(value, np.ndarray) and value.ndim == len(s["shape"])
            held = value.shape[axis] if fits and axis is not None else 0
            if not (fits and value.dtype == s["dtype"] and list(value.shape) == _shape(s, batch, held)):
                got = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else \
                    a_type(value)
                wanted = ", ".join(str(batch) if d == "batch" else str(d) for d in s["shape"])
                raise KLError(f"state[{s['past']!r}] is {got}, where a state of {counted(batch, 'sequence')} "
                              f"(input_ids' first dimension) is {s['dtype']} [{wanted}]; {take}")
            if axis is not None:
                rows[s["past"]] = held
        if len(set(rows.values())) > 1:
            shown = ", ".join(f"{name}: {n}" for name, n in list(rows.items())[:4])
            raise KLError(f"state's latent caches hold different numbers of rows ({shown}); pass the state run "
                          "returned")
        return next(iter(rows.values()), None)

    def _checked_positions(self, positions, batch: int, tokens: int, rows: int | None) -> np.ndarray:
        """positions as the graph takes them: [batch] int64, room for `tokens` more within the model's context, the
        longest at `rows` (the tokens the state holds: a position past them attended zero rows, one before them
        re-ran tokens the recurrent state has already seen); a shorter sequence of a batch may sit lower, its rows
        past its position being padding that the position masks."""
        p = whole_numbers(positions, "positions")
        if p.shape != (batch,):
            raise KLError(f"positions should be [batch] = [{batch}], one per sequence of input_ids, got shape "
                          f"{list(p.shape)}")
        low, high, limit = int(p.min()), int(p.max()), self.config.model_max_length
        if low < 0:
            raise KLError(f"positions: {low} is negative; a sequence's first token is at position 0")
        if high + tokens > limit:
            raise KLError(f"positions: {high} plus {counted(tokens, 'token')} is over the model's "
                          f"{self.config.model_max_length_name} {limit:,}; start lower, or give fewer tokens")
        if rows is not None and high != rows:
            shown = f"{p.tolist()[:8]}"[:-1] + (", ...]" if batch > 8 else "]")
            raise KLError(f"positions {shown}: the state holds {counted(rows, 'token')} (its latent caches' rows), "
                          f"so the longest sequence's position is {rows}, where its next token goes; pass the "
                          "positions of the state given (0 for empty_state's)")
        return p.numpy()

    def _checked(self, logits: np.ndarray, state: State, state_is_ours: bool) -> np.ndarray:
        """The graph's logits, refused unless they are vocab_size wide (a wider row samples ids the tokenizer does not
        have) and finite (NaN samples garbage): non-finite logits from a `state` (the one they were run on) that holds
        NaN or inf are the caller's state's, unless the state is the engine's own (`state_is_ours`) or what the last
        run returned; else the graph's. The state is read only then, not on every call."""
        if logits.ndim != 3 or logits.shape[2] != self.config.vocab_size:
            raise KLError(f"{self.folder / ONNX_FILE}: the graph returned logits {list(logits.shape)}, where "
                          f"config.json's vocab_size is {self.config.vocab_size}; export the folder again")
        if not np.isfinite(logits.sum(dtype=np.float64)):   # finite iff every value is: fp32s cannot overflow it
            bad = next((name for name, value in state.items() if not np.isfinite(value.sum(dtype=np.float64))), None)
            if bad is not None and (state_is_ours or self._returned.get(bad) is state[bad]):   # the graph's own
                raise KLError(f"{self.folder / ONNX_FILE}: the graph returned NaN or infinite values in its state "
                              f"({bad}, fed back); its weights or graph are damaged -- export the folder again")
            if bad is not None:
                raise KLError(f"state[{bad!r}] holds NaN or infinite values, which the graph carried into its "
                              f"logits; {_pass_a_state(logits.shape[0])}")
            raise KLError(f"{self.folder / ONNX_FILE}: the graph computed NaN or infinite logits; its weights or "
                          "graph are damaged -- export the folder again")
        return logits

    def forward(self, input_ids) -> torch.Tensor:
        """Whole sequences of one length from a fresh state: input_ids [T] or [B, T] -> logits [B, T, vocab] fp32."""
        logits, _ = self._prefill(input_ids, every_position=True)
        return torch.from_numpy(logits)

    def _prefill(self, ids, every_position: bool) -> tuple[np.ndarray, State]:
        """ids [B, T] from a fresh state, in calls of prefill_segment tokens -> (the logits of every position, or of
        the last [B, 1, vocab]; the state after them)."""
        ids = self._checked_ids(ids)
        B, T = ids.shape
        state, size, kept = self.empty_state(B), self.prefill_segment(B, T), []
        for start in range(0, T, size):
            logits, state = self._run(ids[:, start:start + size], state, np.full(B, start, np.int64),
                                      state_is_ours=True, keep=0 if every_position else 1)
            kept = [*kept, logits] if every_position else [logits]   # generate samples the last call's row alone
        return (np.concatenate(kept, axis=1) if every_position else kept[-1]), state

    def prefill_segment(self, batch: int, tokens: int) -> int:
        """Tokens a prefill call of `batch` sequences of `tokens` takes: its scores against the keys the graph attends
        at once -- a key block, or all `tokens` -- fit SCORE_BYTES."""
        keys = tokens if self.key_block is None else min(tokens, self.key_block)
        return max(1, min(tokens, SCORE_BYTES // (4 * batch * self.config.num_attention_heads * keys)))

    def _batched(self, states: list[State]) -> State:
        """Per-sequence states as one batch; latent caches padded to the longest (a sequence's rows past its position
        are masked, then overwritten as it grows)."""
        out = {}
        for x in self.states:
            parts = [s[x["past"]] for s in states]
            if "past_sequence" in x["shape"]:   # the growing axis
                axis = x["shape"].index("past_sequence")
                longest = max(p.shape[axis] for p in parts)
                parts = [np.pad(p, [(0, longest - p.shape[axis]) if d == axis else (0, 0) for d in range(p.ndim)])
                         for p in parts]
            out[x["past"]] = np.concatenate(parts)
        return out

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids: frozenset[int] | None = None, on_token=None,
                 on_prefill=None) -> torch.Tensor:
        """Prefill each prompt, then decode them together; as Engine.generate (new ids [B, n], stop handling -- by
        default at the model's stop tokens, self.stop_ids --, on_token, on_prefill(tokens) after each prompt,
        self.stats). Every prompt and argument is checked before any is prefilled. Its callbacks may not call back
        into generate or decode_loop (a KLError), whose stats it is filling; a call that fails (a bad argument too)
        leaves self.stats reset, as Engine.generate's does."""
        with self._held("generate"):
            max_new_tokens, temperature, top_p, seed = check_generate_args(max_new_tokens, temperature, top_p, seed)
            check_callbacks(on_token=on_token, on_prefill=on_prefill)
            stop_ids = as_stop_ids(self.stop_ids if stop_ids is None else stop_ids, self.config.vocab_size)
            prompts = [p.tolist() for p in as_prompts(prompts, self.config.vocab_size)]
            longest = max(len(p) for p in prompts)
            if longest + max_new_tokens > self.config.model_max_length:
                raise KLError(f"the prompt ({counted(longest, 'token')}) plus max_new_tokens {max_new_tokens} is over "
                              f"the model's {self.config.model_max_length_name} {self.config.model_max_length:,}; "
                              "shorten them")
            B = len(prompts)
            self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), batch=B)
            generator = sampling_generator(seed)
            t0 = time.perf_counter()
            last, states = [], []
            for p in prompts:
                logits, state = self._prefill(np.asarray([p]), every_position=False)
                last.append(torch.from_numpy(logits[:, -1]))
                states.append(state)
                if on_prefill is not None:
                    on_prefill(len(p))
            self.stats.prefill_seconds = time.perf_counter() - t0
            if max_new_tokens == 0:  # as Engine.generate: prefilled, nothing to decode
                return no_new_ids(B)
            step = _SessionStep(self, self._batched(states), [len(p) for p in prompts])
            return self._decode_loop(step, torch.cat(last), max_new_tokens, temperature, top_p, generator, stop_ids,
                                     on_token)
