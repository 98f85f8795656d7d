"""The user-facing API: ``eagle.load(...)`` returns an :class:`EagleModel` that generates text with EAGLE."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import eagle_kernels
from eagle._args import as_number, is_array, numpy_batch_as_list, stop_ids, token_ids
from eagle.acceptance import AcceptanceFit, PairAcceptance, read_pair_acceptance
from eagle.autotree import ACCEPT_RATE, WIDENING_GAIN, choose_tree, fit_accept_rate
from eagle.models import generate_plain, load_draft, load_target
from eagle.models.cuda_graph import DEFAULT_POOL_CAPACITY, BufferPool
from eagle.models.draft import DraftHead
from eagle.models.generate_plain import (
    NONFINITE_MESSAGE,
    plain_decode_steps,
    release_plain_buffers,
    set_plain_pool_capacity,
)
from eagle.models.llama import LlamaModel
from eagle.models.weights import resolve_dtype
from eagle.rng import check_seed, draw_seed
from eagle.speculate import SamplingParams, SpeculativeDecoder
from eagle.tree import TreeConfig

BUNDLED = "tiny-code"
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class GenerateResult:
    """Output of :meth:`EagleModel.generate`.

    tokens: new tokens per prompt, up to and including EOS, at most ``max_new_tokens``.
    accept_lengths: per prompt, tokens emitted by each target forward after the prefill.
    target_forwards: target forwards after the prefill, summed over the batch's rows.
    """

    tokens: list[list[int]]
    accept_lengths: list[list[int]]
    target_forwards: int
    texts: list[str] | None = None
    # speculative="auto": speculative rounds, plain steps, plain runs and the latest speeds
    # (:meth:`eagle.adaptive.AutoSpeculation.summary`); None otherwise
    speculation: dict | None = None
    # the draft tree the run used (the one tree="dynamic" chose); None for plain decoding
    tree: TreeConfig | eagle_kernels.StaticTree | None = None

    @property
    def mean_accept_length(self) -> float:
        """tau: tokens emitted per target forward in the decode phase, averaged over rounds."""
        lengths = [n for row in self.accept_lengths for n in row]
        return sum(lengths) / len(lengths) if lengths else 0.0


def _drop_least_recent(kept: dict, keep: int) -> list:
    """Remove the oldest entries of ``kept`` (kept in order of use, most recent last) until at most
    ``keep`` remain; returns their values. (``list(kept)``: a snapshot, as another thread may add.)"""
    dropped = []
    for key in list(kept)[: max(len(kept) - keep, 0)]:
        value = kept.pop(key, None)
        if value is not None:
            dropped.append(value)
    return dropped


def _resolve_bundled(name: str, part: str) -> str:
    path = ASSETS / BUNDLED / part
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled {BUNDLED!r} {part} is not in this installation ({path} has no config.json); "
            "pass your own checkpoint directories, or train the pair with `eagle train`"
        )
    return str(path)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


@dataclass
class _Acceptance:
    """What the runs of one sampling setting measured of the pair's per-token acceptance."""

    rate: float  # the estimate: forward-weighted mean of the runs' fits
    weight: int  # forwards behind it (capped, so that it keeps following the pair)
    used: float  # the rate tree="dynamic" chooses with now (moved only by a clear change)


# tree="dynamic": runs shorter than this (in target forwards) do not refit the acceptance; the
# estimate's weight is capped at ACCEPT_WEIGHT_CAP forwards; the tree is chosen again once the
# estimate moved this far from the rate it was chosen with (near-equal trees would flip otherwise)
MIN_FORWARDS_TO_FIT = 16
# A server may send another tree or temperature with every request: the decoders (one per tree) and
# the refitted acceptances (one per sampling setting) a model keeps for later calls are bounded, the
# least recently used dropped first
MAX_KEPT_DECODERS = 32
MAX_KEPT_ACCEPTANCES = 64
# stream(speculative="auto"): a chunk of plain steps is emitted once it has run this long (seconds): a
# reader gets tokens at least ~20 times a second, and the loop's Python per emission stays small
STREAM_CHUNK_SECONDS = 0.05
ACCEPT_WEIGHT_CAP = 1024
ACCEPT_RATE_STEP = 0.03


@functools.cache
def _default_static_tree() -> eagle_kernels.StaticTree:
    """tree="static": the EAGLE-1 paper's tree for 7B models (built once)."""
    return eagle_kernels.build_static_tree(eagle_kernels.MC_SIM_7B_63)


class EagleModel:
    """A target model with an EAGLE draft head (or none: plain decoding only)."""

    def __init__(
        self,
        target: LlamaModel,
        head: DraftHead | None,
        tokenizer=None,
        pair_acceptance: PairAcceptance | None = None,
    ) -> None:
        """``pair_acceptance``: the pair's measured acceptance (:mod:`eagle.acceptance`; :func:`load`
        reads the head's ``acceptance.json``), the prior of ``tree="dynamic"`` until runs refit it."""
        self.target, self.head, self.tokenizer = target, head, tokenizer
        self.pair_acceptance = pair_acceptance
        self._decoders: dict[object, SpeculativeDecoder] = {}
        self._acceptance: dict[SamplingParams, _Acceptance] = {}
        # one pool for every tree's decoder: a refit that switches trees, or several trees in turn,
        # cannot keep more than kept_batch_states sets of caches alive (each a KV cache of the batch)
        self._buffer_pool: BufferPool = BufferPool(DEFAULT_POOL_CAPACITY)

    @property
    def kept_batch_states(self) -> int:
        """With ``cuda_graph=True``: how many (draft tree, batch size, sampling) combinations keep their
        caches and CUDA graph for later calls, all trees together, and how many (batch size, sampling)
        combinations plain decoding keeps (default 4 each). A caller that cycles through more than this
        re-allocates and re-captures on every call; setting a smaller number frees the least recently
        used. Plain decoding's buffers belong to the target model, so models built on the same target
        share that part of the setting (the last set wins)."""
        return self._buffer_pool.capacity

    @kept_batch_states.setter
    def kept_batch_states(self, count: int) -> None:
        self._buffer_pool.capacity = count  # validates it
        set_plain_pool_capacity(self.target, count)

    @property
    def accept_rates(self) -> dict[SamplingParams, float]:
        """The per-token acceptance that ``tree="dynamic"`` sizes its tree with, per sampling setting
        its runs measured (others use :meth:`prior_acceptance`): each speculative run with the dynamic
        tree refits it from its tau (:func:`eagle.autotree.fit_accept_rate`)."""
        return {k: a.used for k, a in self._acceptance.items()}

    def prior_acceptance(self, sampling: SamplingParams | float | None = None) -> AcceptanceFit:
        """The acceptance ``tree="dynamic"`` starts from for ``sampling`` (greedy by default; a number
        is a temperature, ``eagle.SamplingParams(temperature, top_k, top_p, min_p)`` the whole
        setting): the pair's measured one (``acceptance.json``) where there is one, else
        :data:`eagle.autotree.ACCEPT_RATE` and :data:`eagle.autotree.WIDENING_GAIN`. Runs refit the
        rate (:attr:`accept_rates`, keyed by ``SamplingParams``); the gain stays."""
        key = self._sampling_key(sampling)
        if self.pair_acceptance is not None:
            return self.pair_acceptance.for_temperature(key.temperature)
        return AcceptanceFit(ACCEPT_RATE, WIDENING_GAIN)

    @staticmethod
    def _sampling_key(sampling: SamplingParams | float | None) -> SamplingParams:
        if sampling is None:
            return SamplingParams()
        if isinstance(sampling, (int, float)) and not isinstance(sampling, bool):
            return SamplingParams(temperature=sampling).as_key()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(
                f"sampling must be an eagle.SamplingParams or a temperature, got {type(sampling).__name__}"
            )
        return sampling.as_key()

    def _learn_acceptance(self, sampling: SamplingParams, tree, accept: list[list[int]]) -> None:
        """Refit the acceptance of ``sampling`` from a dynamic-tree run's accept lengths."""
        forwards = sum(len(row) for row in accept)
        if not isinstance(tree, TreeConfig) or forwards < MIN_FORWARDS_TO_FIT:
            return
        tau = sum(map(sum, accept)) / forwards
        fitted = fit_accept_rate(tree.depth, tree.total_tokens, tau, self.prior_acceptance(sampling).gain)
        key = self._sampling_key(sampling)
        old = self._acceptance.pop(key, None)
        if old is None:
            _drop_least_recent(self._acceptance, MAX_KEPT_ACCEPTANCES - 1)
            self._acceptance[key] = _Acceptance(fitted, min(forwards, ACCEPT_WEIGHT_CAP), fitted)
            return
        self._acceptance[key] = old  # (the most recently used last)
        weight = old.weight + forwards
        old.rate = (old.rate * old.weight + fitted * forwards) / weight
        old.weight = min(weight, ACCEPT_WEIGHT_CAP)
        if abs(old.rate - old.used) > ACCEPT_RATE_STEP:
            old.used = old.rate

    @property
    def device(self) -> torch.device:
        return self.target.device

    # ------------------------------------------------------------------------------------------
    def _tree(
        self, tree, batch_size: int = 1, sampling: SamplingParams | None = None, seeded: bool = False
    ) -> TreeConfig | eagle_kernels.StaticTree:
        """``seeded``: a seeded call; sampled, it sizes a dynamic tree from the prior alone, since
        the refit would change the tree, and with it the draws, from one call with a seed to the
        next."""
        _check_tree(tree)
        if isinstance(tree, (TreeConfig, eagle_kernels.StaticTree)):
            return tree
        if tree == "dynamic":
            prior = self.prior_acceptance(sampling)
            key = self._sampling_key(sampling)
            known = None if seeded and not key.greedy else self._acceptance.get(key)
            rate = prior.accept_rate if known is None else known.used
            return self._fit(
                choose_tree(self.target, batch_size, self.head, accept_rate=rate, gain=prior.gain)
            )
        if tree == "static":
            return _default_static_tree()
        return TreeConfig.chain(5)  # "chain"

    def _fit(self, tree: TreeConfig) -> TreeConfig:
        """Shrink a default tree whose width exceeds a (tiny) draft vocabulary."""
        vocab = getattr(self.head, "draft_vocab_size", self.target.config.vocab_size)
        if tree.topk <= vocab:
            return tree
        k = vocab
        return TreeConfig(tree.depth, k, min(tree.total_tokens, 1 + k + (tree.depth - 1) * k * k))

    def _decoder(
        self,
        tree,
        batch_size: int = 1,
        cuda_graph: bool = False,
        sampling: SamplingParams | None = None,
        seeded: bool = False,
    ) -> SpeculativeDecoder:
        resolved = self._tree(tree, batch_size, sampling, seeded)
        # A static tree is keyed by what defines it: keyed by object, every call with a newly built
        # tree (tree="static" did this) made a new decoder, which kept its own caches and CUDA graph.
        shape = resolved if isinstance(resolved, TreeConfig) else ("static", resolved.paths, resolved.topk)
        key = (shape, cuda_graph)
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            for dropped in _drop_least_recent(self._decoders, MAX_KEPT_DECODERS - 1):
                dropped.release_buffers()
            decoder = SpeculativeDecoder(
                self.target, self.head, resolved, cuda_graph=cuda_graph, buffer_pool=self._buffer_pool
            )
        self._decoders[key] = decoder  # (the most recently used last)
        return decoder

    def release_buffers(self) -> None:
        """Free the KV caches and CUDA graphs that ``cuda_graph=True`` calls keep for later calls."""
        for decoder in list(self._decoders.values()):  # (a copy: another thread may add one)
            decoder.release_buffers()
        release_plain_buffers(self.target)

    def _encode(self, prompts) -> list[list[int]]:
        prompts = numpy_batch_as_list(prompts)
        array = is_array(prompts)
        if (
            isinstance(prompts, str)
            or (array and prompts.ndim == 1)
            or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int))
        ):
            raise TypeError(
                "prompts must be a list of prompts (strings or token-id lists), not a single prompt"
            )
        if not (array or isinstance(prompts, Sequence)):
            raise TypeError(
                f"prompts must be a list of prompts (strings or token-id lists), got {type(prompts).__name__}"
            )
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        if isinstance(prompts, Sequence) and isinstance(prompts[0], Mapping):
            raise TypeError(
                "prompts must be a list of prompts: a conversation (a list of messages) is one prompt, "
                "pass [messages]"
            )
        return [self._encode_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]

    def _encode_prompt(self, p, name: str) -> list[int]:
        """One prompt (text, token ids, or a conversation) as checked token ids; errors call it ``name``."""
        if _is_conversation(p):
            ids = chat_prompt_ids(self.tokenizer, p, name)
        elif isinstance(p, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; this checkpoint has none, pass token ids")
            _check_encodable(p, name)
            # The tokenizer's own convention (a Llama tokenizer adds BOS), as transformers' users get.
            ids = self.tokenizer(p, verbose=False)["input_ids"]
        elif isinstance(p, (bytes, bytearray)):
            raise TypeError(f"{name} is bytes; decode it to str (text) or pass a list of token ids")
        else:
            ids = token_ids(p, name, "a string or a sequence of token ids")
        if not ids:
            raise ValueError(f"{name} is empty")
        V = self.target.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"{name} holds token ids outside the vocabulary [0, {V}): {bad[:5]}")
        return ids

    def _eos(self, eos_token_id) -> list[int]:
        """The stop ids: ``eos_token_id`` when given, else, as transformers' generate, the
        checkpoint's generation_config.json eos when it has that file (none there: no stop id,
        config.json's is not used), else config.json's."""
        source, fix = "eos_token_id", ""
        if eos_token_id is None:
            cfg = self.target.config
            from_generation = cfg.has_generation_config
            eos_token_id = cfg.generation_eos_token_id if from_generation else cfg.eos_token_id
            # a bad id in the checkpoint's files is named there (the caller passed none)
            source = f"the target's {'generation_config' if from_generation else 'config'}.json eos_token_id"
            fix = " (pass eos_token_id= to override it)"
        return stop_ids(eos_token_id, self.target.config.vocab_size, source, fix)

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts=None,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        tree="dynamic",
        speculative: bool | str = True,
        eos_token_id=None,
        seed: int | None = None,
        cuda_graph: bool = False,
        attention_mask=None,
        input_ids=None,
    ) -> GenerateResult:
        """Generate up to ``max_new_tokens`` new tokens for each prompt, as one batch.

        Greedy output is token for token plain greedy decoding of the target; sampled output has
        exactly the distribution of plain sampling with the same settings (lossless speculative
        sampling). Only the speed and ``accept_lengths`` depend on the draft head and the tree, and,
        for a seeded sampled call, which sample it draws: the draws follow the tree, so another head,
        head dtype or tree gives another (equally exact) sample from the same seed.

        Parameters
        ----------
        prompts : list of str, of token-id lists (or a 2-D integer array / tensor), or of conversations
            One entry per sequence; lengths may differ. Strings go through the target's tokenizer
            with its own convention (a Llama tokenizer adds BOS). A conversation, a list of
            ``{"role": ..., "content": ...}`` messages, goes through the tokenizer's chat template with
            the assistant's turn opened (as chat models and their EAGLE heads expect). A single prompt
            must still be a list (``["def f():"]``, ``[messages]``). Every row of a 2-D array is a
            whole prompt unless ``attention_mask`` says where its padding is. A tokenizer's output
            (a mapping with ``input_ids`` and ``attention_mask``, e.g. ``tokenizer(texts,
            padding=True, return_tensors="pt")``, padded or not) is taken as such a pair, as
            ``prompts`` or unpacked with ``**`` (transformers' ``generate(**inputs)``).
        max_new_tokens : int >= 1
            New tokens per prompt, the stop token included; prompt + new tokens must fit the target's
            ``max_position_embeddings`` (checked before any work).
        temperature, top_k, top_p, min_p
            Hugging Face's warpers in that order: ``temperature`` 0 is greedy (the others are then
            ignored), > 0 divides the logits; ``top_k`` 0 (or -1) disables; ``top_p`` in (0, 1], 1 disables;
            ``min_p`` in [0, 1], 0 disables. The defaults filter nothing; transformers' sampling
            applies ``top_k=50`` and the ``generation_config.json`` settings unless told otherwise.
        tree : "dynamic" (default), "static", "chain", or an :class:`eagle.TreeConfig`
            The draft tree of a round. ``"dynamic"``: EAGLE-2's tree, sized for this machine by
            :mod:`eagle.autotree` (timed once per model, head, device and batch size); ``"static"``:
            EAGLE-1's ``mc_sim_7b_63``; ``"chain"``: one path; ``TreeConfig(depth, topk,
            total_tokens)``: EAGLE-2's tree of that size.
        speculative : True, False or "auto"
            True: EAGLE rounds; False: plain decoding (the baseline; no head needed); ``"auto"``:
            between rounds, speculate or decode plainly, whichever the clock says is faster for this
            pair, batch and sampling (:mod:`eagle.adaptive`; greedy tokens are the same, seeded
            sampled runs are not reproducible; not with ``cuda_graph``). ``result.speculation`` then
            holds its counts.
        eos_token_id : int, list of int, or None
            Stop ids; a row stops after emitting one (it is included in its tokens). None: as
            transformers' generate, the checkpoint's ``generation_config.json`` eos when it has that
            file, else ``config.json``'s.
        seed : int in [0, 2**63 - 1], or None
            Sampling only: one independent stream per row derived from the seed. With a fixed tree
            (``"static"``, ``"chain"``, a TreeConfig or StaticTree) or ``speculative=False``, a row's
            tokens do not depend on the other rows or on the batch size, and the same call repeats
            exactly. ``"dynamic"`` sizes its tree per batch size from timed forwards (seeded calls
            from the prior acceptance alone), so there a seeded row can differ between batch sizes
            and machines; the same call repeats within a process, and across processes on one
            machine while the timings saved on disk last (``EAGLE_AUTOTREE_CACHE``; each an exact
            sample of the target either way).
            None: a seed drawn from torch's global generator.
        cuda_graph : bool
            On CUDA, replay each speculative round (or plain decoding step) from a captured CUDA
            graph (no Python launch overhead per kernel); the output is the same. The buffers and
            graph of a batch size are kept for the next call with the same batch size and sampling
            parameters (no capture then); :meth:`release_buffers` frees them.
        attention_mask : 2-D array / tensor of 0 / 1 (or bool), optional
            With 2-D ``prompts`` of the same shape (a padded batch): each row's prompt is its ids
            where the mask is 1, which must be one run (left or right padding); the pad ids are
            dropped, as Hugging Face's ``generate`` ignores them.
        input_ids : optional
            The prompts under transformers' name (so ``generate(**tokenizer_output)`` works); give
            ``prompts`` or ``input_ids``, not both.

        Returns
        -------
        GenerateResult
            ``tokens`` (new ids per prompt), ``texts`` (decoded, when there is a tokenizer),
            ``accept_lengths`` and ``mean_accept_length`` (tau), ``tree`` (the tree used),
            ``speculation`` (``"auto"``'s counts).

        Raises
        ------
        ValueError / TypeError
            An empty or over-long prompt, token ids outside the vocabulary, a parameter out of range,
            an ``attention_mask`` of another shape, not 0 / 1, or with padding inside a row,
            speculation without a draft head, ``cuda_graph`` off CUDA; FloatingPointError when the
            target's logits turn NaN or inf.
        """
        prompts = _prompts_or_input_ids(prompts, input_ids)
        max_new_tokens = _check_max_new_tokens(max_new_tokens)
        auto = _check_speculative(speculative, cuda_graph, tree)
        ids = self._encode(_unpadded(prompts, attention_mask))
        sampling = SamplingParams(temperature, top_k, top_p, min_p)
        check_seed(seed)
        _warn_if_unreproducible(auto, seed, sampling, stacklevel=3)  # (generate runs under a decorator)
        eos = self._eos(eos_token_id)
        if not speculative:
            tokens = generate_plain(
                self.target, ids, max_new_tokens, **_plain_decoding_args(sampling, eos, seed, cuda_graph)
            )
            accept = [[1] * max(len(t) - 1, 0) for t in tokens]
            return self._result(tokens, accept)
        if self.head is None:
            raise ValueError(f"speculative={speculative!r} needs a draft head: pass draft=... to eagle.load")
        tokens: list[list[int]] = [[] for _ in ids]
        decoder = self._decoder(tree, len(ids), cuda_graph, sampling, seed is not None)
        # (auto: a plain phase's steps run back to back, no emission between them: nothing streams)
        emissions = decoder.run(
            ids, max_new_tokens, sampling, eos_token_ids=eos, seed=seed, auto=auto, plain_chunk=max_new_tokens
        )
        for emission in emissions:
            for row, new in zip(emission.rows, emission.tokens):
                tokens[row].extend(new)
        # (this run's record: the decoder's accept_lengths() may be another thread's run by now)
        accept = [emission.accept_lengths[b] for b in range(len(ids))]
        result = self._result(tokens, accept)
        result.tree = decoder.tree
        if auto:
            result.speculation = emission.auto.summary()
        elif (
            isinstance(tree, str) and tree == "dynamic"
        ):  # (an auto run's plain steps would read as rejected drafts)
            self._learn_acceptance(sampling, decoder.tree, accept)
        return result

    def _encode_one(self, prompt) -> list[int]:
        """:meth:`stream`'s one prompt as token ids, with errors about one prompt (:meth:`_encode`'s
        speak of a list of prompts, the opposite advice here)."""
        what = "stream() takes one prompt: a str, a 1-D sequence of token ids or a conversation"
        if is_array(prompt):
            if prompt.ndim != 1:
                raise TypeError(f"{what}, got an array of shape {tuple(prompt.shape)}")
        elif not isinstance(prompt, (str, Sequence)):
            raise TypeError(f"{what}, got {type(prompt).__name__}")
        elif (
            not isinstance(prompt, str)
            and prompt
            and (isinstance(prompt[0], (str, Sequence)) or is_array(prompt[0]))
        ):
            raise TypeError(f"{what}, not a list of prompts (generate() takes a batch)")
        return self._encode_prompt(prompt, "the prompt")

    def stream(
        self, prompt=None, max_new_tokens: int = 128, *, input_ids=None, attention_mask=None, **kwargs
    ) -> Iterator[list[int]]:
        """An iterator over the new tokens of one prompt as they are accepted (a list per target
        forward; with ``speculative="auto"``, plain steps in lists of up to ~50 ms of steps,
        ``STREAM_CHUNK_SECONDS``). The arguments are checked here, when it is called, not at the
        first ``next``.

        ``prompt``: a str, a 1-D sequence of token ids or a conversation; or, as :meth:`generate` takes
        them, ``input_ids=`` and an ``attention_mask`` (a batch of one row: a tokenizer's output,
        ``stream(**tokenizer(text, return_tensors="pt"))``, padded or not). The other keyword arguments
        are :meth:`generate`'s."""
        max_new_tokens = _check_max_new_tokens(max_new_tokens)
        prompt = _one_unpadded_prompt(
            _prompts_or_input_ids(prompt, input_ids, "stream"),
            attention_mask,
            transformers_form=input_ids is not None,
        )
        ids = [self._encode_one(prompt)]
        sampling = SamplingParams(
            kwargs.pop("temperature", 0.0),
            kwargs.pop("top_k", 0),
            kwargs.pop("top_p", 1.0),
            kwargs.pop("min_p", 0.0),
        )
        tree = kwargs.pop("tree", "dynamic")
        eos = self._eos(kwargs.pop("eos_token_id", None))
        seed = kwargs.pop("seed", None)
        check_seed(seed)
        cuda_graph = kwargs.pop("cuda_graph", False)
        speculative = kwargs.pop("speculative", True)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        auto = _check_speculative(speculative, cuda_graph, tree)
        _warn_if_unreproducible(auto, seed, sampling, stacklevel=2)
        # both paths check this again inside their generators, which run at the first next()
        self.target.check_generation_length(len(ids[0]), max_new_tokens)
        if not speculative:
            return self._stream_plain(
                ids, max_new_tokens, sampling, eos, self._stream_seed(seed, sampling), cuda_graph
            )
        if self.head is None:
            raise ValueError(f"speculative={speculative!r} needs a draft head: pass draft=... to eagle.load")
        decoder = self._decoder(tree, 1, cuda_graph, sampling, seed is not None)
        seed = self._stream_seed(seed, sampling)
        return self._stream_rounds(decoder, tree, ids, max_new_tokens, sampling, eos, seed, auto)

    @staticmethod
    def _stream_seed(seed: int | None, sampling: SamplingParams) -> int | None:
        """A sampled stream's seed, drawn when ``stream()`` is called rather than at the first ``next``
        (as ``generate`` draws it when called): the global generator's state in between does not matter."""
        return draw_seed() if seed is None and not sampling.greedy else seed

    def _stream_rounds(
        self, decoder, tree, ids, max_new_tokens, sampling, eos, seed, auto
    ) -> Iterator[list[int]]:
        """``stream()``'s speculative rounds: one list of tokens per round that emitted any."""
        lengths = None
        # no `with torch.inference_mode()` here: held across a yield it would stay on in the caller
        # between reads (decoder.run is decorated: the mode wraps each of its resumptions only)
        # (auto: plain steps come in chunks of at most ~STREAM_CHUNK_SECONDS, not one emission each)
        emissions = decoder.run(
            ids, max_new_tokens, sampling, eos_token_ids=eos, seed=seed, auto=auto,
            plain_chunk=max_new_tokens, plain_chunk_seconds=STREAM_CHUNK_SECONDS,
        )  # fmt: skip
        for emission in emissions:
            lengths = emission.accept_lengths  # (this run's own record, not the decoder's latest)
            if emission.tokens[0]:
                yield emission.tokens[0]
        if (
            not auto and isinstance(tree, str) and tree == "dynamic"
        ):  # a stream read to its end refits the acceptance
            self._learn_acceptance(sampling, decoder.tree, [lengths[0]])

    def _stream_plain(self, ids, max_new_tokens, sampling, eos, seed, cuda_graph) -> Iterator[list[int]]:
        """``stream(speculative=False)``: one token per target forward, checked for NaN/inf logits
        before it is yielded (streaming reads every token on the host anyway)."""
        steps = plain_decode_steps(
            self.target, ids, max_new_tokens, **_plain_decoding_args(sampling, eos, seed, cuda_graph)
        )
        for token, nonfinite in steps:
            if bool(nonfinite):
                raise FloatingPointError(NONFINITE_MESSAGE)
            new = int(token[0])
            yield [new]
            if new in eos:
                return

    def _result(self, tokens, accept) -> GenerateResult:
        forwards = sum(len(a) for a in accept)
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return GenerateResult(tokens=tokens, accept_lengths=accept, target_forwards=forwards, texts=texts)


def _plain_decoding_args(sampling: SamplingParams, eos: list[int], seed, cuda_graph: bool) -> dict:
    """The keyword arguments of ``generate_plain`` / ``plain_decode_steps`` for one call."""
    return dict(
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        eos_token_id=eos or None,
        seed=seed,
        cuda_graph=cuda_graph,
    )


def _resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device}")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ValueError(f"device {device} requested; the CPU is 'cpu' (or 'cpu:0')")
        return torch.device("cpu")  # 'cpu:0' names the same device; tensors report plain 'cpu'
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested, but this torch build or machine has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device} requested, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


def _warn_if_unreproducible(auto: bool, seed, sampling: SamplingParams, stacklevel: int) -> None:
    if auto and seed is not None and not sampling.greedy:
        warnings.warn(
            "speculative='auto' chooses plain steps or speculative rounds by the clock, and the two draw "
            "their random numbers differently: a seeded sampled call does not repeat (with "
            "speculative=True or False it does); its tokens still follow the target's distribution",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def chat_prompt_ids(tokenizer, messages: Sequence[Mapping], name: str) -> list[int]:
    """A conversation's token ids by the tokenizer's chat template, with the prompt that opens the
    assistant's turn (EAGLE heads of chat models were trained on such prompts): the template's text,
    tokenized without adding special tokens (the template writes its own BOS). ``name`` says which
    prompt in errors."""
    if tokenizer is None:
        raise ValueError(f"{name} is a conversation, which needs a tokenizer; this checkpoint has none")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{name} is a conversation, and this checkpoint's tokenizer has no chat template "
            "(tokenizer_config.json's chat_template): pass text or token ids, or set "
            "model.tokenizer.chat_template"
        )
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or "content" not in message:
            raise ValueError(
                f"{name}: message {i} needs a 'role' (str) and a 'content', got {dict(message)!r}"
            )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _check_speculative(speculative, cuda_graph: bool, tree) -> bool:
    """Validate ``speculative`` (True, False or "auto"), ``cuda_graph`` and ``tree`` (also when plain
    decoding does not use it, so that a typo is not accepted there and refused elsewhere); returns
    whether ``speculative`` is "auto"."""
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    _check_tree(tree)
    if speculative == "auto":
        if cuda_graph:
            raise ValueError(
                "speculative='auto' (plain steps between rounds) does not run with cuda_graph=True"
            )
        return True
    if not isinstance(speculative, bool):
        raise ValueError(f"speculative must be True, False or 'auto', got {speculative!r}")
    return False


TREE_NAMES = ("dynamic", "static", "chain")


def _check_tree(tree) -> None:
    if not (
        isinstance(tree, (TreeConfig, eagle_kernels.StaticTree))
        or (isinstance(tree, str) and tree in TREE_NAMES)
    ):
        raise ValueError(
            f"tree must be 'dynamic', 'static', 'chain' or an eagle.TreeConfig / StaticTree, got {tree!r}"
        )


def _check_max_new_tokens(max_new_tokens) -> int:
    max_new_tokens = as_number("max_new_tokens", max_new_tokens, integral=True)  # numpy ints too
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return max_new_tokens


def _check_encodable(text: str, name: str) -> None:
    """Refuse a prompt holding lone surrogates: bytes that were not UTF-8 (a command-line argument or
    standard input decoded with ``surrogateescape``), which the tokenizer refuses with a TypeError
    naming neither the prompt nor the problem."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = text[err.start : err.end].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"{name} is not valid UTF-8 text: byte {raw[:1].hex(' ')} (0x{raw[0]:02x}) at character "
            f"{err.start} cannot be decoded"
        ) from None


def _prompts_or_input_ids(prompts, input_ids, method: str = "generate"):
    """``generate``'s prompts (``stream``'s prompt), given positionally or as transformers' ``input_ids=``."""
    what = "prompts" if method == "generate" else "a prompt"
    if prompts is None and input_ids is None:
        raise TypeError(f"{method}() needs {what} (or input_ids=, as transformers' generate takes them)")
    if prompts is not None and input_ids is not None:
        raise TypeError(f"{method}() got both {what} and input_ids=: give one")
    return input_ids if prompts is None else prompts


def _unpadded(prompts, attention_mask):
    """``generate``'s prompts, with a padded batch's rows cut to its ``attention_mask`` (a list of 1-D
    tensors; a tokenizer's output, a mapping with ``input_ids``, gives both)."""
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise TypeError(
                "prompts is a mapping without 'input_ids'; pass a list of prompts or a tokenizer's output"
            )
        if attention_mask is not None and prompts.get("attention_mask") is not None:
            raise ValueError("attention_mask is given twice: in the prompts' mapping and as an argument")
        if attention_mask is None:
            attention_mask = prompts.get("attention_mask")
        prompts = prompts["input_ids"]
    if attention_mask is None:
        return prompts
    if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        # rows given as Python lists: their ids checked as the unmasked route checks them (a bool or a
        # float refused by name), before a tensor conversion would turn True into 1
        prompts = [
            token_ids(r, f"prompt {b}") if isinstance(r, Sequence) and not isinstance(r, (str, bytes)) else r
            for b, r in enumerate(prompts)
        ]
    ids, mask = _batch_rows("prompts", prompts), _batch_rows("attention_mask", attention_mask)
    if len(ids) != len(mask):
        raise ValueError(f"attention_mask must have a row per prompt ({len(ids)}), got {len(mask)}")
    return [_unpadded_row(b, row, m) for b, (row, m) in enumerate(zip(ids, mask))]


def _one_unpadded_prompt(prompt, attention_mask, transformers_form: bool = False):
    """``stream``'s prompt with its ``attention_mask`` (given, or in a tokenizer's output mapping)
    applied: ids and mask as one 1-D row or a batch of one row (``return_tensors="pt"``).
    ``transformers_form``: the ids came as ``input_ids=`` (a tokenizer's form, batched even for one
    text), so a batch of one row is that row, mask or not."""
    if isinstance(prompt, Mapping):
        if "input_ids" not in prompt:
            raise TypeError("prompt is a mapping without 'input_ids'; pass a prompt or a tokenizer's output")
        if attention_mask is not None and prompt.get("attention_mask") is not None:
            raise ValueError("attention_mask is given twice: in the prompt's mapping and as an argument")
        attention_mask = prompt.get("attention_mask") if attention_mask is None else attention_mask
        prompt, transformers_form = prompt["input_ids"], True
    if attention_mask is None and not transformers_form:
        return prompt
    if isinstance(prompt, str) or _is_conversation(prompt):
        raise TypeError(
            "stream(): input_ids and an attention_mask are token ids; a str or a conversation is passed as "
            "the prompt, without a mask"
        )
    if attention_mask is None:
        rows = _rows_of_a_batch(prompt)
    else:
        rows = _unpadded(_as_batch_of_one(prompt), _as_batch_of_one(attention_mask))
    if len(rows) != 1:
        raise TypeError(
            f"stream() takes one prompt, got a batch of {len(rows)} rows (generate() takes a batch)"
        )
    return rows[0]


def _rows_of_a_batch(value) -> list:
    """A 2-D tensor / array's rows, or a list of rows (sequences or tensors); anything else, a 1-D row
    included, as one row (checked later as a prompt)."""
    if (isinstance(value, torch.Tensor) or is_array(value)) and value.ndim == 2:
        return list(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        first = value[0]
        if (
            isinstance(first, torch.Tensor)
            or is_array(first)
            or (isinstance(first, Sequence) and not isinstance(first, str))
        ):
            return list(value)
    return [value]


def _as_batch_of_one(value):
    """A 1-D row (tensor, array, or a list of numbers) as a batch of one; anything else as it is."""
    if isinstance(value, torch.Tensor) or is_array(value):
        return value[None] if value.ndim == 1 else value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
        if isinstance(value[0], (int, float, bool)) or (is_array(value[0]) and value[0].ndim == 0):
            return [value]
    return value


def _batch_rows(name: str, value) -> list[torch.Tensor]:
    """The rows of a batch given with an attention_mask (a 2-D tensor or array, or a list of rows,
    equal lengths or not) as 1-D CPU tensors."""
    if isinstance(value, torch.Tensor) or is_array(value):
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if t.dim() != 2:
            what = "a single prompt: pass a batch of one" if t.dim() == 1 else f"shape {list(t.shape)}"
            raise ValueError(f"{name} with an attention_mask must be 2-D [batch, length], got {what}")
        return list(t)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} with an attention_mask must be a non-empty batch of rows, got {value!r:.60}")
    try:
        rows = [r.detach().cpu() if isinstance(r, torch.Tensor) else torch.as_tensor(r) for r in value]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} with an attention_mask must be rows of numbers") from None
    if any(r.dim() != 1 for r in rows):
        raise ValueError(
            f"{name} with an attention_mask must be a batch of 1-D rows (a single prompt: pass [ids])"
        )
    return rows


def _unpadded_row(b: int, row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prompt ``b``'s ids where its mask is 1: one run (left or right padding)."""
    if mask.shape != row.shape:
        raise ValueError(
            f"prompt {b}'s attention_mask must have its length {row.shape[0]}, got {mask.shape[0]}"
        )
    if mask.dtype != torch.bool:
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold 0 and 1 (or bools)")
        mask = mask != 0
    kept = mask.nonzero().flatten().tolist()
    if not kept:
        raise ValueError(f"prompt {b} is all padding (its attention_mask row has no 1)")
    first, last = kept[0], kept[-1]
    if last - first + 1 != len(kept):
        raise ValueError(
            f"prompt {b}'s attention_mask has padding between its tokens (not left or right padding)"
        )
    return row[first : last + 1]


def _is_conversation(prompt) -> bool:
    """A chat conversation: a non-empty list of message mappings (``{"role": ..., "content": ...}``)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, (str, bytes, bytearray))
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def load(
    target: str,
    draft: str | None = None,
    *,
    device="cpu",
    dtype: torch.dtype | None = None,
    draft_dtype: torch.dtype | str | None = None,
) -> EagleModel:
    """Load a target checkpoint and an EAGLE-1/2/3 head.

    target: local directory or hub id of a Llama/Mistral/Qwen2/Qwen3 checkpoint, or "tiny-code" (the
        bundled pair). draft: local directory or hub id of an EAGLE head; None means the bundled head
        for "tiny-code" and no head otherwise (plain decoding only). dtype: default float32 on CPU, bf16
        on CUDA; float64 works on CPU. draft_dtype: the head's dtype, default ``dtype``; e.g. bfloat16
        drafts for a float32 target (the output is unchanged: the target verifies every token).
    The head's directory may hold ``acceptance.json`` (:mod:`eagle.acceptance`, ``eagle calibrate
    --write``): the pair's measured acceptance, the prior of ``tree="dynamic"``; a corrupt one raises
    ValueError.
    """
    _check_checkpoint_arg("target", target, required=True)
    _check_checkpoint_arg("draft", draft, required=False)
    device = _resolve_device(device)
    dtype = resolve_dtype(dtype) if dtype is not None else _default_dtype(device)
    try:  # refused before any weight is read
        head_dtype = resolve_dtype(draft_dtype) if draft_dtype is not None else dtype
    except TypeError as err:
        raise TypeError(f"draft_dtype: {err}") from None
    if target == BUNDLED:
        target_path = _resolve_bundled(target, "target")
        if draft is None:
            draft = _resolve_bundled(target, "draft")
    else:
        target_path = target
    model = load_target(target_path, dtype=dtype, device=device)
    head = load_draft(draft, model, dtype=head_dtype, device=device) if draft is not None else None
    acceptance = read_pair_acceptance(head.checkpoint_dir) if head is not None else None
    return EagleModel(model, head, _load_tokenizer(target_path), acceptance)


def _check_checkpoint_arg(name: str, value, *, required: bool) -> None:
    """``target`` / ``draft`` of :func:`load`: a directory or hub id as a str or path (draft may be None)."""
    if value is None and not required:
        return
    if not isinstance(value, (str, os.PathLike)):
        allowed = "a str or os.PathLike" + ("" if required else " (or None)")
        raise TypeError(f"load: {name} must be {allowed} naming a checkpoint, got {type(value).__name__}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _load_tokenizer(path: str):
    """The checkpoint's tokenizer; None when it has none. A local checkpoint whose tokenizer files do
    not load raises ValueError naming the cause (returned as None, string prompts would be refused
    later with "this checkpoint has none")."""
    local = Path(path)
    has_files = local.is_dir() and any((local / f).exists() for f in _TOKENIZER_FILES)
    if local.is_dir() and not has_files:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - tokenizer classes raise many kinds; the message is kept
        if has_files:
            raise ValueError(
                f"{local}: its tokenizer files do not load: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(exc, (OSError, ValueError)):
            return None  # a hub id with no reachable tokenizer (offline): token-id prompts still work
        raise
