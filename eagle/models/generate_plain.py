"""Vanilla autoregressive decoding on this runtime: the baseline every EAGLE speedup is measured
against (same model, same cache, same kernels, one target forward per token)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

import eagle_kernels
from eagle import rng
from eagle.models.cuda_graph import capture as cuda_graph_capture
from eagle.models.cuda_graph import on_side_stream
from eagle.models.llama import LlamaModel
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


def nonfinite_flag(logits: torch.Tensor) -> torch.Tensor:
    """Whether any logit is NaN/inf, a bool scalar tensor on ``logits``' device."""
    if _argmax_in_cpp(logits):
        return torch.ops.eagle_C.argmax_checked(logits)[1]
    return ~torch.isfinite(logits).all()


def _argmax_in_cpp(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and _ext.has_op("argmax_checked") and not torch.compiler.is_compiling()


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded block ``[B, T_max]`` (padding id 0) and the lengths ``[B]`` (int64)."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    block = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
    for b, p in enumerate(prompts):
        block[b, : len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
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
        semantics; ``top_k=0``, ``top_p=1``, ``min_p=0`` disable those filters).
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
    return _truncate_at_eos(rows, set(_as_list(eos_token_id)))


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The steps of :func:`generate_plain` (same arguments): per target forward, ``(token,
    nonfinite)``: the new token of every row (int64 ``[B]``) and whether any logits so far held
    NaN/inf (a bool scalar), both on the model's device and not read here (no host sync per step
    beyond the all-rows-finished check when ``eos_token_id`` is given). Rows that emitted an EOS keep
    producing tokens until every row has (the caller truncates); at most ``max_new_tokens`` steps."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if cuda_graph and model.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, got one on {model.device}")
    block, lengths = pad_prompts(prompts, model.device)
    B = block.shape[0]
    limit = model.config.max_position_embeddings
    if block.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({block.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    if generator is not None and seed is not None:
        raise ValueError("pass seed or generator, not both")
    per_row = temperature != 0 and generator is None
    if per_row:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        seeds = rng.row_seeds(seed, B, model.device)
        draws = torch.zeros(B, dtype=torch.int64, device=model.device)  # advanced in place: graph-safe
    # Set on the device when a forward's logits hold NaN/inf; the caller reads it when it needs to.
    nonfinite = torch.zeros((), dtype=torch.bool, device=model.device)
    stop = torch.tensor(_as_list(eos_token_id), dtype=torch.int64, device=model.device)
    cache = model.new_cache(B, block.shape[1] + max_new_tokens)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            token, bad = argmax_checked(logits)
            nonfinite.logical_or_(bad)
            return token
        nonfinite.logical_or_(nonfinite_flag(logits))
        if logits.dtype == torch.float64:  # warp_logits computes in float32 and takes up to float32
            logits = logits.float()
        probs = eagle_kernels.warp_logits(logits, temperature, top_k, top_p, min_p)
        if per_row:
            u = rng.uniforms(seeds, draws, 1)[:, 0]
            draws.add_(1)
            return rng.inverse_cdf(probs, u)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    out = model(block, cache, logits_index=(lengths - 1)[:, None])
    cache.advance(lengths, max_increment=block.shape[1])  # the bound spares a device sync
    token = choose(out.logits[:, 0])
    yield token, nonfinite
    finished = torch.isin(token, stop)
    step_input = token.clone()  # the step reads its input here (a fixed address for graph replay)

    def step() -> torch.Tensor:
        out = model(step_input[:, None], cache)
        cache.advance(1)
        new = choose(out.logits[:, 0])
        step_input.copy_(new)
        return new

    graph = None
    for i in range(max_new_tokens - 1):
        if stop.numel() and bool(finished.all()):
            break
        if cuda_graph and graph is None and i == 1:  # step 0 ran eagerly: kernels are warm
            cache.check_room(1)
            graph, graph_token = cuda_graph_capture(step, [cache], generator)
        if graph is None and cuda_graph:
            token = on_side_stream(step)  # the warm-up step before the capture
        elif graph is None:
            token = step()
        else:
            cache.check_room(1)
            graph.replay()
            cache.length_bound += 1  # what the replayed cache.advance(1) did on the device
            token = graph_token.clone()
        yield token, nonfinite
        finished |= torch.isin(token, stop)


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _truncate_at_eos(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
    out = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(row[:end])
    return out
