"""Helpers shared by tests: the CPU linear-layout tests (float32 panels, bf16 panels, AMX tiles), and
calls made from several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from eagle.models import load_target
from eagle.models.cpu_packed import packed_weight
from eagle.models.llama import set_cpu_fast_path


def fast_path_and_module_logits(target, ids: torch.Tensor) -> dict[bool, torch.Tensor]:
    """``target``'s logits over ``ids`` (prefill into a fresh cache) through the C++ layers (key True)
    and through the Python modules (key False); the fast-path switch is restored afterwards."""
    logits = {}
    previous = set_cpu_fast_path(True)
    try:
        with torch.inference_mode():
            for fast in (True, False):
                set_cpu_fast_path(fast)
                logits[fast] = target(ids, target.new_cache(ids.shape[0], 16)).logits
    finally:
        set_cpu_fast_path(previous)
    return logits


def bf16_logits_with_and_without_packing(
    checkpoint, ids, monkeypatch, env_var: str, is_packed
) -> list[torch.Tensor]:
    """float32 logits over ``ids`` of the bf16 target at ``checkpoint`` loaded with ``env_var`` "1", then
    "0"; each load must (then must not) hold a weight that ``is_packed`` recognises."""
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv(env_var, env)
        target = load_target(checkpoint, dtype=torch.bfloat16)
        assert any(is_packed(packed_weight(p)) for p in target.parameters()) == (env == "1")
        with torch.inference_mode():
            outs.append(target(ids, target.new_cache(ids.shape[0], 16)).logits.float())
    return outs


def call_from_threads(
    calls: Sequence[Callable[[], object]], threads: int, repeats: int
) -> dict[tuple, object]:
    """Run every call ``repeats`` times from each of ``threads`` threads at once, each thread starting
    at another call; ``{(thread, repeat, call index): result}``. The first exception raised in a
    thread is raised here, in the caller's."""
    results: dict[tuple, object] = {}
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            for repeat in range(repeats):
                for i in range(len(calls)):
                    j = (i + thread) % len(calls)
                    results[(thread, repeat, j)] = calls[j]()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(e)

    running = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    if errors:
        raise errors[0]
    assert len(results) == threads * repeats * len(calls)
    return results
