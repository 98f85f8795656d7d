"""Triton kernels launch on the device of their tensors, not on whichever CUDA device is current
(``eagle_kernels._triton.launches_on_input_device``)."""

from __future__ import annotations

import ast
import contextlib
import types
from pathlib import Path

import pytest
import torch

import eagle_kernels
from eagle_kernels._triton import launches_on_input_device

PACKAGE = Path(eagle_kernels.__file__).parent


@pytest.fixture
def cuda_device_calls(monkeypatch):
    """Device 0 is current; records the devices ``torch.cuda.device`` is entered with."""
    entered: list[int] = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    return entered


def _on(device: str):
    return types.SimpleNamespace(device=torch.device(device))


def test_a_launch_for_tensors_on_another_gpu_makes_their_device_current(cuda_device_calls):
    seen = []
    fn = launches_on_input_device(lambda first, x, *, y: seen.append((first, x, y)) or "result")
    first = _on("cuda:1")
    assert fn(first, 2, y=3) == "result"
    assert cuda_device_calls == [1] and seen == [(first, 2, 3)]


@pytest.mark.parametrize("device", ["cuda:0", "cuda", "cpu"])
def test_a_launch_on_the_current_gpu_or_the_cpu_changes_no_device(cuda_device_calls, device):
    fn = launches_on_input_device(lambda first: "result")
    assert fn(_on(device)) == "result"
    assert cuda_device_calls == []


def _triton_entry_points() -> dict[str, ast.FunctionDef]:
    """Every module-level ``_*_triton`` function of the package (the Triton backends' entry points)."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.startswith("_")
                and node.name.endswith("_triton")
            ):
                found[f"{path.stem}.{node.name}"] = node
    return found


def test_every_triton_backend_entry_point_launches_on_its_inputs_device():
    entries = _triton_entry_points()
    # one per op with a Triton backend (fused_draft_input has two: EAGLE-1/2 and EAGLE-3)
    assert len(entries) >= 9, sorted(entries)
    undecorated = [
        name
        for name, fn in entries.items()
        if not any(isinstance(d, ast.Name) and d.id == "launches_on_input_device" for d in fn.decorator_list)
    ]
    assert not undecorated, f"Triton entry points that launch on the current device: {undecorated}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_match_the_reference_while_the_first_is_current():
    from eagle_kernels.tree_attention import tree_attention_ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    B, T, Hq, Hkv, S, D = 2, 5, 4, 2, 32, 64
    q = torch.randn(B, T, Hq, D, device=dev)
    k = torch.randn(B, Hkv, S, D, device=dev)
    v = torch.randn(B, Hkv, S, D, device=dev)
    lens = torch.tensor([3, 20], dtype=torch.int32, device=dev)
    with eagle_kernels.use_backend("triton"):
        out = eagle_kernels.tree_attention(q, k, v, lens)
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(out, tree_attention_ref(q, k, v, lens, None, D**-0.5), rtol=1e-5, atol=1e-5)
    assert torch.cuda.current_device() == 0
