"""CUDA-graph rounds give exactly the eager rounds' tokens (GPU only), and are refused on CPU."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import eagle
from eagle.speculate import SpeculativeDecoder
from eagle.tree import TreeConfig

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
    monkeypatch.setattr(torch.cuda, "Stream", lambda: log.append("new stream") or FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    dev = torch.device("cuda", 1)

    assert cuda_graph.on_side_stream(lambda: log.append("step") or 7, dev) == 7
    assert log[0] == ("enter", dev) and log[-1] == ("exit", dev)
    assert log.index("new stream") > 0 and log.index("step") > log.index("new stream")
    log.clear()
    cuda_graph.replay(FakeGraph(), dev)
    assert log == [("enter", dev), "replay", ("exit", dev)]
