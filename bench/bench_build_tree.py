"""build_tree: C++ (CPU) / Triton / CUDA vs the PyTorch reference.

pytest bench/bench_build_tree.py --benchmark-only --benchmark-group-by=group

CPU: the reference, the raw C++ kernel (``torch.ops.eagle_C.build_tree`` into pre-allocated outputs)
and the public ``build_tree`` on the cpp backend (argument checks, allocation and custom-op dispatch
included), for B in {1, 16, 64} and n in {8, 64}. CUDA (needs a GPU): reference, Triton and the CUDA
kernel for B in {1, 8, 16, 64}; the pytest-benchmark time is the eager per-call cost (one synchronize
per call), and extra_info adds the kernel-only time (``kernel_us``: CUDA-graph replays, see
``bench/utils.py``; the reference, which reads values on the host, falls back to ``do_bench``) with
GB/s of its inputs + outputs and the roofline fraction. Times and the reference/kernel ratios of the
medians are written to ``bench/results/build_tree_<device>.json`` (medians: robust to other load).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import eagle_kernels
from bench.utils import check_against_reference, record_kernel_time, save_json, synchronized, tensor_bytes
from eagle_kernels._backend import available_backends

# The op module itself: the package attribute ``eagle_kernels.build_tree`` is the function.
bt = importlib.import_module("eagle_kernels.build_tree")
# (n, topk, depth): SGLang-like small tree, EAGLE-2 paper-like tree.
TREES = {8: (8, 4, 4), 64: (64, 8, 6)}
CPU_BATCHES = (1, 16, 64)
GPU_BATCHES = (1, 8, 16, 64)
MODE = "qlen_bool"

_RESULTS: dict[str, dict[str, float]] = {}


def eagle2_inputs(B: int, n: int, topk: int, depth: int, seed: int = 0):
    """parent_list / selected_index of a random EAGLE-2 draft (DESIGN §5), vectorised over the batch."""
    gen = torch.Generator().manual_seed(seed)

    def top_logprobs(*shape):
        return torch.log_softmax(torch.randn(*shape, 4 * topk, generator=gen), -1).topk(topk, dim=-1).values

    frontier = top_logprobs(B)
    scores = [frontier]
    parents = [torch.arange(-1, topk).expand(B, topk + 1)]
    for step in range(1, depth):
        children = (frontier[:, :, None] + top_logprobs(B, topk)).flatten(1)
        scores.append(children)
        frontier, best = children.topk(topk, dim=-1)
        parents.append(best + topk + (step - 1) * topk * topk)
    selected = torch.cat(scores, 1).topk(n - 1, dim=-1).indices.sort(dim=-1).values
    parent_list = torch.cat(parents, 1)[:, : topk * (depth - 1) + 1].contiguous()
    return parent_list, selected


def _case(B, n, device):
    _, topk, depth = TREES[n]
    parent_list, selected = eagle2_inputs(B, n, topk, depth)
    seq_lens = torch.randint(100, 400, (B,), generator=torch.Generator().manual_seed(1))
    kw = dict(topk=topk, depth=depth, num_draft_tokens=n, mask_mode=MODE)
    return (parent_list.to(device), selected.to(device), seq_lens.to(device)), kw


def _runner(impl, args, kw, device):
    if impl == "reference":
        return lambda: bt.build_tree_ref(*args, **kw)
    if impl == "cpp_kernel":
        out = bt._allocate_outputs(args[1], args[2], kw["num_draft_tokens"], bt.MASK_MODES[MODE])
        op = torch.ops.eagle_C.build_tree
        extra = (kw["topk"], kw["depth"], kw["num_draft_tokens"], bt.MASK_MODES[MODE])
        return lambda: op(*args, *out, *extra)
    backend = {"cpp_public": "cpp"}.get(impl, impl)

    def call():
        with eagle_kernels.use_backend(backend):
            return bt.build_tree(*args, **kw)

    return call


def _record(benchmark, device, B, n, impl):
    """Median times (robust to a busy machine) and reference/impl ratios, saved after every case."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return  # --benchmark-disable
    times = _RESULTS.setdefault(device.type, {}).setdefault(f"B={B},n={n}", {})
    times[impl] = {"median_s": stats.stats.median, "min_s": stats.stats.min, "mean_s": stats.stats.mean}
    if "kernel_us" in benchmark.extra_info:
        times[impl]["kernel_us"] = benchmark.extra_info["kernel_us"]
        times[impl]["kernel_timer"] = benchmark.extra_info["kernel_timer"]
    summary = {}
    for key, row in _RESULTS[device.type].items():
        summary[key] = {
            f"reference/{name}": row["reference"]["median_s"] / t["median_s"]
            for name, t in row.items()
            if name != "reference" and "reference" in row
        }
    payload = {
        "mode": MODE,
        "trees": TREES,
        "threads": torch.get_num_threads(),
        "times": _RESULTS[device.type],
    }
    save_json(f"build_tree_{device.type}.json", payload | {"median_speedup": summary})


@pytest.fixture
def one_thread():
    """CPU timings run single-threaded: on a shared machine a parallel region mostly measures the
    neighbours' load, and the reference and the kernel then get the same resources."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", ["reference", "cpp_kernel", "cpp_public"])
@pytest.mark.parametrize("n", list(TREES))
@pytest.mark.parametrize("B", CPU_BATCHES)
def test_build_tree_cpu(benchmark, one_thread, B, n, impl):
    device = torch.device("cpu")
    if impl != "reference" and "cpp" not in available_backends("build_tree", device):
        pytest.skip("the C++ extension is not built")
    args, kw = _case(B, n, device)
    benchmark.group = f"build_tree cpu B={B} n={n}"
    if impl == "cpp_public":
        check_against_reference(lambda: bt.build_tree(*args, **kw), "cpp")
    benchmark(_runner(impl, args, kw, device))
    _record(benchmark, device, B, n, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("n", list(TREES))
@pytest.mark.parametrize("B", GPU_BATCHES)
def test_build_tree_cuda(benchmark, B, n, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is present on this machine")
    device = torch.device("cuda")
    if impl != "reference" and impl not in available_backends("build_tree", device):
        pytest.skip(f"{impl} backend unavailable")
    args, kw = _case(B, n, device)
    benchmark.group = f"build_tree cuda B={B} n={n}"
    out = bt._allocate_outputs(args[1], args[2], kw["num_draft_tokens"], bt.MASK_MODES[MODE])
    if impl == "reference":

        def launch():
            return bt.build_tree_ref(*args, **kw)

    else:

        def launch():
            with eagle_kernels.use_backend(impl):
                bt.build_tree(*args, **kw, out=out)

    if impl != "reference":
        check_against_reference(lambda: bt.build_tree(*args, **kw), impl)
    benchmark(synchronized(launch, device))
    record_kernel_time(benchmark, launch, tensor_bytes(args, out), device)  # read inputs, write outputs once
    _record(benchmark, device, B, n, impl)
