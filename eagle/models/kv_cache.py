"""``KVCache``: one pre-allocated, in-place K/V tensor for every layer plus per-sequence lengths.

Layout (the one ``eagle_kernels.tree_attention`` and ``eagle_kernels.compact_kv_cache`` use)::

    kv       [num_layers, 2, B, Hkv, S_max, D]   kv[l, 0] = K of layer l, kv[l, 1] = V
    seqlens  int32 [B]                           committed tokens of each sequence

A model forward over a block of ``T`` tokens writes the block's K/V at ``seqlens[b] + i`` and attends
to the committed prefix plus the block; it does NOT advance ``seqlens``. The caller decides what to
commit: :meth:`KVCache.advance` after a prefill or a plain decode step, or ``compact_kv_cache`` followed
by :meth:`KVCache.set_seqlens` after verifying a tree (rejected entries are simply overwritten later).

Overflow check without a device sync: the cache keeps ``length_bound``, a host-side upper bound on
``max(seqlens)``. It is exact when lengths are set from host values and grows by ``max_increment``
when they are advanced by a device tensor. A block of ``T`` tokens passes the check without reading
device memory whenever ``length_bound + T <= S_max``; only near the end of the cache (or after an
advance whose bound is unknown) are the actual lengths read back, so the error is always exact and
it is always raised before anything is written.
"""

from __future__ import annotations

import torch


class KVCache:
    """In-place K/V cache of a decoder (target model or draft head).

    Parameters
    ----------
    num_layers, batch_size, num_kv_heads, max_seq_len, head_dim : int
        Shape of ``kv``: ``[num_layers, 2, batch_size, num_kv_heads, max_seq_len, head_dim]``.
    dtype, device
        Of ``kv``. ``seqlens`` is int32 on the same device, initially zero.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, batch_size, num_kv_heads, max_seq_len, head_dim) <= 0:
            raise ValueError(
                "KVCache sizes must be positive: "
                f"num_layers={num_layers}, batch_size={batch_size}, num_kv_heads={num_kv_heads}, "
                f"max_seq_len={max_seq_len}, head_dim={head_dim}"
            )
        shape = (num_layers, 2, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)  # contiguous: forwards rely on it
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.kv.device)
        self.length_bound = 0
        self._layer_views = [(self.kv[i, 0], self.kv[i, 1]) for i in range(num_layers)]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def max_seq_len(self) -> int:
        return self.kv.shape[4]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of layer ``index``, each ``[B, Hkv, S_max, D]`` (views)."""
        return self._layer_views[index]

    def select_rows(self, keep: torch.Tensor) -> KVCache:
        """A new cache holding only the sequences ``keep`` (int64 ``[b]``), in that order (a copy).

        The decoding loop uses it to drop finished sequences so they stop costing compute.
        """
        new = KVCache.__new__(KVCache)
        new.kv = self.kv.index_select(2, keep)
        new.seqlens = self.seqlens.index_select(0, keep)
        new.length_bound = self.length_bound
        new._layer_views = [(new.kv[i, 0], new.kv[i, 1]) for i in range(new.kv.shape[0])]
        return new

    def reset(self) -> None:
        """Forget every sequence (lengths to zero); the stale K/V is overwritten by later writes."""
        self.seqlens.zero_()
        self.length_bound = 0

    def set_seqlens(self, seqlens: torch.Tensor, *, bound: int | None = None) -> None:
        """Set the committed lengths, e.g. to the output of ``compact_kv_cache``.

        ``seqlens``: int ``[B]`` on any device. ``bound``: an upper bound on ``max(seqlens)`` known to
        the caller; without it a device tensor is read back once (a sync), a CPU tensor costs nothing.
        """
        self._check_lengths_tensor("seqlens", seqlens)
        self._commit(seqlens.to(device=self.seqlens.device, dtype=torch.int32), bound)

    def advance(self, n: int | torch.Tensor, *, max_increment: int | None = None) -> None:
        """Commit ``n`` more tokens per sequence: ``seqlens += n``.

        ``n``: an int for every sequence, or int ``[B]`` (e.g. the per-sequence prompt lengths after a
        ragged prefill, or ``accept_len + 1`` after verification). ``max_increment``: an upper bound
        on ``max(n)``; without it a device tensor ``n`` is read back once (a sync).
        """
        if isinstance(n, int):
            if n < 0:
                raise ValueError(f"advance: n must be >= 0, got {n}")
            self._commit(self.seqlens + n, self.length_bound + n)
            return
        self._check_lengths_tensor("n", n)
        bound = None if max_increment is None else self.length_bound + int(max_increment)
        self._commit(self.seqlens + n.to(device=self.seqlens.device, dtype=torch.int32), bound)

    def _commit(self, new: torch.Tensor, bound: int | None) -> None:
        """Store ``new`` lengths; on CPU (free to read) they are checked against ``S_max`` first."""
        if new.device.type == "cpu":
            lengths = new.tolist()
            over = [b for b, n in enumerate(lengths) if n > self.max_seq_len]
            if over:
                raise ValueError(
                    f"KV cache lengths {[lengths[b] for b in over]} of sequence(s) {over} exceed "
                    f"max_seq_len={self.max_seq_len}"
                )
            bound = max(lengths, default=0)
        elif bound is None:
            bound = int(new.max())
        self.seqlens.copy_(new)
        self.length_bound = int(bound)

    def check_room(self, num_new: int) -> None:
        """Raise ``ValueError`` unless every sequence can take ``num_new`` more entries."""
        if self.length_bound + num_new <= self.max_seq_len:
            return
        self._check_fits(num_new)

    def _check_fits(self, num_new: int) -> None:
        lengths = self.seqlens.tolist()
        self.length_bound = max(lengths, default=0)
        over = [b for b, n in enumerate(lengths) if n + num_new > self.max_seq_len]
        if over:
            raise ValueError(
                f"KV cache overflow: {num_new} new token(s) do not fit max_seq_len={self.max_seq_len} for "
                f"sequence(s) {over} with lengths {[lengths[b] for b in over]}; allocate a longer cache"
            )

    def _check_lengths_tensor(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int or a torch.Tensor, got {type(t).__name__}")
        if t.shape != (self.batch_size,):
            raise ValueError(f"{name} must have shape [{self.batch_size}], got {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.device.type == "cpu" and bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
