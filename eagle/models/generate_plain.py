"""Vanilla autoregressive decoding on this runtime: the baseline every EAGLE speedup is measured
against (same model, same cache, same kernels, one target forward per token)."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

import eagle_kernels
from eagle import rng
from eagle._args import as_number, prompt_id_lists, stop_ids
from eagle.models.cpu_packed import invalidate_cpu_caches
from eagle.models.cuda_graph import (
    DEFAULT_POOL_CAPACITY,
    BufferPool,
    check_pool_capacity,
    on_side_stream,
    replay,
    synchronize_stream,
)
from eagle.models.cuda_graph import capture as cuda_graph_capture
from eagle.models.kv_cache import KVCache
from eagle.models.llama import LlamaModel, rope_tables
from eagle_kernels import _ext

NONFINITE_MESSAGE = "the target produced NaN/inf logits; check the checkpoint and dtype"


def argmax_checked(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits.argmax(-1), any logit NaN/inf)`` for ``logits [..., V]``: int64 ``[...]`` and a bool
    scalar tensor on ``logits``' device (never read here: no host sync). On CPU one pass of
    ``eagle_C::argmax_checked`` (csrc/cpu/argmax_checked.cpp; torch's two reductions cost ~40x more
    on a verified tree's logits)."""
    if _argmax_in_cpp(logits):
        return torch.ops.eagle_C.argmax_checked(logits)
    return logits.argmax(-1), ~torch.isfinite(logits).all()


def first_nonfinite_accepted_row(
    logits: torch.Tensor,
    accept_index: torch.Tensor,
    accept_num: torch.Tensor,
    any_bad: torch.Tensor | None,
    live: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Per sequence, the first position of a verify's (greedy or sampled) accepted path whose row of
    the logits holds NaN/inf: int64 ``[b]``, ``steps`` where there is none.

    Position ``j``'s row gave the round's ``j``-th new token (its argmax or distribution), so that token
    and the later ones came from non-finite logits; whether any of them is emitted is the host's call,
    after the EOS and token-budget cuts (:meth:`eagle.speculate.SpeculativeDecoder._emit`): the row
    of an accepted EOS or last in-budget draft gives a token that is never emitted, and plain decoding
    never computes it. Nor does it compute a rejected draft token's row (an odd token's embedding, a
    float16 overflow its activations alone reach), which is never looked at here.

    ``logits`` ``[b, n, V]``; ``accept_index`` ``[b, steps]`` (flat rows of ``b * n`` as the decoding
    loop's identity ``retrive_index`` makes them; the sampling ops read their probabilities by slot, the
    same rows; -1 past ``accept_num``); ``accept_num`` ``[b]``; ``live``: bool ``[b]`` or None (every
    row); a row that is not live (finished, frozen in the batch) gets ``steps``. ``any_bad``:
    :func:`argmax_checked`'s flag over every row, or None: on CPU (read for free) None is returned
    when it is unset (no row holds NaN/inf); elsewhere (no host sync) the rows are always looked at.
    ``out``: an int64 ``[b]`` tensor to write the result into (a CUDA graph's buffer)."""
    if any_bad is not None and logits.device.type == "cpu" and not bool(any_bad):
        return None
    b, n, V = logits.shape
    steps = accept_index.shape[1]
    position = torch.arange(steps, device=logits.device)[None, :]
    used = position <= accept_num.long()[:, None]
    if live is not None:
        used = used & live[:, None]
    rows = logits.reshape(b * n, V)[accept_index.long().clamp(min=0)]  # [b, steps, V]
    bad = ~torch.isfinite(rows).all(-1) & used
    first = torch.where(bad, position, steps)
    return torch.amin(first, -1) if out is None else torch.amin(first, -1, out=out)


def argmax_checked_live(logits: torch.Tensor, live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`argmax_checked` where only live rows count: ``(logits.argmax(-1), a live row of
    logits [b, V] holds NaN/inf)``; ``live``: bool ``[b]`` or None (every row). On CPU the rows are
    looked at again only when the one-pass flag is set; elsewhere one masked check (no host sync)."""
    if live is None:
        return argmax_checked(logits)
    if logits.device.type == "cpu":
        token, bad = argmax_checked(logits)
        if not bool(bad):
            return token, bad
    else:
        token = logits.argmax(-1)
    return token, (~torch.isfinite(logits).all(-1) & live).any()


def zero_nonfinite_rows(logits: torch.Tensor, live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [b, V] with each row holding NaN/inf made all zeros, whether such a row is live)``
    for a sampled pick: the zeros keep the warper and samplers off NaN in rows whose token is never
    emitted; ``live``: bool ``[b]`` or None (every row). On CPU the rows are looked at only when the
    one-pass flag is set; elsewhere always (no host sync)."""
    if logits.device.type == "cpu":
        bad = nonfinite_flag(logits)
        if not bool(bad):
            return logits, bad
    finite = torch.isfinite(logits).all(-1)
    bad_rows = ~finite if live is None else ~finite & live
    return torch.where(finite[:, None], logits, 0.0), bad_rows.any()


def nonfinite_flag(logits: torch.Tensor) -> torch.Tensor:
    """Whether any logit is NaN/inf, a bool scalar tensor on ``logits``' device."""
    if _argmax_in_cpp(logits):
        return torch.ops.eagle_C.argmax_checked(logits)[1]
    return ~torch.isfinite(logits).all()


def _argmax_in_cpp(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and _ext.has_op("argmax_checked") and not torch.compiler.is_compiling()


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded block ``[B, T_max]`` (padding id 0) and the lengths ``[B]`` (int64)."""
    prompts = prompt_id_lists(prompts)  # (floats, bools, strings and a lone prompt refused by name)
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    block = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
    for b, p in enumerate(prompts):
        block[b, : len(p)] = torch.tensor(p, dtype=torch.int64)
    return block.to(device), torch.tensor(lengths, device=device)


@torch.inference_mode()
def generate_plain(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
    seed: int | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt, one target forward per token.

    Parameters
    ----------
    model : LlamaModel
    prompts : list of B token-id lists (ragged lengths allowed; one batch, right-padded prefill)
    max_new_tokens : int >= 1
    temperature : float
        0 means greedy (argmax). Otherwise tokens are sampled from
        ``eagle_kernels.warp_logits(logits, temperature, top_k, top_p, min_p)`` (Hugging Face
        semantics; ``top_k=0`` (or -1), ``top_p=1``, ``min_p=0`` disable those filters).
    eos_token_id : int or ints, optional
        A sequence stops after emitting one of them (the eos token is included in its output).
    generator : torch.Generator, optional
        Sample with ``torch.multinomial`` from this generator: one stream shared by the batch, so a
        row's tokens depend on the rows beside it. Without it (the default) each row samples by
        inverse CDF from its own counter-based stream (:mod:`eagle.rng`), as the speculative loop
        does: a row's tokens depend only on ``seed``, its index and its prompt.
    seed : int, optional
        The per-row streams' seed (random when None); not with ``generator``.
    cuda_graph : bool
        On CUDA, replay the one-token step from a CUDA graph (captured after one eager step) instead
        of launching its kernels from Python; the tokens are the same.

    Returns
    -------
    list of B lists: the new tokens of each prompt (prompt excluded).
    """
    steps = list(
        plain_decode_steps(
            model,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            eos_token_id=eos_token_id,
            generator=generator,
            cuda_graph=cuda_graph,
            seed=seed,
        )
    )
    rows = torch.stack([token for token, _ in steps], dim=1).tolist()
    if bool(steps[-1][1]):  # NaN/inf logits at any step: read once, at the end (no host sync per step)
        raise FloatingPointError(NONFINITE_MESSAGE)
    return _truncate_at_eos(rows, set(stop_ids(eos_token_id, model.config.vocab_size)))


@dataclass
class _StepBuffers:
    """What one plain decoding run reads and writes on the device; kept (with the CUDA graph of its
    step) for the next run of the same batch size and sampling when ``cuda_graph`` is on."""

    cache: KVCache
    step_input: torch.Tensor  # [B] int64: the token a step feeds (a fixed address for graph replay)
    seeds: torch.Tensor | None  # [B] int64 per-row RNG streams (sampling without a generator)
    draws: torch.Tensor | None  # [B] int64, advanced in place: graph-safe
    nonfinite: torch.Tensor  # [] bool: a forward's logits held NaN/inf
    # [B] bool: the row has not emitted an EOS (changed in place: a captured step reads it); NaN/inf in
    # the logits of a row past its EOS, which keeps decoding until every row has, does not count
    live: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    graph_token: torch.Tensor | None = None  # [B] the graph's output token
    warm: bool = False  # a step ran eagerly: kernels compiled, workspaces allocated
    graph_failed: bool = False  # the capture failed: these buffers' steps run eagerly


# model -> (batch size, sampling) -> buffers of a finished run; a run takes what it uses
_POOLS: weakref.WeakKeyDictionary[LlamaModel, BufferPool[_StepBuffers]] = weakref.WeakKeyDictionary()
_POOLED_CACHE_ALIGN = 256  # positions: later, slightly longer runs still fit the kept cache


# model -> how many (batch size, sampling) combinations its pool keeps (set_plain_pool_capacity)
_CAPACITIES: weakref.WeakKeyDictionary[LlamaModel, int] = weakref.WeakKeyDictionary()


def release_plain_buffers(model: LlamaModel) -> None:
    """Free the buffers and CUDA graphs that plain decoding with ``cuda_graph`` keeps for ``model``."""
    _POOLS.pop(model, None)


def set_plain_pool_capacity(model: LlamaModel, capacity: int) -> None:
    """Keep the buffers and CUDA graphs of up to ``capacity`` (batch size, sampling) combinations of
    plain decoding with ``model`` (default 4; fewer drops the least recently used). The setting belongs
    to the model: every :class:`eagle.EagleModel` on it shares it."""
    _CAPACITIES[model] = check_pool_capacity(capacity)
    if model in _POOLS:
        _POOLS[model].capacity = capacity


def _pool_of(model: LlamaModel) -> BufferPool[_StepBuffers]:
    pool = _POOLS.get(model)
    if pool is None:
        pool = _POOLS[model] = BufferPool(_CAPACITIES.get(model, DEFAULT_POOL_CAPACITY))
    return pool


@torch.inference_mode()
def plain_decode_steps(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
    seed: int | None = None,
    reuse_buffers: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The steps of :func:`generate_plain` (same arguments): per target forward, ``(token,
    nonfinite)``: the new token of every row (int64 ``[B]``) and whether any logits so far held
    NaN/inf (a bool scalar), both on the model's device and not read here (no host sync per step
    beyond the all-rows-finished check when ``eos_token_id`` is given). Rows that emitted an EOS keep
    producing tokens until every row has (the caller truncates); at most ``max_new_tokens`` steps.

    ``reuse_buffers`` (default: ``cuda_graph``; never with a ``generator``): keep the KV cache, the
    step's buffers and its CUDA graph after the run, for the next run of the same batch size and
    sampling parameters that fits them (it replays the graph from its first step, with no capture);
    the 4 most recently used combinations are kept (:func:`set_plain_pool_capacity`);
    :func:`release_plain_buffers` frees them."""
    if as_number("max_new_tokens", max_new_tokens, integral=True) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    from eagle.speculate import SamplingParams  # (the module imports this one)

    # refused before kept buffers are taken or a seed drawn (a refused call keeps both as they were)
    SamplingParams(temperature, top_k, top_p, min_p)  # its checks of the filters, by name
    rng.check_seed(seed)
    stop_list = stop_ids(eos_token_id, model.config.vocab_size)
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, got one on {model.device}")
    block, lengths = pad_prompts(prompts, model.device)
    B = block.shape[0]
    model.check_generation_length(block.shape[1], max_new_tokens)
    if generator is not None and seed is not None:
        raise ValueError("pass seed or generator, not both")
    per_row = temperature != 0 and generator is None
    reuse = (cuda_graph if reuse_buffers is None else reuse_buffers) and generator is None
    # greedy ignores the filters: any of them replays the same buffers and graph
    key = (B, temperature, top_k, top_p, min_p) if temperature != 0 else (B, 0.0)
    pool = _pool_of(model) if reuse else None
    buffers = _take_buffers(
        model, pool.take(key) if reuse else None, B, block.shape[1] + max_new_tokens, per_row, reuse
    )
    if per_row:
        if seed is None:
            seed = rng.draw_seed()
        buffers.seeds.copy_(rng.row_seeds(seed, B, model.device))
        buffers.draws.zero_()
    nonfinite, cache = buffers.nonfinite, buffers.cache
    stop = torch.tensor(stop_list, dtype=torch.int64, device=model.device)
    live = buffers.live  # stays all true without EOS ids (a kept graph serves runs with and without)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            token, bad = argmax_checked_live(logits, live)
            nonfinite.logical_or_(bad)
            return token
        logits, bad = zero_nonfinite_rows(logits, live)  # a row past its EOS may hold NaN/inf
        nonfinite.logical_or_(bad)
        if logits.device.type == "cpu" and bool(bad):  # free to read on CPU; warp_logits would refuse
            raise FloatingPointError(NONFINITE_MESSAGE)  # the row with a ValueError, unlike every other path
        if logits.dtype == torch.float64:  # warp_logits computes in float32 and takes up to float32
            logits = logits.float()
        probs = eagle_kernels.warp_logits(logits, temperature, top_k, top_p, min_p)
        if per_row:
            u = rng.uniforms(buffers.seeds, buffers.draws, 1)[:, 0]
            buffers.draws.add_(1)
            return rng.inverse_cdf(probs, u)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def step() -> torch.Tensor:
        out = model(buffers.step_input[:, None], cache)
        cache.advance(1)
        new = choose(out.logits[:, 0])
        buffers.step_input.copy_(new)
        return new

    if not cuda_graph and generator is None:  # the same step in one C++ call where it applies
        step = _cpu_decode_step(model, buffers, temperature, top_k, top_p, min_p) or step

    try:
        out = model(block, cache, logits_index=(lengths - 1)[:, None])
        cache.advance(lengths, max_increment=block.shape[1])  # the bound spares a device sync
        token = choose(out.logits[:, 0])
        yield token, nonfinite
        if stop.numel():
            live.logical_and_(~torch.isin(token, stop))
        buffers.step_input.copy_(token)
        for _ in range(max_new_tokens - 1):
            if stop.numel() and not bool(live.any()):
                break
            token = _next_token(buffers, step, cuda_graph, generator)
            yield token, nonfinite
            if stop.numel():
                live.logical_and_(~torch.isin(token, stop))
    finally:
        if reuse:  # also when the caller stops iterating early
            pool.put(key, buffers)


_CPU_DECODE_STEP = os.environ.get("EAGLE_CPU_DECODE_STEP", "1") != "0"


def set_cpu_decode_step(enabled: bool) -> bool:
    """Turn the one-call plain decoding step on CPU (``eagle_C::llama_decode_step``) on or off (off:
    the forward, the cache's advance and the pick from Python; the same C++ functions, so the same
    tokens); returns the previous setting. ``EAGLE_CPU_DECODE_STEP=0`` starts it off."""
    global _CPU_DECODE_STEP
    previous, _CPU_DECODE_STEP = _CPU_DECODE_STEP, bool(enabled)
    invalidate_cpu_caches()  # (speculative="auto" keeps the call per run)
    return previous


def warp_param_tensors(rows: int, temperature, top_k, top_p, min_p, device=None) -> tuple | None:
    """``warp_logits``' per-row parameters for ``rows`` rows as its wrapper makes them from Python
    numbers (float32 temperature / top_p / min_p, int64 top_k), for the C++ ops that take them as
    tensors; None for parameters of other types (tensors, numpy scalars, ...: the wrapper's checks and
    conversions apply)."""
    values = (temperature, top_k, top_p, min_p)
    if not all(type(v) in (int, float) for v in values) or type(top_k) is not int:
        return None
    dtypes = (torch.float32, torch.int64, torch.float32, torch.float32)
    return tuple(torch.full((rows,), v, dtype=dtype, device=device) for v, dtype in zip(values, dtypes))


def cpu_decode_step_args(
    model: LlamaModel, step_input: torch.Tensor, cache: KVCache, nonfinite: torch.Tensor, sampled: tuple = ()
) -> tuple | None:
    """The arguments of ``eagle_C::llama_decode_step`` for steps of ``model`` over ``step_input``
    (int64 ``[B]``, the next input, updated in place by each step) and ``cache``, OR-ing NaN/inf into
    ``nonfinite``; ``sampled``: ``(*warp_param_tensors(...), seeds, draws)`` to sample, ``()`` for
    greedy. None where the one-call step does not apply (switched off, the op missing, not the CPU fast
    path). The weights' packed copies are gathered here: weights must not change while they are used."""
    if not (_CPU_DECODE_STEP and _ext.has_op("llama_decode_step")):
        return None
    weights = model.cpu_forward_weights(step_input)
    if weights is None:
        return None
    embed, for_op, norm_w, lm_head = weights
    doubled, signs = rope_tables(model.inv_freq(step_input.device))
    cfg = model.config
    return (step_input, embed, for_op, cache.kv, cache.seqlens, doubled, signs, cfg.num_heads, cfg.num_kv_heads,
            cfg.rms_norm_eps, norm_w, lm_head, nonfinite, *sampled)  # fmt: skip


def _cpu_decode_step(model: LlamaModel, buffers: _StepBuffers, temperature, top_k, top_p, min_p):
    """A step of :func:`plain_decode_steps` in one C++ call (``eagle_C::llama_decode_step``: the
    target's forward over the step's input, the cache's advance, the pick as ``choose`` makes it, the
    next input), or None where it does not apply (not the CPU fast path, the op missing, switched off,
    filters given as tensors). The arguments are gathered once per run (:func:`cpu_decode_step_args`).
    After each forward's weights stream through the caches, the dozen Python-level calls of a step run
    cold; this makes one."""
    cache, step_input, nonfinite = buffers.cache, buffers.step_input, buffers.nonfinite
    sampled: tuple = ()
    if temperature != 0:
        params = warp_param_tensors(step_input.shape[0], temperature, top_k, top_p, min_p)
        if params is None or buffers.seeds is None:
            return None
        sampled = (*params, buffers.seeds, buffers.draws)
    args = cpu_decode_step_args(model, step_input, cache, nonfinite, sampled)
    if args is None:
        return None
    op = torch.ops.eagle_C.llama_decode_step

    def step() -> torch.Tensor:
        token, _ = op(*args, live=buffers.live)
        cache.length_bound += 1  # what cache.advance(1) keeps (the op checked the room)
        if bool(nonfinite):  # free to read on CPU: raise now, not after the remaining steps
            raise FloatingPointError(NONFINITE_MESSAGE)
        return token

    return step


def _take_buffers(model, pooled, B: int, length: int, per_row: bool, reuse: bool) -> _StepBuffers:
    """``pooled`` reset for a new run when its cache holds ``length`` positions, else new buffers."""
    if pooled is not None and pooled.cache.max_seq_len >= length:
        pooled.cache.reset()
        pooled.nonfinite.zero_()
        pooled.live.fill_(True)
        return pooled
    attended = length  # (the rounding's slots are never attended to by an emitted token)
    if reuse:
        length = -(-length // _POOLED_CACHE_ALIGN) * _POOLED_CACHE_ALIGN
    device = model.device
    return _StepBuffers(
        cache=model.new_cache(B, length, attended_len=attended),
        step_input=torch.zeros(B, dtype=torch.int64, device=device),
        seeds=torch.zeros(B, dtype=torch.int64, device=device) if per_row else None,
        draws=torch.zeros(B, dtype=torch.int64, device=device) if per_row else None,
        nonfinite=torch.zeros((), dtype=torch.bool, device=device),
        live=torch.ones(B, dtype=torch.bool, device=device),
    )


def _next_token(buffers: _StepBuffers, step, cuda_graph: bool, generator) -> torch.Tensor:
    """One decoding step: eager, or (CUDA graphs) eager once to warm up, then captured and replayed."""
    if not cuda_graph or buffers.graph_failed:
        return step()
    if buffers.graph is None and not buffers.warm:
        buffers.warm = True
        return on_side_stream(step, buffers.cache.device)
    cache = buffers.cache
    cache.check_room(1)
    if buffers.graph is None:
        try:
            buffers.graph, buffers.graph_token = cuda_graph_capture(step, [cache], generator)
        except Exception as e:  # noqa: BLE001 - a graph is an optimisation; the eager step is exact
            # (a host sync inside the step, e.g. EAGLE_KERNELS_DEBUG=1's checks, or out of memory;
            # a failed capture ran no kernel and left the host bounds as they were)
            buffers.graph_failed = True
            synchronize_stream(cache.device)
            warnings.warn(f"CUDA graph capture failed ({e}); continuing without CUDA graphs", stacklevel=3)
            return step()
    replay(buffers.graph, cache.device)
    cache.length_bound += 1  # what the replayed cache.advance(1) did on the device
    return buffers.graph_token.clone()


def _truncate_at_eos(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
    out = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:end])
    return out
