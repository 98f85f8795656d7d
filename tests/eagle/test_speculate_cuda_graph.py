"""CUDA-graph rounds give exactly the eager rounds' tokens (GPU only), and are refused on CPU."""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import eagle
from eagle.adaptive import AutoSpeculation
from eagle.speculate import SpeculativeDecoder
from eagle.tree import TreeConfig
from tests.eagle.helpers import call_from_threads

PROMPTS = ["def fibonacci(n):\n", "import os\n", "class Stack:\n    def push(self, item):\n"]


def test_cuda_graph_needs_a_cuda_target():
    m = eagle.load("tiny-code")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA target"):
        SpeculativeDecoder(m.target, m.head, TreeConfig(), cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA target"):
        m.generate(["x = 1"], 4, cuda_graph=True)


@pytest.fixture(scope="module")
def cuda_pair():
    return eagle.load("tiny-code", device="cuda", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("tree", ["dynamic", "static", "chain"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_rounds_match_eager_rounds(cuda_pair, tree, temperature):
    kw = dict(tree=tree, temperature=temperature, top_p=0.95, seed=3, eos_token_id=[])
    eager = cuda_pair.generate(PROMPTS, 40, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and falls back: that must not happen here
        graphed = cuda_pair.generate(PROMPTS, 40, cuda_graph=True, **kw)
    assert graphed.tokens == eager.tokens
    assert graphed.accept_lengths == eager.accept_lengths


@pytest.mark.gpu
def test_graph_rounds_with_rows_finishing_early(cuda_pair):
    """Rows hitting their budget leave the batch: each new batch composition is captured again."""
    eos = cuda_pair.target.config.eos_token_id
    eager = cuda_pair.generate(PROMPTS, 48, eos_token_id=eos)
    graphed = cuda_pair.generate(PROMPTS, 48, eos_token_id=eos, cuda_graph=True)
    assert graphed.tokens == eager.tokens


@pytest.mark.gpu
def test_graph_greedy_equals_plain_decoding(cuda_pair):
    plain = cuda_pair.generate(PROMPTS[:1], 32, speculative=False, eos_token_id=[])
    graphed = cuda_pair.generate(PROMPTS[:1], 32, cuda_graph=True, eos_token_id=[])
    assert graphed.tokens == plain.tokens


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_plain_decoding_matches_eager(cuda_pair, temperature):
    kw = dict(speculative=False, temperature=temperature, seed=5, eos_token_id=[])
    assert (
        cuda_pair.generate(PROMPTS, 24, cuda_graph=True, **kw).tokens
        == cuda_pair.generate(PROMPTS, 24, **kw).tokens
    )


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
def test_nan_logits_of_rejected_draft_tokens_do_not_stop_a_cuda_round(
    cuda_pair, monkeypatch, temperature, cuda_graph
):
    """On CUDA only the accepted path's rows are checked (gathered on the device, no host sync): rows
    of draft tokens no round accepts are made NaN in every verify and the tokens stay the clean run's;
    then NaN on the accepted tokens' rows raises at the round's read-back. The poison is a device table
    changed in place, so a captured graph sees it on replay."""
    kw = dict(temperature=temperature, seed=3, eos_token_id=[], cuda_graph=cuda_graph)
    prompts = PROMPTS[:2]
    cuda_pair.release_buffers()  # no graph kept from an earlier test (captured without the poison)
    clean = cuda_pair.generate(prompts, 24, **kw).tokens
    longer = cuda_pair.generate(prompts, 40, **kw).tokens  # a last round may accept drafts past 24
    target = cuda_pair.target
    poisoned = torch.ones(target.config.vocab_size, dtype=torch.bool, device="cuda")
    poisoned[torch.tensor(sorted(set(sum(longer, []))), device="cuda")] = False
    hits = torch.zeros((), dtype=torch.int64, device="cuda")
    original = target.forward

    def forward(ids, *args, **kwargs):
        out = original(ids, *args, **kwargs)
        if kwargs.get("tree_mask") is not None and out.logits is not None:  # a verify forward
            hit = poisoned[ids]  # [b, n]: graph-safe, no boolean indexing
            out.logits.masked_fill_(hit[..., None], float("nan"))
            hits.add_(hit.sum())
        return out

    cuda_pair.release_buffers()
    monkeypatch.setattr(target, "forward", forward)
    try:
        assert cuda_pair.generate(prompts, 24, **kw).tokens == clean
        assert int(hits) > 0, "the drafts proposed no poisoned token"
        poisoned.zero_()
        poisoned[torch.tensor(sorted(set(sum(clean, []))), device="cuda")] = True  # accepted rows too
        with pytest.raises(FloatingPointError, match="NaN/inf logits"):
            cuda_pair.generate(prompts, 24, **kw)
    finally:
        monkeypatch.undo()
        cuda_pair.release_buffers()


def test_plain_cuda_graph_needs_a_cuda_model():
    m = eagle.load("tiny-code")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        m.generate(["x = 1"], 4, speculative=False, cuda_graph=True)


@pytest.mark.gpu
def test_later_calls_replay_the_kept_graph_without_capturing(cuda_pair, monkeypatch):
    """The second call of a batch size prefills into the kept buffers and replays the graph captured
    by the first (no capture), with the eager tokens; a stream stopped early keeps them too."""
    plain_module = sys.modules["eagle.models.generate_plain"]  # eagle.models.generate_plain: the function
    speculate_module = sys.modules["eagle.speculate"]

    cuda_pair.release_buffers()
    captures = []
    for module in (speculate_module, plain_module):
        real = module.cuda_graph_capture
        monkeypatch.setattr(
            module, "cuda_graph_capture", lambda *a, real=real, **k: captures.append(1) or real(*a, **k)
        )
    for speculative in (True, False):
        kw = dict(speculative=speculative, eos_token_id=[])
        cuda_pair.generate(PROMPTS[:2], 24, cuda_graph=True, **kw)
        assert len(captures) == 1
        for prompts in (PROMPTS[1:], PROMPTS[:2]):  # other prompts, other lengths
            got = cuda_pair.generate(prompts, 32, cuda_graph=True, **kw).tokens
            assert got == cuda_pair.generate(prompts, 32, **kw).tokens
        assert len(captures) == 1
        captures.clear()
    stream = cuda_pair.stream(PROMPTS[0], 64, cuda_graph=True, eos_token_id=[])
    for i, _ in enumerate(stream):
        if i == 4:  # captured and replayed by now; the caller stops early
            break
    stream.close()
    assert any(d._pool for d in cuda_pair._decoders.values())
    cuda_pair.release_buffers()
    assert not any(d._pool for d in cuda_pair._decoders.values())


@pytest.mark.gpu
def test_calls_from_several_threads_capture_and_replay_their_own_graphs(cuda_pair):
    """A server's threads share the model: each call, run while others capture or replay their
    graphs (batch sizes 1, 2 and 3, speculative and plain), gives its eager tokens, and no capture
    fails (another thread's allocations and syncs during a capture must not break it)."""
    cuda_pair.release_buffers()
    calls = [
        dict(prompts=PROMPTS[:1], speculative=True),
        dict(prompts=PROMPTS[:2], speculative=True, temperature=0.8, seed=1),
        dict(prompts=PROMPTS, speculative=False),
        dict(prompts=PROMPTS[1:], speculative=True, tree="chain"),
        # eager work beside the captures (allocations, read-backs, auto's syncs): what thread_local
        # capture mode is for
        dict(prompts=PROMPTS[:2], speculative=True, eager=True),
        dict(prompts=PROMPTS[:1], speculative="auto", eager=True),
    ]

    def run(call, graphs):
        kw = {k: v for k, v in call.items() if k not in ("prompts", "eager")}
        graphs = graphs and not call.get("eager", False)
        return cuda_pair.generate(call["prompts"], 24, eos_token_id=[], cuda_graph=graphs, **kw).tokens

    eager = [run(call, False) for call in calls]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = call_from_threads(
            [lambda call=call: run(call, True) for call in calls], threads=3, repeats=2
        )
    assert not [w for w in caught if "capture failed" in str(w.message)]
    for (_, _, j), tokens in results.items():
        assert tokens == eager[j], j
    cuda_pair.release_buffers()


@pytest.mark.gpu
def test_a_kept_graph_replays_with_its_own_sampling_parameters_after_the_caches_let_go(cuda_pair):
    """A kept graph reads the sampling parameters it was captured with. warp_logits' parameter cache
    is cleared when full, and the RoPE tables' cache used to be: a graph that had been handed cached
    tensors then replayed with whatever the allocator put at their addresses. Captures now get their
    own tensors; here the caches are emptied and the freed memory overwritten before the replay."""
    import importlib

    # the module, not the function eagle_kernels re-exports under the same name (which
    # `import eagle_kernels.warp_logits as ...` binds)
    warp_module = importlib.import_module("eagle_kernels.warp_logits")

    kw = dict(temperature=0.8, top_p=0.9, seed=5, eos_token_id=[])
    cuda_pair.release_buffers()
    eager = cuda_pair.generate(PROMPTS[:1], 24, **kw)
    for speculative in (True, False):
        first = cuda_pair.generate(
            PROMPTS[:1], 24, cuda_graph=True, speculative=speculative, **kw
        )  # captures
        warp_module._FILLED.clear()
        torch.cuda.empty_cache()
        junk = [torch.full((4096,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed blocks
        again = cuda_pair.generate(PROMPTS[:1], 24, cuda_graph=True, speculative=speculative, **kw)  # replays
        del junk
        assert again.tokens == first.tokens
        if speculative:
            assert first.tokens == eager.tokens
    cuda_pair.release_buffers()


def test_graph_helpers_make_the_models_device_current(monkeypatch):
    """Streams, captures and replays belong to the current CUDA device: each helper enters the model's
    device, so a model on cuda:1 with device 0 current is graphed on cuda:1 (the CUDA calls stood in
    for)."""
    from eagle.models import cuda_graph

    log: list = []

    class Recorder:
        def __init__(self, *args):
            self.args = args

        def __enter__(self):
            log.append(("enter",) + self.args)

        def __exit__(self, *exc):
            log.append(("exit",) + self.args)

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        def replay(self):
            log.append("replay")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(torch.cuda, "stream", Recorder)
    monkeypatch.setattr(
        cuda_graph, "_capture_stream", lambda d: log.append(("side stream", d)) or FakeStream()
    )
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    dev = torch.device("cuda", 1)

    assert cuda_graph.on_side_stream(lambda: log.append("step") or 7, dev) == 7
    assert log[0] == ("enter", dev) and log[-1] == ("exit", dev)
    side = log.index(("side stream", dev))  # the captures' stream, not one from torch's pool
    assert side > 0 and log.index("step") > side
    log.clear()
    cuda_graph.replay(FakeGraph(), dev)
    assert log == [("enter", dev), "replay", ("exit", dev)]


class _FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name

    def synchronize(self) -> None:
        pass


class _FakeDevice:
    def __init__(self, *args):
        pass

    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


def _fake_cache(monkeypatch):
    from eagle.models.kv_cache import KVCache

    cache = KVCache.__new__(KVCache)
    monkeypatch.setattr(KVCache, "device", property(lambda self: torch.device("cuda", 0)))
    cache.length_bound = 5
    return cache


def _no_device_wide_sync(*args):
    raise AssertionError("torch.cuda.synchronize: a device-wide sync invalidates another thread's capture")


def test_a_failed_capture_restores_the_callers_stream(monkeypatch):
    """torch.cuda.graph's exit ends the capture before it leaves the capture stream; when ending an
    invalidated capture raises, the capture stream stayed current for the rest of the process
    (the CUDA calls stood in for, with torch.cuda.graph's order of exit)."""
    from eagle.models import cuda_graph

    caller, capture_stream = _FakeStream("caller"), _FakeStream("capture")
    current = [caller]

    class FakeGraphContext:  # enters the capture stream, then raises in capture_end at exit
        def __init__(self, graph, stream=None, capture_error_mode="global"):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    in_device = [False]

    class Device(_FakeDevice):
        def __enter__(self):
            in_device[0] = True

        def __exit__(self, *exc):
            in_device[0] = False

    def set_stream(stream):
        # (torch's set_stream also makes the stream's device current: inside the model's device context,
        # whose exit then restores the caller's device)
        assert in_device[0], "set_stream outside the device context leaves the model's device current"
        current.append(stream)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FakeGraphContext)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "synchronize", _no_device_wide_sync)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current[-1])
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    monkeypatch.setattr(cuda_graph, "_capture_stream", lambda device: capture_stream)
    cache = _fake_cache(monkeypatch)
    with pytest.raises(RuntimeError, match="capturing"):
        cuda_graph.capture(lambda: None, [cache])
    assert current[-1] is caller and cache.length_bound == 5


def test_captures_from_several_threads_take_turns_in_thread_local_mode(monkeypatch):
    """Threads sharing a model capture their own graphs: one capture or warm-up at a time (they share
    the capture stream, and torch.cuda.graph synchronises the whole device on entry, which would
    invalidate a capture in progress), each capture in thread_local mode (under the default "global" one, another thread's
    allocation or synchronous copy during the capture fails and invalidates it), and no device-wide
    synchronisation of the package's own (the CUDA calls stood in for)."""
    from eagle.models import cuda_graph

    inside, most_inside, modes = [0], [0], []
    lock = threading.Lock()

    class FakeGraphContext:
        def __init__(self, graph, stream=None, capture_error_mode="global"):
            modes.append(capture_error_mode)

        def __enter__(self):
            with lock:
                inside[0] += 1
                most_inside[0] = max(most_inside[0], inside[0])

        def __exit__(self, *exc):
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", FakeGraphContext)
    monkeypatch.setattr(torch.cuda, "device", _FakeDevice)
    monkeypatch.setattr(torch.cuda, "synchronize", _no_device_wide_sync)

    class Joinable(_FakeStream):
        def wait_stream(self, other) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "stream", lambda stream: _FakeDevice())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Joinable("caller"))
    monkeypatch.setattr(cuda_graph, "_capture_stream", lambda device: Joinable("side"))
    caches = [_fake_cache(monkeypatch) for _ in range(3)]

    def capture(i: int):
        return cuda_graph.capture(lambda: time.sleep(0.02) or i, [caches[i]])[1]

    def warm_up(i: int):  # a warm-up's kernels run on the capture stream: never during a capture
        def step():
            FakeGraphContext.__enter__(None)
            time.sleep(0.02)
            FakeGraphContext.__exit__(None)
            return i

        return cuda_graph.on_side_stream(step, torch.device("cuda", 0))

    calls = [lambda i=i: capture(i) for i in range(3)] + [lambda: warm_up(3)]
    results = call_from_threads(calls, threads=4, repeats=1)
    assert all(out == call for (_, _, call), out in results.items())
    assert most_inside[0] == 1 and modes == ["thread_local"] * 12


def test_the_decoding_code_never_synchronises_the_whole_device():
    """A device-wide synchronisation from one thread invalidates another thread's capture in any mode:
    the loops, the probe and the graph helpers wait for their own stream (synchronize_stream). The
    benchmark (eagle/bench.py) and the trainers (eagle/train) run alone and may."""
    root = Path(eagle.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "bench.py" and "train" not in path.relative_to(root).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "torch.cuda.synchronize(" in line and not line.lstrip().startswith("#")
    ]
    assert not offenders, offenders


def test_the_loops_wait_for_their_own_stream_not_the_device(monkeypatch):
    from eagle.models import cuda_graph

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", _no_device_wide_sync)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device: waited.append(device) or _FakeStream("s")
    )
    cuda_graph.synchronize_stream(torch.device("cuda", 1))
    cuda_graph.synchronize_stream(torch.device("cpu"))  # no-op
    assert waited == [torch.device("cuda", 1)]


def test_a_failed_plain_capture_falls_back_to_eager_steps(monkeypatch):
    """Plain decoding had no fallback: a failed capture (a host sync in the step, EAGLE_KERNELS_DEBUG=1's
    checks, out of memory) raised out of generate(cuda_graph=True), and every later call with the
    pooled, ungraphed buffers failed the same way. Speculative rounds already fell back."""
    import importlib

    gp = importlib.import_module("eagle.models.generate_plain")  # (the package re-exports the function)

    def failing_capture(step, caches, generator=None):
        raise RuntimeError("capture invalidated")

    class Cache:
        device = torch.device("cpu")

        def check_room(self, n):
            pass

    monkeypatch.setattr(gp, "cuda_graph_capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    buffers = gp._StepBuffers(
        Cache(), torch.zeros(1), None, None, torch.zeros(()), torch.ones(1, dtype=torch.bool), warm=True
    )
    steps = []
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        assert gp._next_token(buffers, lambda: steps.append(1) or 7, True, None) == 7
    assert buffers.graph_failed and steps == [1]
    assert gp._next_token(buffers, lambda: steps.append(2) or 8, True, None) == 8  # eager from now on
    assert steps == [1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("speculative", [True, False], ids=["eagle", "plain"])
def test_a_capture_that_fails_falls_back_and_leaves_the_default_stream(monkeypatch, speculative):
    """EAGLE_KERNELS_DEBUG=1's value checks read back to the host, which a capture refuses: the run
    warns and goes on eagerly with the same tokens, and the caller's stream is current afterwards.
    (Plain decoding raised; the speculative fallback left the capture stream current.) A model of
    its own: a failed capture turns graphs off for its decoder."""
    model = eagle.load("tiny-code", device="cuda", dtype=torch.float32)
    kw = dict(eos_token_id=[], speculative=speculative)
    want = model.generate(PROMPTS[:1], 24, **kw).tokens
    default = torch.cuda.default_stream()
    monkeypatch.setenv("EAGLE_KERNELS_DEBUG", "1")
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        got = model.generate(PROMPTS[:1], 24, cuda_graph=True, **kw).tokens
    assert torch.cuda.current_stream() == default
    assert got == want
    assert model.generate(PROMPTS[:1], 24, cuda_graph=True, **kw).tokens == want  # the pooled buffers


@pytest.mark.gpu
def test_auto_times_the_drafts_catch_up_on_the_gpu_clock(cuda_pair, monkeypatch):
    """speculative='auto' charges the draft's catch-up over plain steps' positions to plain decoding.
    Timed on the host clock without a sync, it measured the launches only, and the GPU time landed in
    the next round's. ~0.15 s of GPU work is added to each catch-up forward here."""
    from eagle.speculate import SamplingParams, SpeculativeDecoder
    from eagle.tree import TreeConfig

    decoder = SpeculativeDecoder(cuda_pair.target, cuda_pair.head, TreeConfig(4, 4, 16))
    real, seen = decoder._catch_up, []
    forward = type(decoder.head).forward

    def slow_forward(self, *args, **kwargs):
        torch.cuda._sleep(300_000_000)
        return forward(self, *args, **kwargs)

    def timed_catch_up(s):
        if not s.backlog:
            return real(s)
        with monkeypatch.context() as m:
            m.setattr(type(decoder.head), "forward", slow_forward)
            torch.cuda.synchronize()
            started = time.perf_counter()
            charged = real(s)
            torch.cuda.synchronize()
        seen.append((charged, time.perf_counter() - started))
        return charged

    decoder._catch_up = timed_catch_up
    policy = AutoSpeculation(probe_rounds=1, plain_probe_steps=4)
    for _ in decoder.run([[1, 5, 9, 13, 17, 21]], 96, SamplingParams(), auto=policy):
        pass
    assert seen, "no catch-up ran"
    assert all(charged > 0.5 * wall for charged, wall in seen), seen
