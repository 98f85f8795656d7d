"""The EAGLE decoding loop: draft a tree, verify it in one target forward, accept, compact, repeat.

One round for a batch of ``B`` sequences (DESIGN §3)::

    draft tree     head over the frontier, level by level (dynamic: EAGLE-2 top-k expansion and
                   global rerank; static: EAGLE-1 rank paths; chain: top-1)   -> candidates [B, n]
    build tree     eagle_kernels.build_tree -> tree mask [B, n, n], positions, retrive_* arrays
    verify         target forward over the n tree tokens with tree attention (K/V written in place)
    accept         verify_tree_greedy (T = 0) or tree_speculative_sampling (T > 0, lossless)
    compact        compact_kv_cache: accepted slots -> contiguous positions; seqlens += accepted + 1
    draft update   head over (target feature, next token) of every newly committed position

Slot 0 of a tree (the root) is the last emitted token; its K/V enters the target's cache with the
verify forward. The draft's cache holds committed positions only: the tree levels are written past
its committed length and overwritten by the next draft update.
"""

from __future__ import annotations

import inspect
import math
import struct
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

import eagle_kernels
from eagle import rng
from eagle._args import as_number, stop_ids
from eagle.adaptive import PLAIN, AutoSpeculation
from eagle.models.cpu_packed import packing_generation
from eagle.models.cuda_graph import BufferPool, on_side_stream, replay, synchronize_stream
from eagle.models.cuda_graph import capture as cuda_graph_capture
from eagle.models.draft import DraftHead, Eagle2Head
from eagle.models.generate_plain import (
    NONFINITE_MESSAGE,
    argmax_checked,
    argmax_checked_live,
    cpu_decode_step_args,
    first_nonfinite_accepted_row,
    pad_prompts,
    warp_param_tensors,
    zero_nonfinite_rows,
)
from eagle.models.kv_cache import KVCache
from eagle.models.llama import LlamaModel, ModelOutput, rope_tables
from eagle.tree import TreeConfig, expand_level, expand_root, select_candidates
from eagle_kernels.tree_speculative_sampling import raise_on_status


def _scalar(name: str, value, integral: bool) -> float | int:
    """``value`` (a 0-d tensor taken as the number it holds) as :func:`eagle._args.as_number`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0:
        value = value.item()
    return as_number(name, value, integral=integral, hint=" (one for the whole batch)")


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (inf beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


TOP_K_KEEPS_ALL = 2**31 - 1  # more than any vocabulary: the same as no top-k filter


@dataclass(frozen=True)
class SamplingParams:
    """Hugging Face warper semantics (temperature, then top-k, top-p, min-p); temperature 0 = greedy.

    The defaults filter nothing. transformers' ``generate(do_sample=True)`` differs there: it applies
    ``top_k=50`` unless told otherwise, and the sampling settings of a checkpoint's
    ``generation_config.json``; pass those values explicitly to sample what it samples.
    ``top_k`` above 2**31 - 1 keeps every token of any vocabulary, as a ``top_k`` >= V does.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        # numpy and 0-d torch scalars become Python numbers; anything else is refused by name
        for name, integral in (("temperature", False), ("top_k", True), ("top_p", False), ("min_p", False)):
            object.__setattr__(self, name, _scalar(name, getattr(self, name), integral))
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0, or -1 (0 and -1 disable it), got {self.top_k}")
        if self.top_k == -1:  # vLLM's and SGLang's "off"
            object.__setattr__(self, "top_k", 0)
        # (the kernels take top_k as int64: a larger int overflowed with a message naming no argument)
        object.__setattr__(self, "top_k", min(self.top_k, TOP_K_KEEPS_ALL))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        # the warpers take these in float32: a positive value that rounds to 0 there would make a
        # sampled run greedy (temperature) or be refused row by row mid-run (top_p)
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value > 0 and _to_float32(value) == 0:
                raise ValueError(
                    f"{name}={value} rounds to 0 in float32, the precision the sampling runs in"
                    + ("; pass 0 for greedy decoding" if name == "temperature" else "")
                )
        if math.isinf(_to_float32(self.temperature)):
            raise ValueError(
                f"temperature={self.temperature} overflows float32, the precision the sampling runs in"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_key(self) -> SamplingParams:
        """These parameters as a cache key: greedy is greedy whatever the (unused) filters say."""
        return SamplingParams() if self.greedy else self


@dataclass
class RoundTimes:
    """Seconds spent per phase, summed over rounds (filled only when profiling). Where the rest of a
    round after the verify forward is one C++ call (CPU, EAGLE-1/2 head, greedy or sampled:
    :meth:`SpeculativeDecoder._cpu_verify_update`), ``accept`` holds all of it and ``compact`` /
    ``draft_update`` stay 0."""

    draft: float = 0.0
    verify: float = 0.0
    accept: float = 0.0
    compact: float = 0.0
    draft_update: float = 0.0
    other: float = 0.0
    graph: float = 0.0  # whole rounds replayed from a CUDA graph (not split into phases)
    rounds: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            k: getattr(self, k)
            for k in ("draft", "verify", "accept", "compact", "draft_update", "other", "graph")
        }


@dataclass
class Emission:
    """Tokens emitted by one forward (the prefill, a round, a plain step) or one chunk of plain steps
    (``run(plain_chunk=...)``) for some rows of the batch."""

    rows: list[int]  # original batch rows
    tokens: list[list[int]]  # new tokens of each of those rows (EOS included, budget respected)
    finished: list[bool]
    # The run's own record, shared by all its emissions: tokens emitted per forward after the prefill
    # for every batch row so far, and its speculative="auto" policy (None without). A caller reads
    # these, not the decoder's accept_lengths() / last_auto, which follow the most recently started
    # run: another thread's run on the same decoder replaces them.
    accept_lengths: dict[int, list[int]] = field(default_factory=dict, repr=False)
    auto: AutoSpeculation | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _StaticLevel:
    """One draft level of a static tree, with its index tensors prepared on the device."""

    slots: list[int]  # tree slots expanded at this level
    parents: list[int]  # their parent slots
    past: int  # tree rows fed to the draft before this level
    token_columns: torch.Tensor  # [L] int64: columns of the top-k table holding their tokens
    mask: torch.Tensor  # [L, past + L] bool: their ancestors among the fed rows
    position_offsets: torch.Tensor  # [1, L] int64: depth - 1 (added to the root's position)


@dataclass
class _RoundGraph:
    """A captured round of one batch state (it reads and updates that state's tensors and caches in
    place): replaying it runs the whole round on the GPU."""

    graph: torch.cuda.CUDAGraph
    new_tokens: torch.Tensor  # [b, steps] graph-owned outputs, rewritten by every replay
    counts: torch.Tensor  # [b]
    steps: int  # depth + 1: the most positions a round commits per sequence
    rows: int  # tree rows a round writes past each cache's committed length


@dataclass
class _Batch:
    """Per-row state of the active (unfinished) sequences; tensors are indexed by active row."""

    rows: torch.Tensor  # [b] int64, original row ids
    root: torch.Tensor  # [b] int64, last emitted token (tree root of the next round)
    root_hidden: torch.Tensor | None  # [b, H] draft output at the last committed position
    root_logits: torch.Tensor | None  # [b, Vd] draft logits there (both None while the draft's
    # prefill waits: speculative="auto", see _PendingDraft)
    emitted: list[int]  # tokens emitted so far (host side: the loop syncs once per round anyway)
    seeds: torch.Tensor  # [b] int64, RNG stream of each row
    draws: torch.Tensor  # [b] int64, RNG counter
    target_cache: KVCache
    draft_cache: KVCache
    # original row -> tokens emitted by each round; owned by the run (shared by its _Batch copies)
    accept_lengths: dict[int, list[int]]
    # [] bool on the device: a target forward produced NaN/inf logits (CUDA: checked at the round's
    # one host synchronisation instead of right away)
    nonfinite: torch.Tensor | None = None
    # [b] bool on the device: the row's tokens are still emitted (False: finished, frozen in the batch,
    # see _Frozen); NaN/inf in a frozen row's logits does not stop the run. Changed in place (graphs)
    live: torch.Tensor | None = None
    # [b] int64, per row: the first position of the last round's accepted path whose row of the
    # target's logits held NaN/inf (>= the round's steps: none), checked against what the row emits by
    # _emit; on CPU None where no row did. On the device in place (a captured graph writes it)
    nonfinite_from: torch.Tensor | None = None
    graph: _RoundGraph | None = None  # CUDA graphs: this state's captured round
    warm: bool = False  # CUDA graphs: its first round ran eagerly (kernels compiled, workspaces made)
    # speculative="auto": (target feature [b, 1, Hf], next token [b]) of each plain step not yet fed to
    # the draft (it catches up in one forward before the next round: :meth:`SpeculativeDecoder._catch_up`)
    backlog: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pending_draft: _PendingDraft | None = None
    # CPU: (packing generation, root_hidden, root_logits, the one-call round's op and arguments or
    # None where it does not apply), built at a run's first round (SpeculativeDecoder._cpu_round)
    cpu_round: tuple | None = None
    cpu_plain_step: tuple | None = None  # (packing generation, llama_decode_step's arguments or None)


@dataclass
class _PendingDraft:
    """The draft's prefill over the prompts, left for later: a speculative="auto" run leaves it to its
    first round (:meth:`SpeculativeDecoder._catch_up`), whose measured time then includes it (it is a
    cost of speculating: ~5% of a run at batch 16 with 200-token prompts on CPU), and never runs it
    if it decodes plainly throughout."""

    out: ModelOutput  # the target's prefill (its features)
    shifted: torch.Tensor  # [b, P] the token after each position (the first new one after the last)
    last: torch.Tensor  # [b, 1] each prompt's last position
    lengths: torch.Tensor  # [b] prompt lengths
    max_prompt: int

    def select(self, keep: torch.Tensor) -> _PendingDraft:
        out = self.out
        layers = None if out.layer_hidden is None else tuple(h[keep] for h in out.layer_hidden)
        return _PendingDraft(
            ModelOutput(out.hidden[keep], None, layers),
            self.shifted[keep],
            self.last[keep],
            self.lengths[keep],
            self.max_prompt,
        )


@dataclass
class _Frozen:
    """Finished rows kept in a batch (CUDA graphs: the batch state, and so its graph, stays the same).

    Every round still computes them, but nothing they compute is emitted, and after each round their
    committed lengths go back to 0: a row that reached its budget may have committed up to ``depth``
    tokens past it (accepted, not emitted), and a round's tree past that would not fit its caches
    (sized for prompt + budget + one tree); at 0 it fits, and its attention reads nothing."""

    rows: list[int]  # batch indices of the frozen rows
    active: list[int]  # batch indices of the others
    index: torch.Tensor  # [f] int64 on the device: ``rows``
    target_lengths: torch.Tensor  # [f] int32 zeros: their committed lengths while frozen
    draft_lengths: torch.Tensor  # [f] int32 zeros

    @classmethod
    def of(cls, s: _Batch, rows: list[int]) -> _Frozen:
        rows = sorted(rows)
        index = torch.tensor(rows, dtype=torch.int64, device=s.root.device)
        frozen = set(rows)
        active = [i for i in range(len(s.emitted)) if i not in frozen]
        zeros = torch.zeros(len(rows), dtype=torch.int32, device=s.root.device)
        frozen = cls(rows, active, index, zeros, zeros)
        s.live.index_fill_(0, index, False)  # in place: a captured graph reads it
        frozen.hold(s)  # at once: the next round must fit
        return frozen

    def hold(self, s: _Batch) -> None:
        """Set the frozen rows' committed lengths back to 0 (in place: graph-safe)."""
        s.target_cache.seqlens.index_copy_(0, self.index, self.target_lengths)
        s.draft_cache.seqlens.index_copy_(0, self.index, self.draft_lengths)


# Reused buffers are allocated for prompt + new tokens rounded up to this many positions, so that later
# runs with slightly longer prompts still fit (the attention kernels' cost depends on the committed
# length, not on the allocation).
_POOLED_CACHE_ALIGN = 256
# speculative="auto": positions per sequence in one forward of the draft catching up after plain steps
_CATCH_UP_ROWS = 256
# _Batch.nonfinite_from before any round: no row of the target's logits held NaN/inf
_NO_NONFINITE_ROW = 2**62


def _takes_plain_chunks(policy: AutoSpeculation) -> bool:
    """Whether ``policy`` can run plain steps in chunks: its ``record`` takes ``forwards`` and its
    ``plain_forwards_ahead`` speaks for its ``next_mode`` (a subclass written before chunks may
    override ``next_mode`` alone, and the base class's phases, which it does not drive, would size
    the chunks)."""
    cls = type(policy)
    if "forwards" not in inspect.signature(policy.record).parameters:
        return False
    own_modes = cls.next_mode is not AutoSpeculation.next_mode
    return not own_modes or cls.plain_forwards_ahead is not AutoSpeculation.plain_forwards_ahead


class SpeculativeDecoder:
    """EAGLE decoding of one target with one draft head (see the module docstring)."""

    def __init__(
        self,
        target: LlamaModel,
        head: DraftHead,
        tree: TreeConfig | eagle_kernels.StaticTree,
        *,
        cuda_graph: bool = False,
        buffer_pool: BufferPool | None = None,
    ) -> None:
        """``cuda_graph``: replay each round (draft, verify, accept, compact, draft update) from a CUDA
        graph captured once per batch composition, instead of launching its kernels one by one from
        Python; needs a CUDA target. Capture is best-effort: if it fails the run continues eagerly with
        a warning (the tokens are the same either way).

        With ``cuda_graph`` the full batch's buffers (both KV caches, the round's state) and its captured
        graph outlive the run: the next run with the same batch size and sampling parameters whose
        prompt + new tokens fit them prefills into them and replays the graph from its first round, with
        no capture (what serving stacks do per batch size). The :attr:`kept_batch_states` (default 4)
        most recently used (batch size, sampling) combinations are kept; :meth:`release_buffers` frees
        them. ``buffer_pool``: keep them in this pool, shared with other decoders (an
        :class:`eagle.EagleModel` shares one among its trees, so its limit bounds all of them together);
        by default the decoder has its own. Rows that finish before the others (EOS) stay in the batch,
        frozen, so the captured graph keeps replaying (:attr:`keep_finished_rows`; without graphs they
        are dropped)."""
        if cuda_graph and target.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA target, got one on {target.device}")
        self.target, self.head = target, head
        self.cuda_graph = cuda_graph
        self._graph_failed = False
        # Rows that finish before the others: frozen, and dropped from the batch once a quarter of it
        # is finished (eager: they stop costing compute; see _retire_finished), or, with CUDA graphs,
        # kept frozen (a smaller batch would be a new batch state, and each new state costs an eager
        # round plus a capture: more than the frozen rows' share of a replay).
        self.keep_finished_rows = cuda_graph
        # (this decoder's tag, batch size, sampling) -> the buffers of a finished run, taken by the next
        # run that fits them (a shared pool holds other decoders' entries too)
        self._reuse_buffers = cuda_graph
        self._pool: BufferPool[_Batch] = buffer_pool if buffer_pool is not None else BufferPool()
        # this decoder's tag in the pool's keys (not the decoder itself: the pool would hold its owner)
        self._pool_owner = object()
        self._warp_param_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        if isinstance(tree, eagle_kernels.StaticTree):
            self.static = tree
            self.num_tokens, self.depth = tree.num_draft_tokens, int(tree.depth.max())
            self.topk = tree.topk
            dev = head.device
            self._static_mask = tree.mask.to(dev)
            self._static_source = tree.token_source.to(dev)
            self._static_depth = tree.depth.to(dev)
            self._static_next = (tree.retrive_next_token.to(dev), tree.retrive_next_sibling.to(dev))
            self._static_levels = self._plan_static_levels(tree, dev)
        else:
            self.static = None
            # A tree of n slots holds at most n - 1 levels below the root: deeper drafting is wasted
            # (and would size accept_index wider than the tree).
            self.num_tokens, self.topk = tree.total_tokens, tree.topk
            self.depth = min(tree.depth, tree.total_tokens - 1)
        vocab = getattr(head, "draft_vocab_size", head.config.vocab_size)
        if self.topk > vocab:
            raise ValueError(f"tree topk={self.topk} exceeds the draft vocabulary size {vocab}")
        self.tree = tree
        self.feature_layers = head.feature_layers
        self.times: RoundTimes | None = None
        self.last_auto: AutoSpeculation | None = None
        self._auto_policies: dict[tuple, AutoSpeculation] = {}  # (batch size, sampling) -> policy
        self._ones: dict[tuple, torch.Tensor] = {}  # (batch size, device) -> a plain step's counts

    # ------------------------------------------------------------------------------------------
    # Public entry
    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams,
        *,
        eos_token_ids: Sequence[int] = (),
        seed: int | None = None,
        profile: bool = False,
        auto: bool | AutoSpeculation = False,
        plain_chunk: int = 1,
        plain_chunk_seconds: float | None = None,
    ) -> Iterator[Emission]:
        """Yield the tokens of every forward (prefill first, then one per round, plain step or chunk of
        plain steps) until all rows finish.

        ``auto``: between rounds, choose speculative rounds or plain decoding steps from their measured
        speed (:mod:`eagle.adaptive`). True: this decoder's policy for the batch size and sampling
        parameters, carried on from its last such run (a fresh one the first time); or an
        :class:`~eagle.adaptive.AutoSpeculation` to use. Greedy tokens are the same either way; see the
        module for sampling. Not with ``cuda_graph``. The run's policy (counts, speeds) is its
        emissions' ``auto`` (and :attr:`last_auto`, that of the decoder's most recently started run).

        ``plain_chunk``: with ``auto``, run up to this many of a plain phase's steps back to back
        and emit their tokens together (one emission, one policy record): a plain step's Python
        around the forward (emission, policy, retirement) then runs once per chunk, and on CUDA
        the steps queue without a host synchronisation between them unless there are stop tokens
        to check. A chunk ends after the step in which a row emits an end-of-sequence token, so
        that the row retires as it would after a single step, and never runs past a row's budget.
        1 (the default): an emission per step. ``plain_chunk_seconds``: also end a chunk once it has
        run this long on the host's clock (a stream's tokens then come at least that often; on CUDA
        the clock sees the steps' launches, and with stop tokens their completion). A policy subclass
        whose ``record`` takes no ``forwards``, or that overrides ``next_mode`` but not
        ``plain_forwards_ahead`` (written before chunks), runs one step per emission."""
        if isinstance(plain_chunk, bool) or not isinstance(plain_chunk, int) or plain_chunk < 1:
            raise ValueError(f"plain_chunk must be an int >= 1, got {plain_chunk!r}")
        if plain_chunk_seconds is not None and not plain_chunk_seconds > 0:
            raise ValueError(f"plain_chunk_seconds must be > 0 or None, got {plain_chunk_seconds!r}")
        device = self.target.device
        if auto and (self.cuda_graph or self._reuse_buffers):  # (a reused state has no deferred prefill)
            raise ValueError(
                "speculative='auto' (plain steps between rounds) does not run with cuda_graph=True"
            )
        sampling_key = sampling.as_key()
        self.times = RoundTimes() if profile else None
        block, lengths = pad_prompts(prompts, device)
        B, max_prompt = block.shape
        self._check_lengths(max_prompt, max_new_tokens)
        stop = set(stop_ids(eos_token_ids, self.target.config.vocab_size, "eos_token_ids"))
        rng.check_seed(seed)  # (before kept buffers are taken)
        if seed is None:  # greedy draws nothing: torch's global generator is left as it was
            seed = 0 if sampling.greedy else rng.draw_seed()
        key = (self._pool_owner, B, sampling_key)
        # pop: a run owns its buffers, so a stream still running elsewhere never shares them
        pooled = self._pool.take(key) if self._reuse_buffers else None
        # auto: the draft's prefill waits for the first round, which pays (and times) it, or is never
        # run if the run decodes plainly throughout
        state, first = self._prefill(block, lengths, max_new_tokens, sampling, seed, pooled, bool(auto))
        # a pooled state's calls are checked again (the weights may have changed)
        state.cpu_round = state.cpu_plain_step = None
        full_batch = state
        ones = torch.ones(B, dtype=torch.int64, device=device)
        policy_key = (B, sampling_key)
        policy = self._auto_policy(auto, policy_key) if auto else None  # (put back when the run ends)
        if policy is not None and not _takes_plain_chunks(policy):
            plain_chunk = 1
        self.last_auto = policy
        try:
            emission = self._emit(state, first[:, None], ones, max_new_tokens, stop, record=False)
            emission.auto = policy
            yield emission
            state, frozen = self._retire_finished(state, emission.finished, None)
            while state is not None:
                started = time.perf_counter()
                backlog_seconds = 0.0
                forwards = 1
                if policy is not None and policy.next_mode() == PLAIN:
                    running = frozen.active if frozen is not None else range(len(state.emitted))
                    room = min(max_new_tokens - state.emitted[i] for i in running)
                    # (max: a policy subclassing next_mode alone may say 0 ahead)
                    steps = min(plain_chunk, max(1, policy.plain_forwards_ahead()), room)
                    new_tokens, counts = self._plain_steps(
                        state, sampling, steps, stop, running, plain_chunk_seconds
                    )
                    forwards = new_tokens.shape[1]
                    nonfinite_from = None  # (a plain step's NaN/inf is the flag's: only live rows count)
                else:
                    backlog_seconds = self._catch_up(state)
                    new_tokens, counts = self._next_round(state, sampling)
                    nonfinite_from = state.nonfinite_from
                t0 = time.perf_counter()
                if frozen is not None:
                    frozen.hold(state)
                active = frozen.active if frozen is not None else None
                emission = self._emit(
                    state,
                    new_tokens,
                    counts,
                    max_new_tokens,
                    stop,
                    record=True,
                    active=active,
                    nonfinite_from=nonfinite_from,
                    forwards=forwards,
                )
                emission.auto = policy
                if policy is not None:  # the forward and its host synchronisation (in _emit)
                    # the draft's catch-up on the positions plain steps committed is a cost of those
                    # steps (it grows with them), not of this round: timed into a probe, a long plain
                    # run made every probe look slow and auto stayed plain where speculation won
                    seconds = time.perf_counter() - started - backlog_seconds
                    if backlog_seconds:
                        policy.charge_plain(backlog_seconds, len(emission.rows))
                    tokens = sum(map(len, emission.tokens))
                    if forwards == 1:  # (as before plain chunks: a subclass's record may not take forwards)
                        policy.record(tokens, seconds, len(emission.rows))
                    else:
                        policy.record(tokens, seconds, len(emission.rows), forwards=forwards)
                state, frozen = self._retire_finished(state, emission.finished, frozen)
                if self.times is not None:
                    self.times.other += time.perf_counter() - t0
                    self.times.rounds += 1
                yield emission
        finally:  # also when the caller stops iterating early
            if self._reuse_buffers:
                self._pool.put(key, full_batch)
            if policy is not None and not isinstance(auto, AutoSpeculation):
                self._auto_policies[policy_key] = policy  # (the next such run goes on from here)

    def _auto_policy(self, auto: bool | AutoSpeculation, key: tuple) -> AutoSpeculation:
        """The run's speculative="auto" policy: the one given, or the one this decoder's last run of
        the same batch size and sampling left (resumed), or a fresh one. Taken out while the run
        uses it (:meth:`run` puts it back when it ends): a run started meanwhile in another thread
        gets its own, so neither's counts and speeds mix with the other's."""
        if isinstance(auto, AutoSpeculation):
            return auto
        policy = self._auto_policies.pop(key, None)
        if policy is None:
            if len(self._auto_policies) >= 16:
                self._auto_policies.clear()
            return AutoSpeculation()
        return policy.resume()

    def release_buffers(self) -> None:
        """Free the buffers and CUDA graphs this decoder kept for later runs (see ``cuda_graph`` in the
        constructor); a shared pool keeps the other decoders' entries."""
        self._pool.discard_where(lambda key: key[0] is self._pool_owner)

    @property
    def kept_batch_states(self) -> int:
        """How many batch states (batch size, sampling) keep their buffers and CUDA graph between runs
        (``cuda_graph`` only; with a shared pool, all its decoders' states together). A caller cycling through
        more of them than this re-allocates and re-captures on every run; setting fewer drops the least
        recently used."""
        return self._pool.capacity

    @kept_batch_states.setter
    def kept_batch_states(self, count: int) -> None:
        self._pool.capacity = count

    # ------------------------------------------------------------------------------------------
    # CUDA graphs
    # ------------------------------------------------------------------------------------------
    def _next_round(self, s: _Batch, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """One round: eager, or replayed from a CUDA graph captured for this batch state.

        The first round of a batch state runs eagerly (it also warms up lazily initialised kernels),
        the second is captured and replayed, later ones are replayed. A batch that loses finished rows
        is a new state (new tensors), so it is captured again. A state reused from an earlier run
        (:meth:`run`) arrives with its graph.
        """
        if not self.cuda_graph or self._graph_failed:
            return self._round(s, sampling)
        if s.graph is not None:
            return self._replay(s, s.graph)
        if not s.warm:
            s.warm = True
            return on_side_stream(lambda: self._round(s, sampling), self.target.device)
        try:
            s.graph = self._capture(s, sampling)
        except Exception as e:  # noqa: BLE001 - capture is an optimisation; eager rounds are exact
            self._graph_failed = True
            synchronize_stream(self.target.device)
            warnings.warn(f"CUDA graph capture failed ({e}); continuing without CUDA graphs", stacklevel=3)
            return self._round(s, sampling)
        return self._replay(s, s.graph)

    def _ensure_room(self, s: _Batch, steps: int, rows: int) -> None:
        """Host-side overflow checks of both caches for one round (may read the lengths back)."""
        s.target_cache.check_room(rows)
        s.draft_cache.check_room(max(rows, steps))

    def _capture(self, s: _Batch, sampling: SamplingParams) -> _RoundGraph:
        steps = self.depth + 1
        rows = max(self.num_tokens, self.depth * self.topk + 1)
        self._ensure_room(s, steps, rows)  # tight host bounds, so nothing inside the capture reads back
        times, self.times = self.times, None  # no profiling syncs inside the capture
        try:
            graph, (new_tokens, counts) = cuda_graph_capture(
                lambda: self._round(s, sampling), [s.target_cache, s.draft_cache]
            )
        finally:
            self.times = times
        return _RoundGraph(graph, new_tokens, counts, steps, rows)

    def _replay(self, s: _Batch, g: _RoundGraph) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure_room(s, g.steps, g.rows)
        t0 = self._stamp()
        replay(g.graph, self.target.device)
        # The round commits at most `steps` positions per sequence in each cache.
        s.target_cache.length_bound += g.steps
        s.draft_cache.length_bound += g.steps
        if self.times is not None:
            self.times.graph += self._stamp() - t0
        return g.new_tokens, g.counts

    def _stamp(self) -> float:
        """A timestamp for the per-phase profile; on CUDA it waits for the queued work when profiling."""
        if self.times is not None:
            synchronize_stream(self.target.device)  # (a no-op off CUDA)
        return time.perf_counter()

    def accept_lengths(self) -> dict[int, list[int]]:
        """Tokens emitted per round for each row of the most recently started run (runs in other
        threads: each run's own is its emissions' :attr:`Emission.accept_lengths`)."""
        return self._accept_lengths

    # ------------------------------------------------------------------------------------------
    # Prefill
    # ------------------------------------------------------------------------------------------
    def _check_lengths(self, max_prompt: int, max_new_tokens: int) -> None:
        if as_number("max_new_tokens", max_new_tokens, integral=True) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # The same limit as plain decoding: tree rows past it hold tokens beyond max_new_tokens, which
        # are never emitted, and a row only sees its ancestors, so they cannot change emitted tokens
        # (the cache has room for them: _cache_len).
        self.target.check_generation_length(max_prompt, max_new_tokens)

    def _cache_len(self, max_prompt: int, max_new_tokens: int) -> int:
        tree_rows = max(self.num_tokens, self.depth * self.topk + 1)
        return max_prompt + max_new_tokens + tree_rows + 1

    def _prefill(
        self, block, lengths, max_new_tokens, sampling, seed, pooled: _Batch | None = None, defer_draft=False
    ):
        """Prefill both caches; returns (state, first token [B]). ``pooled``: an earlier run's state of
        the same batch size and sampling, whose buffers (and CUDA graph) are reused when they fit.
        ``defer_draft``: leave the draft's prefill for :meth:`_catch_up` (speculative="auto")."""
        B, max_prompt = block.shape
        device = block.device
        S = self._cache_len(max_prompt, max_new_tokens)
        if pooled is not None and pooled.target_cache.max_seq_len >= S:
            target_cache, draft_cache = pooled.target_cache, pooled.draft_cache
            target_cache.reset()
            draft_cache.reset()
        else:
            pooled = None
            if self._reuse_buffers:
                S = -(-S // _POOLED_CACHE_ALIGN) * _POOLED_CACHE_ALIGN
            # emitted tokens attend to at most prompt + max_new_tokens positions (checked in
            # _check_lengths); the rest is the tree's room and the pool's rounding
            attended = max_prompt + max_new_tokens
            target_cache = self.target.new_cache(B, S, attended_len=attended)
            draft_cache = self.head.new_cache(B, S)
        last = (lengths - 1)[:, None]
        out = self.target(block, target_cache, logits_index=last, feature_layers=self.feature_layers)
        target_cache.advance(lengths, max_increment=max_prompt)
        seeds = rng.row_seeds(seed, B, device)
        draws = torch.zeros(B, dtype=torch.int64, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        first = self._sample_one(out.logits[:, 0], sampling, seeds, draws, nonfinite, None)
        # Draft prefill: feature f_t with token t+1; the last real row pairs with the first new token.
        shifted = torch.roll(block, -1, dims=1)
        shifted.scatter_(1, last, first[:, None])
        pending = _PendingDraft(out, shifted, last, lengths, max_prompt)
        root_hidden = root_logits = None
        if not defer_draft:
            root_hidden, root_logits = self._draft_prefill(pending, draft_cache)
            pending = None
        # Per run: a stream still running keeps its own lists when another run starts on this decoder.
        self._accept_lengths = accept_lengths = {b: [] for b in range(B)}
        state = _Batch(
            rows=torch.arange(B, device=device),
            root=first,
            root_hidden=root_hidden,
            root_logits=root_logits,
            emitted=[0] * B,
            seeds=seeds,
            draws=draws + 1,
            target_cache=target_cache,
            draft_cache=draft_cache,
            accept_lengths=accept_lengths,
            nonfinite=nonfinite,
            live=torch.ones(B, dtype=torch.bool, device=device),
            nonfinite_from=torch.full((B,), _NO_NONFINITE_ROW, dtype=torch.int64, device=device),
            pending_draft=pending,
        )
        if pooled is None:
            return state, first
        return self._refill(pooled, state), first

    def _draft_prefill(self, p: _PendingDraft, draft_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over the prompts (their target features, each with the next token); advances the
        draft cache by the prompt lengths; returns the root state ``(hidden [b, H], logits [b, Vd])``
        at each prompt's last position."""
        d = self.head(self.head.target_features(p.out), p.shifted, draft_cache, logits_index=p.last)
        draft_cache.advance(p.lengths, max_increment=p.max_prompt)
        b = p.shifted.shape[0]
        root_hidden = d.hidden.gather(1, p.last[..., None].expand(b, 1, d.hidden.shape[-1]))[:, 0]
        return root_hidden, d.logits[:, 0]

    @staticmethod
    def _refill(pooled: _Batch, fresh: _Batch) -> _Batch:
        """Copy a freshly prefilled state into a pooled one's tensors (the addresses its CUDA graph
        reads); the caches are already shared."""
        for name in ("rows", "root", "root_hidden", "root_logits", "seeds", "draws", "nonfinite", "live"):
            getattr(pooled, name).copy_(getattr(fresh, name))
        if pooled.nonfinite_from is None:  # (CPU: a round assigns it, None when no row was NaN/inf)
            pooled.nonfinite_from = fresh.nonfinite_from
        else:
            pooled.nonfinite_from.copy_(fresh.nonfinite_from)
        pooled.emitted = fresh.emitted
        pooled.accept_lengths = fresh.accept_lengths
        return pooled

    # ------------------------------------------------------------------------------------------
    # Plain steps (speculative="auto")
    # ------------------------------------------------------------------------------------------
    def _plain_step(self, s: _Batch, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """One plain decoding step of every row: the target over the root token, the next token picked
        as plain decoding picks it (argmax, or the warped distribution with the row's next uniform, as
        :func:`eagle.models.generate_plain.generate_plain` draws it). The draft is not run: the step's
        feature and token wait in ``s.backlog`` (:meth:`_catch_up`). Returns ``(new_tokens [b, 1],
        counts [b])``."""
        b = s.root.shape[0]
        s.target_cache.check_room(1)
        fused = self._cpu_plain_step(s, sampling)
        if fused is not None:
            token, hidden = fused
            s.backlog.append((hidden.to(self.head.dtype), token))
        else:
            out = self.target(s.root[:, None], s.target_cache, feature_layers=self.feature_layers)
            s.target_cache.advance(1)
            token = self._sample_one(out.logits[:, 0], sampling, s.seeds, s.draws, s.nonfinite, s.live)
            if not sampling.greedy:
                s.draws += 1
            s.backlog.append((self.head.target_features(out), token))
            s.root.copy_(token)
        ones = self._ones.get((b, token.device))
        if ones is None:  # (only read: the same tensor serves every step)
            ones = self._ones[(b, token.device)] = torch.ones(b, dtype=torch.int64, device=token.device)
        return token[:, None], ones

    def _plain_steps(
        self,
        s: _Batch,
        sampling: SamplingParams,
        steps: int,
        stop: set[int],
        active: Sequence[int],
        seconds: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``steps`` :meth:`_plain_step` calls back to back: ``(new_tokens [b, n], counts [b])``
        with n <= ``steps`` (every count n). Ends after the step in which a row of ``active`` (the
        batch indices not frozen) emits a token of ``stop``, so that the row retires as after a single step
        (:meth:`_retire_finished`) and never computes past its EOS, or, with ``seconds``, after the
        step that brings the chunk's time to that. With stop tokens that reads each step's tokens
        back (a host synchronisation per step on CUDA, as one step per emission had); without, the
        steps queue with none."""
        if steps == 1:
            return self._plain_step(s, sampling)
        started = time.perf_counter()
        tokens: list[torch.Tensor] = []
        for _ in range(steps):
            tokens.append(self._plain_step(s, sampling)[0])
            if stop:
                row_tokens = tokens[-1][:, 0].tolist()
                if any(row_tokens[i] in stop for i in active):
                    break
            if seconds is not None and time.perf_counter() - started >= seconds:
                break
        new_tokens = torch.cat(tokens, 1)
        b, n = new_tokens.shape
        return new_tokens, torch.full((b,), n, dtype=torch.int64, device=new_tokens.device)

    def _cpu_plain_step(self, s: _Batch, sampling: SamplingParams):
        """``(token [b], final hidden [b, 1, H])`` of :meth:`_plain_step` in one C++ call on CPU
        (``eagle_C::llama_decode_step``: the same forward and pick, the root and RNG counters updated
        in place), or None where it does not apply (an EAGLE-3 head's features are other layers';
        not the CPU fast path; switched off with ``generate_plain.set_cpu_decode_step``). The call's
        arguments are gathered once per run, as :meth:`_cpu_round`'s; raises on NaN/inf logits."""
        generation, cached = packing_generation(), s.cpu_plain_step
        if cached is None or cached[0] != generation:
            cached = s.cpu_plain_step = (generation, self._cpu_plain_step_args(s, sampling))
        args = cached[1]
        if args is None:
            return None
        token, hidden = torch.ops.eagle_C.llama_decode_step(*args, live=s.live)
        s.target_cache.length_bound += 1  # what advance(1) keeps (the op checked the room)
        if bool(s.nonfinite):
            raise FloatingPointError(NONFINITE_MESSAGE)
        return token, hidden

    def _cpu_plain_step_args(self, s: _Batch, sampling: SamplingParams) -> tuple | None:
        if (
            not isinstance(self.head, Eagle2Head)
            or self.feature_layers is not None
            or s.nonfinite is None
            or s.root.device.type != "cpu"
        ):
            return None
        sampled = ()
        if not sampling.greedy:
            params = self._warp_params(s.root.shape[0], sampling, s.root.device)
            if params is None:
                return None
            sampled = (*params, s.seeds, s.draws)
        return cpu_decode_step_args(self.target, s.root, s.target_cache, s.nonfinite, sampled)

    def _catch_up(self, s: _Batch) -> float:
        """Feed the draft what it has not seen: the prompts when its prefill waits
        (``s.pending_draft``), then the positions that plain steps committed (``s.backlog``), up to
        ``_CATCH_UP_ROWS`` per forward; its state at the last one is the next round's root, as
        :meth:`_update_draft` sets it. A run that never speculates again never pays for either.
        Returns the seconds the backlog took (0.0 without one): speculative="auto" charges them to
        the plain steps that left it, not to the round that follows (see :meth:`run`)."""
        if s.pending_draft is not None:
            s.root_hidden, s.root_logits = self._draft_prefill(s.pending_draft, s.draft_cache)
            s.pending_draft = None
        backlog, s.backlog = s.backlog, []
        if not backlog:
            return 0.0
        # On CUDA the clock must see the backlog's kernels, not their launches: without the two
        # syncs the GPU time landed in the next round's (its _emit syncs), the bias charge_plain
        # removes. Work queued before (the deferred prefill) stays with the round, as before.
        synchronize_stream(s.draft_cache.device)  # (a no-op off CUDA)
        started = time.perf_counter()
        for start in range(0, len(backlog), _CATCH_UP_ROWS):
            chunk = backlog[start : start + _CATCH_UP_ROWS]
            features = torch.cat([f for f, _ in chunk], 1)  # [b, k, Hf]
            tokens = torch.stack([t for _, t in chunk], 1)  # [b, k]
            b, k = tokens.shape
            last = torch.full((b, 1), k - 1, dtype=torch.int64, device=tokens.device)
            s.draft_cache.check_room(k)
            d = self.head(features, tokens, s.draft_cache, logits_index=last)
            s.draft_cache.advance(k)
            # assigned, not copied: the prefill may have left none, and auto runs without CUDA graphs
            s.root_hidden = d.hidden[:, k - 1].contiguous()
            s.root_logits = d.logits[:, 0].contiguous()
        synchronize_stream(s.draft_cache.device)
        return time.perf_counter() - started

    def _sample_one(self, logits, sampling, seeds, draws, nonfinite, live):
        """The next token of every row from ``logits [b, V]`` (argmax, or drawn from the warped
        distribution with each row's next uniform), NaN/inf OR-ed into ``nonfinite``; ``live``: bool
        ``[b]`` or None, where only live rows count and the others' non-finite rows are warped as
        all-zero logits (a frozen row's token is not emitted)."""
        if sampling.greedy:
            first, bad = argmax_checked_live(logits, live)
            self._check_finite(bad, nonfinite)
            return first
        logits, bad = zero_nonfinite_rows(logits, live)
        self._check_finite(bad, nonfinite)
        probs = self._warp(logits, sampling)
        u = rng.uniforms(seeds, draws, 1)[:, 0]
        return rng.inverse_cdf(probs, u)

    # ------------------------------------------------------------------------------------------
    # One round
    # ------------------------------------------------------------------------------------------
    def _round(self, s: _Batch, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        times = self.times
        if times is None:  # (profiling times the phases: the calls below)
            fused = self._cpu_round(s, sampling)
            if fused is not None:
                return fused
        t0 = self._stamp()
        if self.static is not None:
            candidates, tree = self._draft_static(s)
        else:
            candidates, tree = self._draft_dynamic(s)
        mask, positions, retrive_index, next_token, next_sibling = tree
        t1 = self._stamp()
        b, n = candidates.shape
        s.target_cache.check_room(n)
        out = self.target(
            candidates,
            s.target_cache,
            positions=positions.view(b, n),
            tree_mask=mask,
            feature_layers=self.feature_layers,
        )
        t2 = self._stamp()
        steps = self.depth + 1
        fused = self._cpu_verify_update(
            s, out, candidates, (retrive_index, next_token, next_sibling), steps, sampling
        )
        if fused is not None:
            if times is not None:  # the whole rest of the round is one call: counted as accept
                times.draft += t1 - t0
                times.verify += t2 - t1
                times.accept += self._stamp() - t2
            return fused
        if sampling.greedy:
            if out.logits.device.type == "cpu":  # the argmax and a NaN flag in one pass
                target_predict, bad = argmax_checked(out.logits)
            else:  # only the accepted rows are checked, after the verification
                target_predict, bad = out.logits.argmax(-1), None
            predicts, accept_index, accept_num = eagle_kernels.verify_tree_greedy(
                candidates,
                retrive_index,
                next_token,
                next_sibling,
                target_predict,
                num_spec_steps=steps,
            )
        else:
            # As for greedy rounds, only the accepted path's rows may stop the round (checked after the
            # sampling, which reads a row only once its token is accepted). On CPU, where the ops check
            # every row's values, the non-finite rows are warped as all-zero logits meanwhile (only when
            # the one-pass flag is set); the CUDA and Triton ops work row by row and never read them.
            logits, bad = out.logits, None
            if logits.device.type == "cpu":
                logits, bad = zero_nonfinite_rows(logits.reshape(b * n, -1), None)
            V = logits.shape[-1]
            probs = self._warp(logits.reshape(b * n, V), sampling).view(b, n, V)
            u = rng.uniforms(s.seeds, s.draws, n + 1)
            s.draws += 1
            predicts, accept_index, accept_num = eagle_kernels.tree_speculative_sampling(
                candidates,
                retrive_index,
                next_token,
                next_sibling,
                probs,
                u[:, :n].contiguous(),
                u[:, n].contiguous(),
                num_spec_steps=steps,
            )
        # Whether a token that came from NaN/inf logits is emitted is decided after the EOS and budget
        # cuts (_emit): the row of an accepted EOS or last in-budget draft is not used.
        if candidates.device.type == "cpu":
            s.nonfinite_from = first_nonfinite_accepted_row(out.logits, accept_index, accept_num, bad, s.live)
        else:  # in place: a captured graph writes it, and the round's host synchronisation reads it
            first_nonfinite_accepted_row(
                out.logits, accept_index, accept_num, bad, s.live, out=s.nonfinite_from
            )
        t3 = self._stamp()
        old_lengths = s.target_cache.seqlens
        new_lengths = eagle_kernels.compact_kv_cache(
            s.target_cache.kv, old_lengths, accept_index, accept_num, num_draft_tokens=n
        )
        s.target_cache.set_seqlens(new_lengths, bound=s.target_cache.length_bound + steps)
        t4 = self._stamp()
        valid = torch.arange(steps, device=candidates.device)[None, :] <= accept_num[:, None].long()
        rows = accept_index.long().clamp(min=0)
        new_tokens = torch.where(valid, predicts.long()[rows], 0)
        counts = accept_num.long() + 1
        self._update_draft(s, out, rows, new_tokens, counts)
        s.root.copy_(new_tokens.gather(1, (counts - 1)[:, None])[:, 0])  # in place: graph-safe
        t5 = self._stamp()
        if times is not None:
            times.draft += t1 - t0
            times.verify += t2 - t1
            times.accept += t3 - t2
            times.compact += t4 - t3
            times.draft_update += t5 - t4
        return new_tokens, counts

    def _cpu_verify_update(
        self, s: _Batch, out: ModelOutput, candidates, tree, steps: int, sampling: SamplingParams
    ):
        """``(new_tokens, counts)`` of the rest of the round (greedy or sampled) done in one C++ call
        on CPU with an EAGLE-1/2 head (:meth:`Eagle2Head.cpu_verify_update`: the same ops as the
        Python below, so the same bits), the caches' lengths, the RNG counters and the root state
        updated; None where that does not apply."""
        if not isinstance(self.head, Eagle2Head) or out.logits is None or candidates.device.type != "cpu":
            return None
        sampled = None
        if not sampling.greedy:
            params = self._warp_params(candidates.numel(), sampling, candidates.device)
            if params is None:
                return None
            sampled = (*params, s.seeds, s.draws)
        s.draft_cache.check_room(steps)
        res = self.head.cpu_verify_update(
            out.logits, out.hidden, candidates, tree, s.target_cache, s.draft_cache, steps, sampled, s.live
        )
        if res is None:
            return None
        return self._commit_cpu_round(s, res, steps)

    def _commit_cpu_round(self, s: _Batch, res: list, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches' lengths and the root state from a C++ round's outputs ``[new_tokens, counts,
        new target lengths, root, root_hidden, root_logits, nonfinite_from, *status]`` (nonfinite_from:
        :func:`first_nonfinite_accepted_row`'s, None where no row of the logits held NaN/inf, checked
        by :meth:`_emit`); raises on a sampling status."""
        new_tokens, counts, new_lengths, root, root_hidden, root_logits, nonfinite_from, *status = res
        s.nonfinite_from = nonfinite_from
        if status and status[0] is not None:
            raise_on_status("tree_speculative_sampling", status[0])
        s.target_cache.set_seqlens(new_lengths, bound=s.target_cache.length_bound + steps)
        s.draft_cache.advance(counts, max_increment=steps)
        s.root_hidden.copy_(root_hidden)
        s.root_logits.copy_(root_logits)
        s.root.copy_(root)
        return new_tokens, counts

    def _cpu_round(self, s: _Batch, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole round with an EAGLE-1/2 head and the dynamic tree on CPU in one C++ call
        (``eagle_C::eagle2_round_greedy``, or ``eagle2_round_sampled`` at temperature > 0: the draft
        tree, the target's forward over it, the rest; the same C++ functions with the same arguments
        as the three calls of :meth:`_round`, so the same tokens, caches, RNG counters and root
        state). None where any of the three would not take its C++ path.

        The call's arguments are gathered (and the weights' packed copies checked) at a run's first
        round and kept in the state for the rest of the run, or until a CPU switch or a packing
        changes (:func:`eagle.models.cpu_packed.packing_generation`): after each forward's weights
        stream through the caches, every Python-level call here runs cold, and checking ~90 weights
        per round cost ~0.1 ms of a ~3 ms round. Weights must not be modified during a generation
        (as with CUDA graphs)."""
        generation, cached = packing_generation(), s.cpu_round
        # the root state is assigned anew after plain steps (speculative="auto": _catch_up)
        if (
            cached is None
            or cached[0] != generation
            or cached[1] is not s.root_hidden
            or cached[2] is not s.root_logits
        ):
            cached = s.cpu_round = (
                generation,
                s.root_hidden,
                s.root_logits,
                self._cpu_round_call(s, sampling),
            )
        call = cached[3]
        if call is None:
            return None
        op, args, steps, n, draft_room = call
        s.target_cache.check_room(n)
        s.draft_cache.check_room(draft_room)
        return self._commit_cpu_round(s, op(*args, live=s.live), steps)

    def _cpu_round_call(self, s: _Batch, sampling: SamplingParams) -> tuple | None:
        """``(op, arguments, steps, tree tokens, the draft cache's room needed)`` of :meth:`_cpu_round`
        for this state, or None where it does not apply."""
        if (
            self.static is not None
            or not isinstance(self.head, Eagle2Head)
            or self.feature_layers is not None
        ):
            return None
        if s.root.device.type != "cpu" or s.root_hidden is None:
            return None
        steps, n = self.depth + 1, self.num_tokens
        sampled = ()
        if not sampling.greedy:
            params = self._warp_params(s.root.shape[0] * n, sampling, s.root.device)
            if params is None:
                return None
            sampled = (*params, s.seeds, s.draws)
        head_args = self.head.cpu_round_weights(s.root_hidden, sampled=bool(sampled))
        target_args = self.target.cpu_forward_weights(s.root) if head_args is not None else None
        if target_args is None:
            return None
        embed, for_op, norm_w, lm_head = target_args
        d_embed, fc_w, fc_b, d_for_op, d_doubled, d_signs, d_lm_head, d_heads, d_kv_heads, d_eps = head_args
        doubled, signs = rope_tables(self.target.inv_freq(s.root.device))
        cfg = self.target.config
        op = torch.ops.eagle_C.eagle2_round_sampled if sampled else torch.ops.eagle_C.eagle2_round_greedy
        args = (
            s.root_logits,
            s.root_hidden,
            s.root,
            s.draft_cache.kv,
            s.draft_cache.seqlens,
            d_embed,
            fc_w,
            fc_b,
            d_for_op,
            d_doubled,
            d_signs,
            d_lm_head,
            d_heads,
            d_kv_heads,
            d_eps,
            self.topk,
            self.depth,
            n,
            steps,
            s.target_cache.kv,
            s.target_cache.seqlens,
            embed,
            for_op,
            doubled,
            signs,
            norm_w,
            lm_head,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.rms_norm_eps,
            *sampled,
        )
        return op, args, steps, n, max(steps, self.depth * self.topk + 1)

    def _update_draft(self, s: _Batch, out: ModelOutput, rows, new_tokens, counts) -> None:
        """Feed the draft every newly committed position: the target feature at each accepted node
        with the token that follows it. Rows past ``counts`` are padding; their K/V lands beyond the
        committed length and is overwritten later."""
        b, steps = rows.shape
        features = self.head.target_features(out)  # [b, n, H]
        H = features.shape[-1]
        feats = features.reshape(-1, H)[rows.reshape(-1)].view(b, steps, H)
        last = (counts - 1)[:, None]
        s.draft_cache.check_room(steps)
        d = self.head(feats, new_tokens, s.draft_cache, logits_index=last)
        s.draft_cache.advance(counts, max_increment=steps)
        s.root_hidden.copy_(d.hidden.gather(1, last[..., None].expand(b, 1, H))[:, 0])
        s.root_logits.copy_(d.logits[:, 0])

    # ------------------------------------------------------------------------------------------
    # Drafting
    # ------------------------------------------------------------------------------------------
    def _draft_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        # EAGLE-2 scores: the draft's raw (untempered) log-probabilities, in float32.
        return torch.log_softmax(logits.float(), dim=-1)

    def _tree_forward(self, s: _Batch, hidden, tokens, positions, mask, past: int):
        """Run the draft over the next rows of the tree block (``past`` rows were fed before) and
        return their (hidden, logprobs). ``mask [b, T, past + T]``: the rows' ancestors in the block."""
        d = self.head(hidden, tokens, s.draft_cache, positions=positions, tree_mask=mask, past=past)
        return d.hidden, self._draft_logprobs(d.logits)

    def _draft_dynamic(self, s: _Batch):
        k, depth, n = self.topk, self.depth, self.num_tokens
        if isinstance(self.head, Eagle2Head):  # on CPU the whole loop below in one C++ call
            fast = self.head.cpu_dynamic_tree(
                s.root_logits,
                s.root_hidden,
                s.root,
                s.draft_cache,
                s.target_cache.seqlens,
                topk=k,
                depth=depth,
                num_tokens=n,
            )
            if fast is not None:
                return fast
        b = s.root.shape[0]
        device = s.root.device
        frontier, scores, tokens, parents = expand_root(self._draft_logprobs(s.root_logits), k)
        score_list, token_list, parents_list = [scores], [tokens], [parents]
        base_pos = s.draft_cache.seqlens.long()[:, None]  # root position P
        fed_mask = None  # [b, T, T] ancestor mask of the tree rows fed to the draft so far
        parent_hidden = s.root_hidden[:, None, :].expand(b, k, s.root_hidden.shape[-1])
        eye = torch.eye(k, dtype=torch.bool, device=device).expand(b, k, k)
        for level in range(1, depth):
            positions = (base_pos + level - 1).expand(b, k)
            if fed_mask is None:
                past, rows_mask, fed_mask = 0, eye, eye
            else:
                past = fed_mask.shape[1]
                parent_rows = (past - k) + frontier.parent_rows
                rows_mask = torch.cat((fed_mask.gather(1, parent_rows[..., None].expand(b, k, past)), eye), 2)
                zeros = torch.zeros(b, past, k, dtype=torch.bool, device=device)
                fed_mask = torch.cat((torch.cat((fed_mask, zeros), 2), rows_mask), 1)
            tokens = self.head_ids(frontier.tokens)
            out_hidden, logp = self._tree_forward(s, parent_hidden, tokens, positions, rows_mask, past)
            frontier, scores, tokens, parents = expand_level(frontier, logp, level + 1, k)
            parent_hidden = out_hidden.gather(
                1, frontier.parent_rows[..., None].expand(-1, -1, out_hidden.shape[-1])
            )
            score_list.append(scores)
            token_list.append(tokens)
            parents_list.append(parents)
        selected, draft_tokens, parent_list = select_candidates(score_list, token_list, parents_list, n - 1)
        candidates = torch.cat((s.root[:, None], self.head_ids(draft_tokens)), 1)
        tree = eagle_kernels.build_tree(
            parent_list, selected, s.target_cache.seqlens, topk=k, depth=depth, num_draft_tokens=n
        )
        return candidates, tree

    def head_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids -> target ids (identity for EAGLE-1/2)."""
        return self.head.to_target_ids(draft_ids)

    @staticmethod
    def _plan_static_levels(st: eagle_kernels.StaticTree, device: torch.device) -> list[_StaticLevel]:
        """The static tree's draft levels, with their index tensors made once (on ``device``)."""
        depth_of, parent_of = st.depth.tolist(), st.parent.tolist()
        mask, source = st.mask.to(device), st.token_source.to(device)
        levels, fed = [], []  # fed: tree slots fed to the draft so far, in order
        for d in range(1, int(st.depth.max())):
            level = [i for i in st.expand_slots.tolist() if depth_of[i] == d]
            if not level:
                break
            past = len(fed)
            fed = fed + level
            new = torch.tensor(level, device=device)
            levels.append(
                _StaticLevel(
                    slots=level,
                    parents=[parent_of[i] for i in level],
                    past=past,
                    token_columns=source[new - 1],
                    mask=mask[new][:, torch.tensor(fed, device=device)],
                    position_offsets=st.depth.to(device)[new][None, :] - 1,
                )
            )
        return levels

    def _draft_static(self, s: _Batch):
        st = self.static
        k, n = st.topk, st.num_draft_tokens
        b, device = s.root.shape[0], s.root.device
        # Top-k table, one row per expanded slot in expand order (the root's row first).
        table = [torch.topk(s.root_logits, k, dim=-1).indices[:, None, :]]
        slot_hidden = {0: s.root_hidden}
        base_pos = s.draft_cache.seqlens.long()[:, None]
        for lv in self._static_levels:
            flat = torch.cat(table, 1).reshape(b, -1)
            tokens = self.head_ids(flat[:, lv.token_columns])
            hidden = torch.stack([slot_hidden[p] for p in lv.parents], 1)
            mask = lv.mask.expand(b, *lv.mask.shape)
            out_hidden, logp = self._tree_forward(
                s, hidden, tokens, base_pos + lv.position_offsets, mask, lv.past
            )
            for j, slot in enumerate(lv.slots):
                slot_hidden[slot] = out_hidden[:, j]
            table.append(torch.topk(logp, k, dim=-1).indices)
        flat = torch.cat(table, 1).reshape(b, -1)
        candidates = torch.cat((s.root[:, None], self.head_ids(flat[:, self._static_source])), 1)
        positions = (s.target_cache.seqlens.long()[:, None] + self._static_depth[None, :]).reshape(-1)
        retrive_index = torch.arange(b * n, device=device).view(b, n)
        next_token, next_sibling = self._static_next
        tree = (
            self._static_mask.expand(b, n, n),
            positions,
            retrive_index,
            next_token.expand(b, n),
            next_sibling.expand(b, n),
        )
        return candidates, tree

    # ------------------------------------------------------------------------------------------
    # Bookkeeping
    # ------------------------------------------------------------------------------------------
    def _warp_params(
        self, rows: int, p: SamplingParams, device: torch.device
    ) -> tuple[torch.Tensor, ...] | None:
        """``warp_logits``' per-row parameters for ``rows`` rows, as its wrapper makes them from
        Python numbers (float32 temperature / top_p / min_p, int64 top_k), kept between rounds (the
        ops only read them); None for parameters of other types."""
        key = (rows, p, device)
        params = self._warp_param_cache.get(key)
        if params is None:
            params = warp_param_tensors(rows, p.temperature, p.top_k, p.top_p, p.min_p, device)
            if params is None:
                return None
            if len(self._warp_param_cache) >= 16:
                self._warp_param_cache.clear()
            self._warp_param_cache[key] = params
        return params

    def _warp(self, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        if logits.dtype == torch.float64:  # the warper works in float32 (its output dtype)
            logits = logits.float()
        return eagle_kernels.warp_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)

    @staticmethod
    def _check_finite(bad: torch.Tensor, flag: torch.Tensor) -> None:
        """``bad`` (a bool scalar tensor: the logits held NaN/inf): raise now on CPU (reading is free);
        on CUDA set ``flag`` on the device, raised by :meth:`_emit` at the round's host
        synchronisation."""
        if bad.device.type == "cpu":
            if bool(bad):
                raise FloatingPointError(NONFINITE_MESSAGE)
        else:
            flag.logical_or_(bad)

    @staticmethod
    def _read_back(
        s: _Batch,
        new_tokens: torch.Tensor,
        counts: torch.Tensor,
        one_copy: bool | None = None,
        nonfinite_from: torch.Tensor | None = None,
    ):
        """``(rows, tokens, counts, nonfinite, nonfinite_from)`` as host values (the last None when
        ``nonfinite_from`` is). Off the CPU (``one_copy``) in one copy, one sync instead of five:
        ``[b, steps + 4]`` int64 of the tokens, counts, row ids, NaN flag and ``nonfinite_from``."""
        if not (one_copy if one_copy is not None else new_tokens.device.type != "cpu"):
            return (
                s.rows.tolist(),
                new_tokens.tolist(),
                counts.tolist(),
                False,
                None if nonfinite_from is None else nonfinite_from.tolist(),
            )
        b, steps = new_tokens.shape
        flag = (
            s.nonfinite
            if s.nonfinite is not None
            else torch.zeros((), dtype=torch.bool, device=new_tokens.device)
        )
        columns = [
            new_tokens.long(),
            counts.long()[:, None],
            s.rows.long()[:, None],
            flag.long().expand(b)[:, None],
        ]
        if nonfinite_from is not None:
            columns.append(nonfinite_from.long()[:, None])
        packed = torch.cat(columns, 1).tolist()
        return (
            [row[steps + 1] for row in packed],
            [row[:steps] for row in packed],
            [row[steps] for row in packed],
            bool(packed[0][steps + 2]) if packed else False,
            None if nonfinite_from is None else [row[steps + 3] for row in packed],
        )

    def _emit(
        self,
        s: _Batch,
        new_tokens,
        counts,
        max_new_tokens: int,
        stop: set[int],
        *,
        record: bool,
        active: list[int] | None = None,
        nonfinite_from: torch.Tensor | None = None,
        forwards: int = 1,
    ) -> Emission:
        """Host side of a forward (one sync): cut each row's tokens at EOS and at its budget.
        ``active``: the batch indices to emit for (default all; frozen rows are left out).
        ``nonfinite_from``: a round's :attr:`_Batch.nonfinite_from`; raises when a row would emit a
        token from that position on (one that came from NaN/inf logits). ``forwards`` > 1: the
        tokens of that many plain steps (:meth:`_plain_steps`), recorded as one token per forward."""
        rows, toks, cnts, nonfinite, bad_from = self._read_back(
            s, new_tokens, counts, nonfinite_from=nonfinite_from
        )
        if nonfinite:
            raise FloatingPointError(NONFINITE_MESSAGE)
        emission = Emission(rows=[], tokens=[], finished=[], accept_lengths=s.accept_lengths)
        for i in range(len(rows)) if active is None else active:
            row = rows[i]
            emission.rows.append(row)
            seq = toks[i][: cnts[i]]
            eos_at = next((j for j, t in enumerate(seq) if t in stop), None)
            if eos_at is not None:
                seq = seq[: eos_at + 1]
            room = max_new_tokens - s.emitted[i]
            seq = seq[:room]
            if bad_from is not None and bad_from[i] < len(seq):
                raise FloatingPointError(NONFINITE_MESSAGE)
            if record:  # what the round emitted, after the EOS and budget cuts
                if forwards == 1:
                    s.accept_lengths[row].append(len(seq))
                else:  # plain steps: one token each, none after the row's EOS
                    s.accept_lengths[row].extend([1] * len(seq))
            s.emitted[i] += len(seq)
            emission.tokens.append(seq)
            emission.finished.append(len(seq) == room or (eos_at is not None and eos_at < room))
        return emission

    def _retire_finished(
        self, s: _Batch, finished: list[bool], frozen: _Frozen | None
    ) -> tuple[_Batch | None, _Frozen | None]:
        """After an emission (``finished``: per emitted row): None when every row is done; else the
        same batch with its finished rows frozen, or (without :attr:`keep_finished_rows`) once at
        least a quarter of its rows are finished, the batch without them.

        Dropping copies both KV caches of the rows that stay (index_select over every layer): at
        batch 16 dropping each row as it finished took ~5% of an EAGLE run on CPU, while a frozen
        row costs its share of each forward; so finished rows wait, frozen, until there are enough
        of them to drop at once."""
        active = frozen.active if frozen is not None else list(range(len(s.emitted)))
        done = [i for i, f in zip(active, finished) if f]
        if not done:
            return s, frozen
        if len(done) == len(active):
            return None, None
        rows = frozen.rows + done if frozen is not None else done
        if not self.keep_finished_rows and 4 * len(rows) >= len(s.emitted):
            gone = set(rows)
            return self._drop_finished(s, [i in gone for i in range(len(s.emitted))]), None
        return s, _Frozen.of(s, rows)

    @staticmethod
    def _drop_finished(s: _Batch, finished: list[bool]) -> _Batch | None:
        """Remove finished rows from the batch (their caches are copied away: they stop costing compute)."""
        if not any(finished):
            return s
        if all(finished):
            return None
        keep_list = [i for i, f in enumerate(finished) if not f]
        keep = torch.tensor(keep_list, device=s.root.device)
        return _Batch(
            rows=s.rows[keep],
            root=s.root[keep],
            root_hidden=None if s.root_hidden is None else s.root_hidden[keep],
            root_logits=None if s.root_logits is None else s.root_logits[keep],
            emitted=[s.emitted[i] for i in keep_list],
            seeds=s.seeds[keep],
            draws=s.draws[keep],
            target_cache=s.target_cache.select_rows(keep),
            draft_cache=s.draft_cache.select_rows(keep),
            accept_lengths=s.accept_lengths,
            nonfinite=s.nonfinite,
            live=s.live[keep],
            nonfinite_from=None if s.nonfinite_from is None else s.nonfinite_from[keep],
            backlog=[(f[keep], t[keep]) for f, t in s.backlog],
            pending_draft=None if s.pending_draft is None else s.pending_draft.select(keep),
        )
