"""Engine: a declared model bound to a checkpoint, with its memory plan -- prefill, the decode step, generation."""
from __future__ import annotations

import inspect
import numbers
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import Checkpoint
from klconvert.config import KimiLinearConfig
from klconvert.devices import checked_device
from klconvert.errors import KLError, a_type, argument, refuse_non_bool, shown
from klconvert.models import resolve_model
from klconvert.quant import QuantScheme
from klconvert.quant.nf4 import load_nf4_reader
from klconvert.runtime.bind import bind, cpu_forms_bound, latent_kernel_reads, packed_choice
from klconvert.runtime.cpu_modules import copy_bytes
from klconvert.runtime.decode_step import DecodeStep, GraphMemory, autocast_off, capturable
from klconvert.runtime.device_memory import (BatchDoesNotFit, ContextDoesNotFit, PromptsDoNotFit, WeightsDoNotFit,
                                             device_allocation, device_room, fewer_bits_hold_less, free_the_gpu)
from klconvert.runtime.host_malloc import LOAD_THRESHOLD, large_blocks_mapped
from klconvert.runtime.host_memory import NAMED_FIT_SHARE, HostMemory, host_allocation, host_memory
from klconvert.runtime.intra_op_threads import StacksTakeTheRoom, start_intra_op_threads, with_fewer_stacks
from klconvert.runtime.logits_not_finite import LogitsNotFinite
from klconvert.runtime.memory_plan import (DECODE_COPIES, LOGIT_ROWS, MAX_BATCH, PREFILL_ROWS, PREFILL_SEGMENT,
                                           MemoryPlan, weight_bytes)
from klconvert.runtime.model import KimiLinear
from klconvert.runtime.sampling import check_generate_args, sample, sampling_generator
from klconvert.runtime.state import MLA_CACHE_DTYPES
from klconvert.runtime.weights import HeldPacked, Packed, use_triton
from klconvert.scalars import as_number
from klconvert.tokenizer import Tokenizer, check_tokenizer_if_any, model_stop_ids
from klconvert.units import counted, size_text, size_texts

SMALL_MODEL_HIDDEN = 1024  # below this hidden size, CPU decode runs on one thread (see Engine._small_model_threads)
MAX_TOKENS_IN_FLIGHT = 8  # decode steps the host may run ahead of the tokens it has seen (stop checks lag so)
OUT_COLUMNS = 1024  # new ids held on the device a block of this many steps at a time: the output grows as they come
NOT_FINITE = -1  # what the host is handed, in place of an id, for a step whose logits were not finite (sample)
SEGMENTS = "forward_segments"  # Runner._holder while a forward_segments iterator is being read
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # load's dtype by name (--dtype's choices)
DEFAULT_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}  # the compute dtype on each device type unless told


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    batch: int = 1
    new_tokens: int = 0      # over all sequences, each up to and including its stop id (not the padding after)
    steps: int = 0           # decode steps run (each makes one token per sequence)
    timed_steps: int = 0     # the steps decode_seconds covers: all but the first, when there are two or more
    timed_tokens: int = 0    # the tokens those steps made, each sequence's through its stop id
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second over all sequences, over the timed decode steps (the first token of each comes from
        prefill), counting each sequence's tokens through its stop id, not the padding a batch steps on after it.
        The clock starts after the first step when another follows: on CUDA the first use of each of the loop's
        PyTorch ops in a process loads its GPU code (40-70 ms an op on an H100), which the first token and step pay
        once, and the rate is the loop's, not that."""
        return self.timed_tokens / self.decode_seconds if self.decode_seconds else 0.0


def check_id_range(ids: torch.Tensor, vocab_size: int, what: str = "token id") -> None:
    """KLError unless every token id of `ids` (int64) lies in the vocabulary, naming the smallest id when it is
    negative, else the largest."""
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise KLError(f"{what} {low if low < 0 else high} is outside the vocabulary (0..{vocab_size - 1})")


def as_stop_ids(stop_ids, vocab_size: int) -> frozenset[int]:
    """generate's stop_ids -- any iterable of token ids (a set, list, tuple, generator or 1-d tensor; numpy and torch
    integers taken as ints) -- as a frozenset of ints inside the vocabulary, read once: the device compares against
    them and the host too, so a generator read up by one (the host then never stopped), 44.5 truncated by one and not
    the other, True taken as 1, or an id no token can be (never matched) is refused."""
    try:   # a tensor or array as it is (its dtype kept: a uint64 one's ids past int64 are named, not wrapped)
        items = stop_ids if isinstance(stop_ids, torch.Tensor) or hasattr(stop_ids, "__array__") else list(stop_ids)
        if getattr(items, "ndim", 1) == 0:
            raise TypeError
    except TypeError:
        raise KLError(f"stop_ids {shown(stop_ids)} should be a set of token ids, e.g. {{{shown(stop_ids)}}} for one "
                      "(frozenset() never stops)") from None
    ids = whole_numbers(items, "stop_ids")
    if ids.dim() != 1:
        raise KLError(f"stop_ids should be a flat set of token ids, got them nested (shape {list(ids.shape)})")
    check_id_range(ids, vocab_size, "stop id")
    return frozenset(ids.tolist())


def whole_numbers(value, what: str = "token ids", where: str = "") -> torch.Tensor:
    """`value` (ids, positions: a tensor, list or number) as int64; KLError for floats and bools, which
    torch.as_tensor(..., dtype=torch.long) would truncate (1.7 -> 1) or count (True -> 1) -- a bool inside a list
    too, which torch.as_tensor makes an int ([True, 5] -> [1, 5]), named by its index (after `where`, the index of
    `value` in what the caller was given) -- and for what no tensor holds (ragged lists, ids past int64)."""
    at = _bool_at(value)
    if at is not None:
        raise KLError(f"{what} should be whole numbers, got a bool at {where}{at}; give ints (a bool would run as "
                      "0 or 1)")
    try:
        # a tensor as it is; lists and arrays on the host, whatever an app's torch.set_default_device
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, device="cpu")
    except (TypeError, ValueError, RuntimeError, OverflowError, NotImplementedError) as e:
        raise KLError(f"{what} should be whole numbers in a list or tensor ({str(e).splitlines()[0][:120]})") from None
    if t.is_meta or t.layout != torch.strided:   # no values to read (meta), or none a check below reads (sparse)
        raise KLError(f"{what} should be whole numbers in a list or a dense tensor that holds them, got a "
                      f"{'meta' if t.is_meta else str(t.layout).removeprefix('torch.')} tensor")
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise KLError(f"{what} should be whole numbers, got {t.dtype}")
    if t.dtype == torch.uint64 and t.numel():   # past 2**63 - 1, .long() would wrap it round to a negative number
        wrapped = t.view(torch.int64)
        if bool((wrapped < 0).any()):
            raise KLError(f"{what}: {int(wrapped[wrapped < 0][0]) + 2**64} is past any id or position (a "
                          "whole number below 2**63)")
    return t.long()


def _bool_at(value) -> str | None:
    """The index ("[1][0]") of the first bool (or bool tensor) inside the lists and tuples of `value`, else None."""
    if not isinstance(value, (list, tuple)):
        return None     # a bool or bool tensor itself: torch.as_tensor keeps its dtype, which whole_numbers refuses
    for i, item in enumerate(value):
        if type(item) is int:   # the common case, at once
            continue
        if isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
            return f"[{i}]"
        inner = _bool_at(item) if isinstance(item, (list, tuple)) else None
        if inner is not None:
            return f"[{i}]{inner}"
    return None


_PROMPT_SHAPES = "give [T] or [B, T] ids, or a list of id lists"


def as_prompts(prompts, vocab_size: int) -> list[torch.Tensor]:
    """generate's prompts -- a [T] or [B, T] tensor or list of ids, or a list of id lists (or tensors) of their own
    lengths -- as int64 [T] tensors, at least one, none empty, every id inside the vocabulary: every prompt checked
    before any work (each engine holds the lengths to its own limit)."""
    if isinstance(prompts, (list, tuple)) and not all(_one_id(p) for p in prompts):
        seqs = [whole_numbers(p, where=f"[{i}]") for i, p in enumerate(prompts)]   # prompts of their own lengths
    else:                                                   # one tensor or flat list of ids: [T] or [B, T]
        ids = whole_numbers(prompts)
        if ids.dim() > 2:
            raise KLError(f"generate's prompts have shape {list(ids.shape)}; {_PROMPT_SHAPES}")
        seqs = list(ids.view(1, -1) if ids.dim() <= 1 else ids) if ids.numel() or ids.dim() == 2 else []
    if not seqs:
        raise KLError("generate needs at least one prompt")
    for i, s in enumerate(seqs):
        if s.dim() != 1:
            raise KLError(f"generate's prompt [{i}] has shape {list(s.shape)}; {_PROMPT_SHAPES}")
        if s.numel() == 0:
            raise KLError(f"generate's prompt [{i}] is empty; each prompt needs at least one token id")
    for s in seqs:
        check_id_range(s, vocab_size)
    return seqs


def as_batch(input_ids, vocab_size: int) -> torch.Tensor:
    """forward's input_ids -- [T] or [B, T], a tensor or lists -- as int64 [B, T], B, T >= 1, every id inside the
    vocabulary."""
    ids = whole_numbers(input_ids, "input_ids")
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise KLError(f"input_ids must be [T] or [B, T] with T >= 1, got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise KLError(f"input_ids holds no sequence (shape {list(ids.shape)}); give at least one")
    check_id_range(ids, vocab_size)
    return ids


def checked_mla_cache_dtype(mla_cache_dtype: str | torch.dtype | None,
                            compute_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The MLA cache dtype as None (the caller's default) or one of MLA_CACHE_DTYPES -- or the engine's
    `compute_dtype`, the cache's default (float32 on the CPU) -- given by name or dtype; KLError otherwise, naming the
    argument with the flag that sets it."""
    choices = dict(MLA_CACHE_DTYPES)
    if compute_dtype is not None:
        choices.update((name, dtype) for name, dtype in COMPUTE_DTYPES.items() if dtype == compute_dtype)
    if isinstance(mla_cache_dtype, str) and mla_cache_dtype in choices:
        return choices[mla_cache_dtype]
    if mla_cache_dtype is not None and mla_cache_dtype not in choices.values():
        raise KLError(f"{argument('mla_cache_dtype', '--mla-cache-dtype', mla_cache_dtype)}: choose "
                      f"{' or '.join(choices)}, by name or torch dtype")
    return mla_cache_dtype


def check_e4m3_cache_readable(config: KimiLinearConfig, device: torch.device, dtype: torch.dtype, triton: bool,
                              mla_cache_dtype: torch.dtype | None) -> None:
    """Refuse, before a weight is read, an e4m3 latent cache that the Triton latent kernels would read on a GPU with
    no e4m3 (compute capability under kernels.mla_limits.E4M3_CAPABILITY: Ampere's A100, A10 and A6000)."""
    if not (mla_cache_dtype == torch.float8_e4m3fn and triton and device.type == "cuda"
            and latent_kernel_reads(config, dtype)):
        return
    from klconvert.kernels.mla_limits import E4M3_CAPABILITY, e4m3_capable   # no Triton

    if not e4m3_capable(device):
        have = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise KLError(f"{argument('mla_cache_dtype', '--mla-cache-dtype', 'float8_e4m3fn')}: the Triton kernels read "
                      f"an e4m3 cache on compute capability {'.'.join(map(str, E4M3_CAPABILITY))} or newer, and "
                      f"{torch.cuda.get_device_name(device)} ({device}) has {have}; use a bfloat16 cache")


def check_plan_args(context, batch, mla_cache_dtype: str | torch.dtype | None, context_name: str,
                    compute_dtype: torch.dtype) -> tuple[int, int, torch.dtype | None]:
    """The memory plan's context and batch as Python ints (as_number: numpy and torch integers taken), and the MLA
    cache dtype as checked_mla_cache_dtype takes it (`compute_dtype` among its choices); KLError otherwise, naming
    the argument as the caller (load, resize) calls it -- `context_name` for the context -- with the flag that sets it
    (the CLI's parser holds the flags so: only the Python API gets here with another value)."""
    mla_cache_dtype = checked_mla_cache_dtype(mla_cache_dtype, compute_dtype)
    sizes = []
    for name, flag, value in ((context_name, "--max-context", context), ("batch", "--batch", batch)):
        number = as_number(value, whole=True)
        if number is None or number < 1:
            raise KLError(f"{argument(name, flag, value)} should be a whole number of at least 1")
        if name == "batch" and number > MAX_BATCH:
            raise KLError(f"{argument(name, flag, value)} is past the {MAX_BATCH:,} sequences a plan sizes")
        sizes.append(number)
    return sizes[0], sizes[1], mla_cache_dtype


def _one_id(value) -> bool:
    """Whether a prompt list's item is one token id (a number or a 0-d tensor), not a prompt of its own."""
    return isinstance(value, numbers.Number) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def no_new_ids(batch: int) -> torch.Tensor:
    """The [batch, 0] ids of no new tokens: on the host, as every generate's ids, whatever an app's default device."""
    return torch.empty(batch, 0, dtype=torch.long, device="cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TokenStream:
    """New tokens copied to the host asynchronously (pinned buffers + events): the host hands them on as they
    land, at most MAX_TOKENS_IN_FLIGHT steps behind the device, without a sync per token."""

    def __init__(self, device: torch.device):
        self.pending: deque = deque()
        self.cuda = device.type == "cuda"

    def push(self, token: torch.Tensor) -> None:
        if not self.cuda:
            self.pending.append((None, token))
            return
        host = torch.empty(token.shape, dtype=token.dtype, device="cpu", pin_memory=True)
        host.copy_(token, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, host))

    def landed(self, wait: bool = False) -> list[list[int]]:
        """Tokens whose copies are complete, oldest first (all of them with wait, else those ready, waiting only
        when the host runs too far ahead)."""
        out = []
        while self.pending:
            event, host = self.pending[0]
            ready = event is None or wait or len(self.pending) > MAX_TOKENS_IN_FLIGHT or event.query()
            if not ready:
                break
            if event is not None:
                event.synchronize()
            self.pending.popleft()
            out.append(host.tolist())
        return out


# what each callback of the engines' is called with, by its argument's name
CALLBACK_ARGUMENTS = {"on_token": ("sequence", "id"), "on_prefill": ("n",), "progress": ("n",)}


def check_callbacks(**callbacks) -> None:
    """KLError unless each callback, by its argument's name, is None or a function that takes what it is called with
    (CALLBACK_ARGUMENTS): an int, or a function of other arguments, was a TypeError once the first token or segment
    was done, mid-call. A callable whose signature Python cannot read (some builtins) is taken as it is."""
    for name, value in callbacks.items():
        if value is None:
            continue
        if not callable(value):
            raise KLError(f"{name} should be a function (or None), got {a_type(value)}")
        arguments = CALLBACK_ARGUMENTS[name]
        try:
            inspect.signature(value).bind(*arguments)
        except ValueError:   # no signature to read
            continue
        except TypeError:
            raise KLError(f"{name} is called as {name}({', '.join(arguments)}), which {_callable_name(value)} does "
                          "not take; give a function of those arguments") from None


def _callable_name(value) -> str:
    name = getattr(value, "__qualname__", None)
    return f"{name}{inspect.signature(value)}" if isinstance(name, str) else f"this {type(value).__name__}"


class _OneThreadCall:
    """A call of Runner._small_model_threads, in the thread it runs in."""
    __slots__ = ("thread", "__weakref__")

    def __init__(self, thread: int):
        self.thread = thread


class Runner:
    """What Engine and OnnxEngine (klconvert/onnx/session.py) share: the hold a generation takes on the engine, the
    decode loop, and the figures it leaves in self.stats. A subclass sets self.device, self.config and self.stats."""

    # what holds the engine: the call running on its state (generate, decode_loop, prefill, decode_step, decoder,
    # resize) while it runs, or SEGMENTS; and the thread it runs in
    _holder: str | None = None
    _holder_thread: int | None = None
    _taking = threading.Lock()   # one check-and-take of a hold at a time (all engines: it is held for microseconds)
    # what asks for less memory, as an out-of-host-memory line in a decode step says it (host_allocation's `less`)
    decode_less = "give fewer or shorter prompts"
    # the calls of _small_model_threads running now (all engines), and the thread count the first of them found,
    # which each thread goes back to as its last call there ends; under _one_thread
    _one_thread = threading.Lock()
    _one_thread_calls: weakref.WeakSet[_OneThreadCall] = weakref.WeakSet()
    _threads_before: list[int] = []

    def _check_idle(self, call: str) -> None:
        """KLError while a call holds this engine -- `call` from another thread, or from one of a generation's
        callbacks -- or a forward_segments iterator is being read: `call` would write the state, step buffers or
        stats that it is using, and corrupt its output or figures."""
        if self._holder is not None and self._holder_thread != threading.get_ident():
            running = "a forward_segments iterator is being read" if self._holder == SEGMENTS else \
                f"{self._holder} is running"
            raise KLError(f"{call} was called from another thread while {running} on this engine, whose state it "
                          "would overwrite -- an engine runs one call at a time: wait for that one to end, or give "
                          "each thread an engine of its own")
        if self._holder == SEGMENTS:
            raise KLError(f"{call} was called while a forward_segments iterator of this engine is being read, whose "
                          "later segments run on the state it would overwrite -- read the iterator to its end or "
                          "close() it first, or call it on a second engine")
        if self._holder is not None:
            raise KLError(f"{call} was called while {self._holder} is running on this engine (from one of its "
                          f"callbacks, e.g. on_token), whose state or stats it would overwrite -- call it after "
                          f"{self._holder} returns, or on a second engine")

    @contextmanager
    def _holding(self, call: str, holder: str | None = None) -> Iterator[None]:
        """`call`'s hold on the engine's state (as `holder`, default `call`): refused while another call holds it,
        released however it ends."""
        with self._taking:
            self._check_idle(call)
            self._holder, self._holder_thread = holder or call, threading.get_ident()
        try:
            with self._device_memory(f"in {call}"):
                yield
        finally:
            self._holder = self._holder_thread = None

    def _device_memory(self, doing: str):
        """What turns the device running out during `doing` into a one-line error (Engine's, which has a plan)."""
        return nullcontext()

    @contextmanager
    def _held(self, call: str) -> Iterator[None]:
        """A generation's hold on the engine (`call`: generate or decode_loop): refused while another call holds it
        (self.stats then untouched: they may be that one's). A call that fails -- on a bad argument, an exception
        from a callback, an interrupt -- leaves self.stats reset to GenerationStats(), not its partial figures."""
        with self._holding(call):
            try:
                yield
            except BaseException:
                self.stats = GenerationStats()
                raise

    @contextmanager
    def _small_model_threads(self):
        """On the CPU, a small model runs on one intra-op thread: its ops are too small to split, and idle-spinning
        workers cost more than they save (decode 89 vs 0.7 tokens/s for the bundled model on a loaded 2-core
        machine). Each thread goes back, however the call ends, to the count the first of the calls running at once
        found: torch's count is each thread's, and a thread's first read takes the one set last in any thread, so a
        second engine's thread read the first's 1 and set it back for good (an engine a thread, as the README says).
        A call whose ending an interrupt cut short drops out of the calls as its frame goes, and the count it saved
        stays while its 1 does."""
        if self.device.type != "cpu" or self.config.hidden_size >= SMALL_MODEL_HIDDEN:
            yield
            return
        call = _OneThreadCall(threading.get_ident())
        calls, before = Runner._one_thread_calls, Runner._threads_before
        try:
            with Runner._one_thread:
                threads = torch.get_num_threads()   # read first: its first read would take a count set meanwhile
                if not calls and not (before and threads == 1):
                    before[:] = [threads]
                calls.add(call)
                torch.set_num_threads(1)
            yield
        finally:
            with Runner._one_thread:
                if before and not any(other.thread == call.thread for other in calls if other is not call):
                    torch.set_num_threads(before[0])   # the thread's last call out (one may run inside a callback)
                calls.discard(call)
                if not calls:
                    before.clear()

    def decode_loop(self, step: DecodeStep, logits: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    stop_ids: frozenset[int] = frozenset(),
                    on_token: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """From the logits after each sequence's last token (step.positions at the next free position), sample
        and run decode steps; the host never waits for the device except to hand tokens on (async copies, at
        most MAX_TOKENS_IN_FLIGHT steps behind) and once, after the first step, to start the clock. Returns the
        new ids [B, n] on the CPU; fills self.stats' decode figures (all reset when it fails, as generate's are).
        The arguments are checked as generate's are (check_generate_args, as_stop_ids), the generator's device against
        the engine's, the step's positions against the plan's context and the logits for NaN before it starts
        (syncs, before the clock); each step's logits are flagged beside its ids (sample) and a flagged token stops
        the loop, a KLError naming it, when it lands. It holds the engine as generate does, so its on_token may not
        call back into it."""
        with self._held("decode_loop"):
            max_new_tokens, temperature, top_p, _ = check_generate_args(max_new_tokens, temperature, top_p, None)
            check_callbacks(on_token=on_token)
            if generator is not None and (not isinstance(generator, torch.Generator)
                                          or generator.device.type != self.device.type):
                got = f"one on {generator.device}" if isinstance(generator, torch.Generator) else \
                    a_type(generator)
                raise KLError(f"decode_loop's generator should be a torch.Generator on {self.device.type} (or None), "
                              f"got {got}")
            self._check_loop_start(step, logits, max_new_tokens)
            return self._decode_loop(step, logits, max_new_tokens, temperature, top_p, generator,
                                     as_stop_ids(stop_ids, self.config.vocab_size), on_token)

    def _check_loop_start(self, step, logits, max_new_tokens: int) -> None:
        """KLError unless `step` is a decode step of this engine's (its decoder's) and `logits` the [B, vocab] logits of
        its B sequences (a list, a [vocab] row or another batch were errors from deep inside the loop)."""
        B, vocab = self._step_batch(step, max_new_tokens), self.config.vocab_size
        if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.shape == (B, vocab)):
            got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else a_type(logits)
            raise KLError(f"decode_loop's logits should be a float tensor [B, vocab] = [{B}, {vocab}], the logits "
                          f"after each of the step's sequences, got {got}")
        # each row's largest is NaN where the row holds one (argmax would pick it: token 0, unsaid), +inf, or -inf
        # where every value is; a -inf among finite values is a token masked out, and stays
        if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
            raise KLError("decode_loop's logits hold NaN or +inf, or a row of only -inf; pass the logits the model "
                          "computed after each sequence's last token (prefill's)")

    def _step_batch(self, step, max_new_tokens: int) -> int:
        """The sequences of `step`, a decode step of this runner's with room for `max_new_tokens` more tokens; a
        KLError for anything else."""
        raise KLError(f"{type(self).__name__} makes its decode steps itself: decode_loop takes none, got a "
                      f"{type(step).__name__}")

    def _decode_loop(self, step: DecodeStep, logits: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_p: float, generator: torch.Generator | None, stop_ids: frozenset[int],
                     on_token: Callable[[int, int], None] | None) -> torch.Tensor:
        """decode_loop with its arguments checked, holding the engine (generate ends here)."""
        B = logits.shape[0]
        if max_new_tokens == 0:   # nothing to sample: the [B, 0] ids, as generate's prefill-only run returns
            self.stats.steps = self.stats.timed_steps = self.stats.new_tokens = self.stats.timed_tokens = 0
            self.stats.decode_seconds, self.stats.batch = 0.0, B
            return no_new_ids(B)
        t0 = time.perf_counter()
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        token, finite = sample(logits, temperature, top_p, generator)
        done = torch.isin(token, stop)
        blocks: list[torch.Tensor] = []   # the new ids: a block of OUT_COLUMNS steps added as the steps reach it

        def keep(token: torch.Tensor, n: int) -> None:   # token: the new ids of step n (0-based)
            if n % OUT_COLUMNS == 0:
                blocks.append(torch.empty(B, min(OUT_COLUMNS, max_new_tokens - n), dtype=torch.long,
                                          device=self.device))
            blocks[-1][:, n % OUT_COLUMNS] = token

        keep(token, 0)
        stream, stopped, made = _TokenStream(self.device), [False] * B, [0] * B
        stream.push(torch.where(finite, token, NOT_FINITE))

        def hand_on(rows: list[list[int]]) -> None:
            for row in rows:
                for b, t in enumerate(row):
                    if not stopped[b]:
                        if t == NOT_FINITE:   # the steps still queued on the device are dropped with the engine's hold
                            raise LogitsNotFinite(f"at new token {made[b] + 1} of prompt {b + 1}")
                        stopped[b], made[b] = t in stop_ids, made[b] + 1
                        if on_token:
                            on_token(b, t)

        n, timed_from = 1, 1
        hand_on(stream.landed())
        with self._small_model_threads(), host_allocation(f"a decode step's activations (batch {B})",
                                                          self.decode_less):
            while n < max_new_tokens and not all(stopped):
                if n == 2:  # the first step is in: time the rest (GenerationStats.decode_tps)
                    _sync(self.device)
                    t0, timed_from = time.perf_counter(), 2
                step.tokens.copy_(token)
                logits = step.step()
                drawn, finite = sample(logits, temperature, top_p, generator)
                token = torch.where(done, token, drawn)
                done |= torch.isin(token, stop)
                step.positions += 1
                keep(token, n)
                stream.push(torch.where(finite, token, NOT_FINITE))   # a stopped sequence's flag is never read
                n += 1
                hand_on(stream.landed())
        hand_on(stream.landed(wait=True))
        _sync(self.device)
        self.stats.decode_seconds = time.perf_counter() - t0
        self.stats.steps, self.stats.timed_steps, self.stats.batch = n - 1, n - timed_from, B
        self.stats.new_tokens = sum(made)
        # columns timed_from.. of each sequence
        self.stats.timed_tokens = sum(max(0, min(m, n) - timed_from) for m in made)
        return torch.cat(blocks, dim=1)[:, :n].cpu()


class Engine(Runner):
    """A model on one device, with state buffers allocated once by its MemoryPlan."""

    @property
    def decode_less(self) -> str:
        return ", or ".join(self._less())

    def _less(self) -> tuple[str, ...]:
        """What asks this engine for less memory, as the Python API's caller sets it (run has no --batch)."""
        return f"lower {self._context_argument()}", "give fewer prompts"

    def __init__(self, config: KimiLinearConfig, read: Callable[[str], torch.Tensor], device: torch.device,
                 dtype: torch.dtype, context: int, batch: int, biased_router_weights: bool = False,
                 packed: Packed | None = None, kernels: str = "torch",
                 stored_schemes: dict[str, QuantScheme] | None = None, mla_cache_dtype: torch.dtype | None = None,
                 cuda_graph: bool = True, tokenizer: Tokenizer | None = None, context_name: str = "context",
                 needed_context: int = 1, all_logits: bool = False, scale_dtypes: dict[str, torch.dtype] | None = None):
        """`read(name)` gives a canonical tensor (e.g. Checkpoint.get), `packed(name)` a quantized weight's stored
        parts (Checkpoint.packed), `stored_schemes` how each packed weight is stored and `scale_dtypes` in which
        dtype its scales are (Checkpoint.scale_dtypes; where not given, the plan takes the compute dtype); `kernels`
        picks PyTorch or Triton (auto: Triton on CUDA). The decode step is captured in a CUDA graph with Triton on CUDA.
        `tokenizer`: the folder's, whose stop tokens join config.json's in `stop_ids` (model_stop_ids).
        `context_name`: what the caller named the context (load: max_context), as a refusal names it.
        `needed_context`: the least context the prompts to come need (load's), where a refusal looks for one.
        `all_logits`: the plan holds forward's and forward_segments' logits of every position too (MemoryPlan's)."""
        refuse_non_bool(biased_router_weights, "biased_router_weights")
        refuse_non_bool(cuda_graph, "cuda_graph")
        refuse_non_bool(all_logits, "all_logits")
        self.config, self.device, self.dtype = config, device, dtype
        self.stop_ids = model_stop_ids(config, tokenizer)   # where generate stops unless told otherwise
        self.prefill_segment = PREFILL_SEGMENT  # prompt tokens per model call (the plan's workspace assumes this)
        self.triton = use_triton(kernels, device)
        self.model = KimiLinear(config, biased_router_weights=biased_router_weights)
        held = packed_choice(self.model, stored_schemes or {}, self.triton)
        self.fewer_bits = fewer_bits_hold_less(stored_schemes or {})
        cpu_forms = cpu_forms_bound(device, dtype, self.triton)
        self.weight_bytes = weight_bytes(config, dtype, HeldPacked(held, scale_dtypes), decode_copies=cpu_forms)
        self.weights_held = 0    # bytes of weights bound (what a resize on the CPU adds back to what the host has)
        self.state = None
        if any(scheme.kind == "nf4" for scheme in (stored_schemes or {}).values()):
            load_nf4_reader()   # before the plan measures the host: what its import maps is not the plan's
        self._plan_state(context, batch, mla_cache_dtype or dtype, context_name,   # refused before any weight is read
                         all_logits, needed_context)
        with self._device_memory("loading the model"):
            with host_allocation(f"the weights ({size_text(sum(self.weight_bytes.values()))})"), \
                    large_blocks_mapped(LOAD_THRESHOLD) if device.type == "cpu" else nullcontext():
                bind(self.model, read, packed, held, device, dtype, self.triton)
            if cpu_forms:   # what bind built, which the plan counts from here on (the checkpoint's values decide it)
                self.weight_bytes = {**self.weight_bytes, DECODE_COPIES: copy_bytes(self.model)}
                self.plan = replace(self.plan, weight_bytes=self.weight_bytes)
            self.weights_held = sum(self.weight_bytes.values())
            self.cuda_graph = cuda_graph and self.triton and device.type == "cuda"   # for each batch that captures
            # the plan checked above, not again: reading the weights (and the threads that did) took more of the
            # host than the weights' own bytes, and a second figure would refuse what the first just named as fitting
            self._allocate_state()
        self.stats = GenerationStats()

    def _plan_state(self, context: int, batch: int, mla_cache_dtype: torch.dtype, context_name: str,
                    all_logits: bool, needed_context: int = 1) -> None:
        """Size the state for this context and batch (self.plan, holding `all_logits` as MemoryPlan's); refuse what
        does not fit, naming the context as the caller did (`context_name`) with --max-context: a smaller one only
        where it holds `needed_context`."""
        check_e4m3_cache_readable(self.config, self.device, self.dtype, self.triton, mla_cache_dtype)
        if context > self.config.model_max_length:
            raise KLError(f"{argument(context_name, '--max-context', context)} is over the model's "
                          f"{self.config.model_max_length_name} {self.config.model_max_length:,}; lower it")
        host = None    # on the CPU: what the host, and the process's limits, leave it (what it holds back in)
        held = self._bytes_held()   # a resize's old state, freed once the new plan is taken
        unmapped = 0   # on the CPU: the stacks of torch's workers, where there was no room to start them
        if self.device.type == "cpu":
            unmapped = start_intra_op_threads()
        if self.device.type == "cuda":
            limit = device_room(self.device, held)
        elif (host := self._host_room(held, unmapped)) is not None:
            limit = host.available
        else:
            limit = None
        plan = MemoryPlan(self.config, batch=batch, context=context, weight_bytes=self.weight_bytes,
                          act_dtype=self.dtype, mla_cache_dtype=mla_cache_dtype, memory_limit=limit,
                          torch_decode_attention=not self.triton, all_logits=all_logits)
        if limit is not None and plan.total > limit:
            said = f"the plan needs {self._beside_room(plan.total, limit, host)}"
            if unmapped and (room := self._host_room(held, 0)) is not None and plan.total <= room.available:
                raise StacksTakeTheRoom(said, unmapped, self._more_room(host, plan.total))   # no smaller plan needed
            def more_room(needed: int) -> str | None:   # what gives a plan of `needed` bytes room: the stacks first
                remedy = self._more_room(host, needed)
                return with_fewer_stacks(unmapped, remedy) if unmapped else remedy

            fitting = replace(plan, memory_limit=int(limit * NAMED_FIT_SHARE))
            fit = fitting.largest_context()
            if fit < needed_context <= context and fitting.total_for(needed_context) <= fitting.memory_limit:
                fit = needed_context   # fits, though the multiple of 64 below it is all largest_context names
            if fit and fit >= needed_context:   # or more room than now (_more_room) for the context asked
                raise ContextDoesNotFit(said, fit, fit > needed_context, argument(context_name, '--max-context'),
                                        more_room(plan.total))
            if plan.weights > limit or (not fit and batch == 1):   # no smaller batch or context holds less
                raise WeightsDoNotFit(said, plan.weights, plan.weights > limit, self.fewer_bits,
                                      more_room(plan.total_for(1)))
            # the least the prompts take: the plan at their context, which more room than now must hold
            if not fit:
                raise BatchDoesNotFit(said, batch, f"lower {argument('batch', '--batch')}",
                                      more_room(plan.total_for(needed_context)))
            raise PromptsDoNotFit(said, needed_context, fit, batch, "give fewer prompts (a smaller batch)",
                                  argument("max_new_tokens", "--max-new-tokens"),
                                  more_room(plan.total_for(needed_context)))
        self.plan, self.context_name = plan, context_name

    def _host_room(self, held: int, unmapped: int) -> HostMemory | None:
        """What the host, and the process's limits, leave a plan on the CPU (None where it is not known): `unmapped`
        bytes that torch's workers are still to map counted as used, the allocator's free blocks as room for the
        weights still to read, and `held`, this engine's bytes that the plan replaces, as room."""
        if (host := host_memory(unmapped=unmapped)) is None:
            return None
        host = host.for_weights(sum(self.weight_bytes.values()) - self.weights_held)
        return replace(host, available=host.available + held)

    def _bytes_held(self) -> int:
        """The bytes this engine holds on its device: its weights, and its plan's state and cache once allocated."""
        return self.weights_held + (self.plan.state_bytes + self.plan.mla_cache_bytes if self.state is not None else 0)

    def _more_room(self, host: HostMemory | None, needed: int) -> str | None:
        """What gives a plan of `needed` bytes more room than it has, where more would hold it: on the host, its
        bound's remedy where the host's memory in all would (HostMemory.remedy_for); on a GPU, free_the_gpu's."""
        return host.remedy_for(needed) if host is not None else free_the_gpu(self.device, needed)

    def _device_memory(self, doing: str):
        """device_allocation around `doing` on this engine's device, naming its plan and what asks for less."""
        return device_allocation(doing, self.plan.total, self._less(), self.fewer_bits)

    def _context_argument(self) -> str:
        """The planned context as the caller last named it (load's max_context, resize's context) with its flag."""
        return argument(self.context_name, "--max-context")

    def _allocate_state(self) -> None:
        """The plan's state and cache, allocated once per plan (the device's cached free blocks released first, so
        the plan's figure is what is reserved); decode steps are captured anew for it."""
        self._steps: dict[int, DecodeStep] = {}
        self._graph_memory: GraphMemory | None = None   # made with the first step captured
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.state = self.plan.allocate(self.device)

    def resize(self, context: int, batch: int, mla_cache_dtype: str | torch.dtype | None = None) -> None:
        """A new memory plan for the same weights: state and cache reallocated (once), decode steps re-captured.
        Arguments as load's max_context, batch and mla_cache_dtype (None: the cache's dtype now; the compute dtype
        by name goes back to the default cache). A plan refused
        leaves the engine as it was."""
        with self._holding("resize"):
            context, batch, mla_cache_dtype = check_plan_args(context, batch, mla_cache_dtype, "context", self.dtype)
            self._plan_state(context, batch, mla_cache_dtype or self.plan.mla_cache_dtype,   # the old state free
                             "context", self.plan.all_logits)
            self._steps, self.state = {}, None   # freed before the new one is allocated
            self._allocate_state()

    # ---- checks ----------------------------------------------------------------------------------
    def _as_batch(self, input_ids) -> torch.Tensor:
        ids = as_batch(input_ids, self.config.vocab_size)
        self._check_batch(ids.shape[0])
        return ids.to(self.device)

    def _check_batch(self, batch: int) -> None:
        if batch > self.plan.batch:
            raise KLError(f"{batch} sequences are over the planned batch {self.plan.batch}; load with "
                          f"{argument('batch', '--batch', batch)}")

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse up front a request that would run past the planned context (max_new_tokens 0: a prefill's)."""
        need = prompt_tokens + max_new_tokens
        if need <= self.plan.context:
            return
        new = f" plus {argument('max_new_tokens', '--max-new-tokens', max_new_tokens)}" if max_new_tokens else ""
        limit, limit_name = self.config.model_max_length, self.config.model_max_length_name
        if need > limit:   # no plan holds it: raising the context would only be refused in turn
            raise KLError(f"the prompt ({counted(prompt_tokens, 'token')}){new} is over the model's {limit_name} of "
                          f"{counted(limit, 'token')}; shorten the prompt"
                          + (" or make fewer new tokens" if max_new_tokens else ""))
        raise KLError(f"the prompt ({counted(prompt_tokens, 'token')}){new} needs a context of "
                      f"{counted(need, 'token')} but the memory plan holds {self.plan.context:,}; raise "
                      f"{self._context_argument()} to {need} or more, or shorten the prompt")

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor, state, all_logits: bool, needed: int,
                 progress: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
        """Run [B, T] prompts (one length) through fresh `state` rows, segment by segment, yielding the logits of
        every position [B, R, vocab] fp32, R positions at a time in order (all_logits), or only the last token's
        [B, 1, vocab]. R positions make LOGIT_ROWS rows (at least one position), whose logits a plan holding
        all_logits counts (MemoryPlan.logit_rows_for), where a segment's whole would be tokens x vocab. `needed`: the
        context the call needs (its longest prompt, and the tokens to come), which an allocator's refusal names where
        the plan's is larger (a smaller cache leaves more room); a plan of just that has no smaller. `progress(n)`:
        n more prompt tokens done (called once the device has finished the segment, so it costs a sync per segment).
        Each segment makes the same shapes (MLA's key blocks are fixed), so the allocator reuses its blocks; a prefill
        of several segments hands its cache back at the end. A segment runs PREFILL_ROWS prompts at a time, as the plan
        sizes its workspace: sized B times, it refused batches that ran in a fraction of it."""
        state.reset()
        what = f"a prefill's activations ({counted(ids.shape[1], 'token')})"   # an allocator's refusal names it
        less = "give a shorter prompt" + (f", or lower {self._context_argument()} to {needed}"
                                          if needed < self.plan.context else "")
        positions = max(1, LOGIT_ROWS // ids.shape[0])
        for start in range(0, ids.shape[1], self.prefill_segment):
            seg = ids[:, start:start + self.prefill_segment]
            last = start + seg.shape[1] == ids.shape[1]
            with self._prefill_allocations(what, less):
                out = None   # filled in place, not pieces joined (twice the rows)
                for b in range(0, ids.shape[0], PREFILL_ROWS):
                    rows = self.model.hidden_states(seg[b:b + PREFILL_ROWS], state.rows(b, b + PREFILL_ROWS), start)
                    if not all_logits:
                        if not last:
                            continue
                        rows = self._checked_logits(rows[:, -1:])
                    if out is None:
                        out = rows if ids.shape[0] == PREFILL_ROWS else rows.new_empty(ids.shape[0], *rows.shape[1:])
                    if out is not rows:
                        out[b:b + PREFILL_ROWS] = rows
            if progress is not None:
                _sync(self.device)
                progress(seg.numel())
            if last and self.device.type == "cuda" and ids.shape[1] > self.prefill_segment:
                torch.cuda.empty_cache()
            if not all_logits:
                if last:
                    yield out
                continue
            for at in range(0, seg.shape[1], positions):
                with self._prefill_allocations(what, less):
                    logits = self._checked_logits(out[:, at:at + positions])
                yield logits

    @contextmanager
    def _prefill_allocations(self, what: str, less: str) -> Iterator[None]:
        """Around a prefill's work: the host allocator's refusal named (`what`, `less`), on the CPU its temporaries
        given back to the system when freed, not kept (runtime/host_malloc.py), and autocast off."""
        given_back = large_blocks_mapped() if self.device.type == "cpu" else nullcontext()
        with host_allocation(what, less), given_back, autocast_off(self.device):
            yield

    def _checked_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits [B, R, vocab] fp32 of the last block's rows `hidden` [B, R, hidden]; KLError where any is NaN or
        infinite -- a sync, which handing the logits on needs anyway. Their least and largest tell it (aminmax passes
        NaN on), where torch.isfinite made 1.5x the logits in temporaries, which the plan would have to count."""
        logits = self.model.logits(hidden)
        if not bool(torch.isfinite(torch.stack(torch.aminmax(logits))).all()):
            raise LogitsNotFinite("for the prompt")
        return logits

    def forward(self, input_ids) -> torch.Tensor:
        """The prefill path over whole sequences of one length: input_ids [B, T] -> logits [B, T, vocab] fp32, which
        no plan counts (B x T x vocab x 4 bytes): where they do not fit beside the prefill's workspace (forward_
        segments', _forward_workspace) the call is refused at once, naming forward_segments, which hands them on a few
        positions at a time within the plan. Checked, not only allocated first: logits the allocator took left the
        prefill to run out part-way, its line naming a shorter prompt or context (8,000 tokens of the bundled model
        under ulimit -d), where forward_segments ran."""
        ids = self._forward_ids(input_ids)
        B, T, V = *ids.shape, self.config.vocab_size
        what = f"forward's logits ([{B}, {T:,}, {V:,}] fp32, {size_text(B * T * V * 4)})"
        less = ("give fewer tokens", "read them a few positions at a time with forward_segments")
        self._refuse_past_room(f"{what} with a prefill's workspace", B * T * V * 4 + self._forward_workspace(B, T),
                               f"{less[1]}, or {less[0]}", T)
        with host_allocation(what, " or ".join(less)), device_allocation(what, self.plan.total, less, False):
            logits = torch.empty(B, T, V, dtype=torch.float32, device=self.device)
        at = 0
        for rows in self._held_segments(ids):   # filled in place, not pieces joined (twice the logits)
            logits[:, at:at + rows.shape[1]] = rows
            at += rows.shape[1]
        return logits

    def _forward_workspace(self, batch: int, tokens: int) -> int:
        """The prefill's workspace of forward_segments over `batch` sequences of `tokens` tokens: the plan's with
        all_logits, for the sequences given -- each one's last hidden rows of a segment are held until the segment's
        logits are made."""
        return replace(self.plan, batch=batch, all_logits=True).prefill_workspace_for(tokens)

    def _refuse_past_room(self, what: str, needed: int, less: str, tokens: int) -> None:
        """KLError where `what`, `needed` bytes for sequences of `tokens` tokens, is more than this process can still
        allocate on the device now, saying `less`, what asks for less; then a planned context of `tokens` where the
        cache that frees would make up the shortfall (the sequences' length, not the context, sets `needed`), and
        more room than now where it would hold what the engine holds with `needed` (_more_room)."""
        room = self._room_now()
        if room is None or needed <= room[0]:
            return
        available, host = room
        ways = [less]
        if needed - available <= self.plan.mla_cache_bytes - replace(self.plan, context=tokens).mla_cache_bytes:
            ways.append(f"lower {self._context_argument()} to {tokens}")
        if (remedy := self._more_room(host, self._bytes_held() + needed)) is not None:
            ways.append(remedy)
        raise KLError(f"{what} need {self._beside_room(needed, available, host)}; {', or '.join(ways)}")

    def _beside_room(self, needed: int, room: int, host: HostMemory | None) -> str:
        """"0.37 GB but cpu has 0.36 GB available under ...": `needed` bytes against the `room` the device has (on the
        CPU `host`'s, naming its bound), in bytes where the two would read alike (size_texts: "0.37 GB but cpu has
        0.37 GB" read as fitting)."""
        needs, has = size_texts(needed, room)
        return (f"{needs} but {self.device} has {has} "
                + ("free for this process" if host is None else f"available {host.bound}"))

    def _room_now(self) -> tuple[int, HostMemory | None] | None:
        """What this process can still allocate on the engine's device, and on the CPU the host's figures it comes
        from; None where it is not known (the host's, off Linux)."""
        if self.device.type == "cuda":
            return device_room(self.device, 0), None
        host = host_memory()
        return None if host is None else (host.available, host)

    def forward_segments(self, input_ids) -> Iterator[torch.Tensor]:
        """`forward` a few positions at a time: yields logits [B, R, vocab] fp32 for positions in order, R*B rows
        (LOGIT_ROWS, or B of one position each: the plan counts them), so a caller that moves each on (to the host,
        into a sum) never holds all T positions' logits on the device. The arguments are checked at once; the iterator
        holds the engine from its first rows until it is read to its end, closed or dropped: a call that writes the
        state meanwhile (generate, prefill, another forward...) is refused, since the later segments run on that
        state. On an engine whose plan does not hold them (load's all_logits), the logits' rows and each sequence's
        last hidden rows of a segment, which they are made from, are checked against the room it has now first."""
        ids = self._forward_ids(input_ids)
        B, T = ids.shape
        if not self.plan.all_logits:
            fewer = "give fewer sequences at a time" if B > 1 else "give fewer tokens"
            self._refuse_past_room(f"forward_segments' prefill workspace, the last hidden rows of a segment of "
                                   f"{counted(B, 'sequence')} of {counted(T, 'token')} and their logits a few "
                                   "positions at a time",
                                   self._forward_workspace(B, T), fewer, T)
        return self._held_segments(ids)

    def _forward_ids(self, input_ids) -> torch.Tensor:
        """forward's and forward_segments' input_ids checked: [B, T] on the device, within the plan."""
        self._check_idle("forward")
        ids = self._as_batch(input_ids)
        self.check_fits(ids.shape[1], 0)
        return ids

    def _held_segments(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """forward_segments' iterator, holding the engine while it is read (no stats of its own to reset)."""
        with self._holding("forward", SEGMENTS):   # its first segment may be read from a generation's callback
            yield from self._prefill(ids, self.state.rows(0, ids.shape[0]), all_logits=True, needed=ids.shape[1])

    def prefill(self, input_ids, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prefill whole sequences of one length, input_ids [B, T] -> the logits after each one's last token
        [B, vocab] fp32 (the cache then holds positions 0..T-1, ready for decode at T)."""
        with self._holding("prefill"):
            check_callbacks(progress=progress)
            ids = self._as_batch(input_ids)
            self.check_fits(ids.shape[1], 0)
            return self._last_logits(ids, self.state.rows(0, ids.shape[0]), ids.shape[1], progress)

    def _last_logits(self, ids: torch.Tensor, state, needed: int,
                     progress: Callable[[int], None] | None) -> torch.Tensor:
        """Prefill [B, T] into fresh `state` rows -> the logits after each one's last token [B, vocab] fp32 (`needed`:
        _prefill's)."""
        (last,) = self._prefill(ids, state, all_logits=False, needed=needed, progress=progress)
        return last[:, -1]

    # ---- decode ----------------------------------------------------------------------------------
    def decoder(self, batch: int) -> DecodeStep:
        """The decode step for the first `batch` sequences (captured once per batch size on CUDA + Triton).
        Capturing writes into the state: take it before prefilling. Refused while generate runs (its callbacks):
        the step is the one generate is running, or its capture would write the state generate is using. Steps of
        different batch sizes decode the same state rows and, captured, write their logits into one buffer: a step's
        logits hold until the next step of any batch size."""
        with self._holding("decoder"):
            n = as_number(batch, whole=True)
            if n is None or n < 1:
                raise KLError(f"decoder's batch {batch!r} should be a whole number >= 1")
            self._check_batch(n)
            return self._decoder(n)

    def _step_batch(self, step, max_new_tokens: int) -> int:
        if not any(step is mine for mine in self._steps.values()):
            raise KLError(f"decode_loop's step should be one this engine's decoder(batch) gave, got a "
                          f"{type(step).__name__}" + (" of another engine, or of its plan before a resize"
                                                      if isinstance(step, DecodeStep) else ""))
        if (last := int(step.positions.max())) + max_new_tokens > self.plan.context:
            raise KLError(f"decode_loop from position {last:,} with {argument('max_new_tokens', '--max-new-tokens')} "
                          f"{max_new_tokens} runs past the planned context of {self.plan.context:,}; make fewer "
                          f"tokens, or raise {self._context_argument()}")
        return step.tokens.shape[0]

    def _decoder(self, batch: int) -> DecodeStep:
        """decoder, for the generation that holds the engine."""
        if batch not in self._steps:
            graph = None
            if self.cuda_graph and capturable(self.model, batch):
                graph = self._graph_memory = self._graph_memory or GraphMemory(self.plan.batch)
            self._steps[batch] = DecodeStep(self.model, self.state.rows(0, batch), graph)
        return self._steps[batch]

    def decode_step(self, token: torch.Tensor, position) -> torch.Tensor:
        """One token per sequence: token [B, 1] or [B] at `position` (an int for all, or [B]) -> logits [B, vocab].
        Runs eagerly (the graph-captured step is `decoder(B)`)."""
        with self._holding("decode_step"):
            return self._decode_step(token, position)

    def _decode_step(self, token, position) -> torch.Tensor:
        """decode_step, holding the engine."""
        token = whole_numbers(token)
        if token.dim() not in (1, 2) or (token.dim() == 2 and token.shape[1] != 1) or token.shape[0] == 0:
            raise KLError(f"decode_step takes one token per sequence, [B] or [B, 1] ids with B >= 1, got shape "
                          f"{list(token.shape)}" + (" (a sequence's several tokens go through prefill)"
                                                    if token.dim() == 2 and token.shape[1] > 1 else ""))
        token = token.view(-1)
        self._check_batch(token.shape[0])
        check_id_range(token, self.config.vocab_size)
        positions = whole_numbers(position, "positions")
        if positions.dim() > 1 or (positions.dim() == 1 and positions.shape[0] != token.shape[0]):
            raise KLError(f"decode_step's position should be one int for all sequences or [B] = [{token.shape[0]}] "
                          f"positions, one a sequence, got shape {list(positions.shape)}")
        positions = positions.expand(token.shape[0])
        if not 0 <= int(positions.min()) <= int(positions.max()) < self.plan.context:
            raise KLError(f"position {position} is outside the planned context 0..{self.plan.context - 1}; give "
                          "positions in it, or plan a longer context (engine.resize, or load's max_context)")
        token, positions = token.to(self.device), positions.to(self.device)
        activations = f"a decode step's activations (batch {token.shape[0]})"
        with torch.inference_mode(), autocast_off(self.device), host_allocation(activations, self.decode_less):
            return self.model.decode(token, self.state.rows(0, token.shape[0]), positions)

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_ids: frozenset[int] | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 on_prefill: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prefill each prompt, then decode all together, each sequence at its own position; returns the new ids
        [B, n] (n <= max_new_tokens). `prompts`: [T] / [B, T] ids, or a list of id lists of different lengths.

        A sequence that emits a stop id is padded with it; generation ends when every sequence has stopped.
        `stop_ids`: token ids (any iterable of ints, as_stop_ids); default: the model's stop tokens, self.stop_ids
        (where `klconvert run` stops); frozenset() runs every sequence to max_new_tokens.
        `on_token(sequence, id)` receives each new id as it reaches the host (copied asynchronously);
        `on_prefill(n)` hears of each prefill segment done, n prompt tokens (for a progress bar). Neither may call
        back into this engine (generate, prefill, forward, decode_step, decoder, decode_loop, resize: a KLError), whose
        state generate is using.

        self.stats: the figures of the last call that completed; a call that fails (a bad argument, an exception from
        a callback, an interrupt) leaves them reset (GenerationStats()), never a failed call's partial figures.
        """
        with self._held("generate"):
            check_callbacks(on_token=on_token, on_prefill=on_prefill)
            return self._generate(prompts, *check_generate_args(max_new_tokens, temperature, top_p, seed),
                                  as_stop_ids(self.stop_ids if stop_ids is None else stop_ids, self.config.vocab_size),
                                  on_token, on_prefill)

    def _generate(self, prompts, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                  stop_ids: frozenset[int], on_token: Callable[[int, int], None] | None,
                  on_prefill: Callable[[int], None] | None) -> torch.Tensor:
        """generate with its arguments checked, holding the engine."""
        seqs = self._as_prompts(prompts)
        B = len(seqs)
        longest = max(len(s) for s in seqs)
        self.check_fits(longest, max_new_tokens)
        self.stats = GenerationStats(prompt_tokens=sum(len(s) for s in seqs), batch=B)
        generator = sampling_generator(seed, self.device)
        step = self._decoder(B) if max_new_tokens > 0 else None  # none to capture when only prefilling
        t0 = time.perf_counter()
        with self._small_model_threads():
            last = torch.cat([self._last_logits(s.view(1, -1), self.state.rows(b, b + 1),
                                              longest + max_new_tokens, on_prefill)
                              for b, s in enumerate(seqs)])                     # [B, vocab]
        if step is not None:
            step.positions.copy_(torch.tensor([len(s) for s in seqs], device=self.device))
        _sync(self.device)
        self.stats.prefill_seconds = time.perf_counter() - t0
        if step is None:  # the prompts through the model (their prefill timed), nothing to decode
            return no_new_ids(B)
        return self._decode_loop(step, last, max_new_tokens, temperature, top_p, generator, stop_ids, on_token)

    def _as_prompts(self, prompts) -> list[torch.Tensor]:
        seqs = as_prompts(prompts, self.config.vocab_size)
        self._check_batch(len(seqs))
        return [s.to(self.device) for s in seqs]


def device_and_dtype(device: str | torch.device | None, dtype: torch.dtype | str | None
                     ) -> tuple[torch.device, torch.dtype]:
    """load's device (checked_device; default: cuda when torch sees a GPU, else cpu) and compute dtype (one of
    COMPUTE_DTYPES, by name or dtype; default: DEFAULT_DTYPES' for the device), KLError for what the runtime does not
    run."""
    device = checked_device(device)
    if dtype is None:
        return device, DEFAULT_DTYPES[device.type]
    named = COMPUTE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if named not in COMPUTE_DTYPES.values():
        raise KLError(f"{argument('dtype', '--dtype', dtype)}: choose {' or '.join(COMPUTE_DTYPES)}")
    return device, named


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         max_context: int = 4096, batch: int = 1, biased_router_weights: bool = False,
         kernels: str = "auto", mla_cache_dtype: str | torch.dtype | None = None, cuda_graph: bool = True,
         needed_context: int = 1, all_logits: bool = False) -> Engine:
    """Open, check and bind a Kimi Linear checkpoint folder (`tiny`: the bundled model); allocate its memory plan
    once. The folder's tokenizer, where it has one, is read (and checked) for the model's stop tokens (stop_ids).

    kernels: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch". mla_cache_dtype: the latent cache's
    dtype (default: the compute dtype; "float8_e4m3fn" halves it, with one fp32 scale per cached row).
    needed_context: the least context the prompts to come need (the longest plus max_new_tokens), where known: a
    plan past the memory is then refused as holding no such context, not with a smaller max_context to try.
    all_logits: the plan holds forward's and forward_segments' logits of every position (eval's) and the last hidden
    rows they are made from, not only generate's last logits, so that a batch or context they do not fit is refused
    before any weight is read; without it, a forward is checked against the room the device has when called."""
    device, dtype = device_and_dtype(device, dtype)
    max_context, batch, mla_cache_dtype = check_plan_args(max_context, batch, mla_cache_dtype, "max_context", dtype)
    if (needed := as_number(needed_context, whole=True)) is None or needed < 1:
        raise KLError(f"needed_context={shown(needed_context)} should be a whole number of at least 1")
    checkpoint = Checkpoint(resolve_model(path))
    schemes = {n: s.scheme for n, s in checkpoint.sources.items() if isinstance(s, QuantizedSource)}
    tokenizer = check_tokenizer_if_any(checkpoint.folder, checkpoint.config)   # for its stop tokens
    engine = Engine(checkpoint.config, checkpoint.get, device, dtype, max_context, batch, biased_router_weights,
                    packed=checkpoint.packed, kernels=kernels, stored_schemes=schemes, mla_cache_dtype=mla_cache_dtype,
                    cuda_graph=cuda_graph, tokenizer=tokenizer, context_name="max_context", needed_context=needed,
                    all_logits=all_logits, scale_dtypes=checkpoint.scale_dtypes())
    checkpoint.refuse_changed()   # every weight is bound now, and none from a shard rewritten while open
    return engine
