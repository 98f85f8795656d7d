"""The C++ extension must be built and used on CPU, and the package must degrade, not crash."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import eagle_kernels
from eagle_kernels import _ext


def test_extension_is_built_and_loaded():
    if os.environ.get("EAGLE_SKIP_EXT") == "1":
        pytest.skip("EAGLE_SKIP_EXT=1: pure-Python install requested")
    assert _ext.STATUS.loaded, f"eagle_kernels._C is not loaded: {_ext.STATUS.reason}"
    assert hasattr(torch.ops.eagle_C, "compact_kv_cache")
    assert eagle_kernels.backend_info()["cpu_backend"]["compact_kv_cache"] == "cpp"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_import_does_not_touch_cuda():
    code = (
        "import torch, eagle_kernels, eagle\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def _import_under_build_info(build_info: str, checks: str) -> None:
    """Import eagle_kernels in a fresh interpreter whose ``_build_info`` is a stand-in (``build_info``
    sets its fields on ``fake``), then run ``checks``, with ``msgs`` the package's warnings."""
    code = (
        "import warnings, sys, types, torch\n"
        "fake = types.ModuleType('eagle_kernels._build_info')\n"
        f"{build_info}\n"
        "sys.modules['eagle_kernels._build_info'] = fake\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import eagle_kernels\n"
        "msgs = [str(x.message) for x in w if 'eagle_kernels' in str(x.message)]\n"
        f"{checks}\n"
        "print('ok')"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_mismatched_extension_warns_once_and_falls_back():
    """An extension recorded as built for another torch is skipped with one warning."""
    _import_under_build_info(
        "fake.TORCH_VERSION, fake.CUDA_VERSION, fake.WITH_CUDA = '1.0.0', None, False",
        "assert len(msgs) == 1, msgs\n"
        "assert 'built for torch 1.0.0' in msgs[0], msgs\n"
        "assert eagle_kernels.backend_info()['cpu_backend']['compact_kv_cache'] == 'torch'\n"
        "kv = torch.randn(1, 2, 1, 1, 8, 4)\n"
        "out = eagle_kernels.compact_kv_cache(kv, torch.tensor([0], dtype=torch.int32),\n"
        "    torch.tensor([[0, 2]]), torch.tensor([1]), num_draft_tokens=4)\n"
        "assert out.tolist() == [2]",
    )


def test_an_extension_built_for_another_cuda_major_is_refused_by_name():
    """A CUDA build recorded as made with CUDA 99 is not loaded under this torch's CUDA (or none):
    one warning naming both versions and what to install."""
    _import_under_build_info(
        "fake.TORCH_VERSION, fake.CUDA_VERSION, fake.WITH_CUDA = torch.__version__, '99.0', True",
        "assert len(msgs) == 1 and 'built with CUDA 99.0' in msgs[0], msgs\n"
        "assert 'wheel built for this torch' in msgs[0], msgs\n"
        "assert not eagle_kernels.backend_info()['extension_loaded']",
    )


def test_forced_backend_errors_are_clear():
    kv = torch.randn(1, 2, 1, 1, 8, 4)
    args = (kv, torch.tensor([0], dtype=torch.int32), torch.tensor([[0, 1]]), torch.tensor([1]))
    with eagle_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend runs on CUDA"):
        eagle_kernels.compact_kv_cache(*args, num_draft_tokens=4)
    with pytest.raises(ValueError, match="unknown backend"):
        with eagle_kernels.use_backend("fast"):
            pass


# A subprocess snippet: compact_kv_cache on CPU tensors, printing the RuntimeError a backend raises.
_COMPACT_PRINTING_ITS_ERROR = (
    "kv = torch.randn(1, 2, 1, 1, 8, 4)\n"
    "try:\n"
    "    eagle_kernels.compact_kv_cache(kv, torch.tensor([0], dtype=torch.int32),\n"
    "        torch.tensor([[0, 1]]), torch.tensor([1]), num_draft_tokens=4)\n"
    "except RuntimeError as e:\n"
    "    print(e)\n"
)


def test_triton_on_cpu_without_interpreter_says_so():
    code = "import torch, eagle_kernels\n" + _COMPACT_PRINTING_ITS_ERROR
    res = _run(code, EAGLE_KERNELS_BACKEND="triton", TRITON_INTERPRET="0")
    assert "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_triton_interpreter_switched_on_after_import_says_so():
    """TRITON_INTERPRET=1 set after the import (the kernels were defined compiled) made the Triton
    backend look available on CPU tensors, then failed inside Triton with '0 active drivers'."""
    code = (
        "import os, torch, eagle_kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        + _COMPACT_PRINTING_ITS_ERROR
        + "print('triton' in eagle_kernels.available_backends('compact_kv_cache', torch.device('cpu')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "EAGLE_KERNELS_BACKEND": "triton"},
    )
    assert "before eagle_kernels (and triton) is first imported" in res.stdout, res.stdout + res.stderr
    assert res.stdout.strip().endswith("False"), res.stdout + res.stderr


def test_env_backend_validated():
    res = _run(
        "import eagle_kernels, torch; eagle_kernels.select_backend('compact_kv_cache', torch.device('cpu'))",
        EAGLE_KERNELS_BACKEND="gpu",
    )
    assert res.returncode != 0 and "EAGLE_KERNELS_BACKEND='gpu'" in res.stderr


def test_without_extension_everything_falls_back_silently():
    """No extension (pure-Python install or disabled): no warning, every op on the reference."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    import eagle_kernels, torch\n"
        "info = eagle_kernels.backend_info()\n"
        "assert not info['extension_loaded'], info\n"
        "assert set(info['cpu_backend'].values()) == {'torch'}, info\n"
        "kv = torch.randn(1, 2, 1, 1, 8, 4)\n"
        "out = eagle_kernels.compact_kv_cache(kv, torch.tensor([0], dtype=torch.int32),\n"
        "    torch.tensor([[0, 2]]), torch.tensor([1]), num_draft_tokens=4)\n"
        "assert out.tolist() == [2]\n"
        "print('ok')"
    )
    res = _run(code, EAGLE_KERNELS_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_cuda_default_backend_per_op(monkeypatch):
    """On CUDA tensors the ops of CUDA_EXT_FIRST run the extension's kernels when it has them (they
    measured faster), the others Triton; without the extension's op every op takes Triton."""
    from eagle_kernels import _backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    monkeypatch.setattr(_backend, "forced_backend", lambda: None)
    monkeypatch.setattr(_backend, "_cuda_index", lambda device: 0)
    # built: the extension has the op; covered: it was compiled for this GPU's architecture
    for built, covered in ((True, True), (False, True), (True, False)):
        monkeypatch.setattr(_backend._ext, "has_op", lambda op, kind="cpu", built=built: built)
        monkeypatch.setattr(_backend._ext, "cuda_device_supported", lambda index, covered=covered: covered)
        monkeypatch.setattr(_backend, "_SELECTED", {})  # the cache does not know the extension changed
        usable = built and covered
        for op in eagle_kernels.OPS:
            expected = "cuda" if usable and op in _backend.CUDA_EXT_FIRST else "triton"
            assert eagle_kernels.select_backend(op, cuda) == expected, (op, built, covered)
        assert eagle_kernels.select_backend("tree_attention", cuda, prefer_cuda_ext=True) == (
            "cuda" if usable else "triton"
        )
        reason = _backend._unavailable_reason("build_tree", "cuda", cuda)
        assert (reason is None) == usable, reason
        if built and not covered:
            assert "not compiled for this GPU's architecture" in reason
    assert _backend.CUDA_EXT_FIRST <= set(eagle_kernels.OPS)
    assert {"build_tree", "verify_tree_greedy", "tree_speculative_sampling"} <= _backend.CUDA_EXT_FIRST


@pytest.mark.parametrize(
    ("archs", "capability", "covered"),
    [
        (["sm_80", "sm_86", "sm_89", "compute_90"], (7, 5), False),  # a T4 under the default list
        (["sm_80", "sm_86", "sm_89", "compute_90"], (8, 0), True),
        (["sm_80", "compute_90"], (8, 9), True),  # an sm_80 cubin runs on every 8.x from 8.0
        (["sm_86"], (8, 0), False),  # but not below its minor
        (["sm_80", "compute_90"], (10, 0), True),  # PTX is compiled for later GPUs
        (["sm_80", "sm_90"], (10, 0), False),  # cubins only: no kernel image for 10.0
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),  # "a" cubins run on their exact architecture only
        (["sm_90a", "compute_90a"], (10, 0), False),  # and so does "a" PTX ("9.0a+PTX")
        (["compute_90a"], (9, 0), True),
        (None, (7, 0), True),  # a build that did not record its archs: assumed to cover it
    ],
)
def test_the_architectures_a_build_covers(archs, capability, covered):
    assert _ext.arch_covers(archs, capability) is covered


def test_cpp_sources_are_built_without_fp_contraction():
    """setup.py must pass -ffp-contract=off: GCC otherwise fuses a * b + c into FMAs where it likes, and
    which instantiations it fused differed between compilers (a verified block's rows stopped matching
    one-token steps on an H200 host, test_cpp_block_rows_equal_one_token_steps). The kernels write
    their FMAs out instead."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "setup.py"
    spec = importlib.util.spec_from_file_location("eagle_setup", path)
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines the helpers; setup() runs only as __main__
    (extension,) = setup_module._extensions(torch, cuda=False)
    assert "-ffp-contract=off" in extension.extra_compile_args["cxx"]


def test_triton_older_than_the_minimum_is_refused_by_name():
    """Triton 3.1 / 3.2 cannot compile verify_tree_greedy (no tl.gather); an ahead-of-time compile of
    every launch passed from 3.3. Such a Triton turns the backend off with a reason, not a compile
    error at the first launch."""
    from eagle_kernels._triton import MIN_TRITON, triton_version_reason

    assert MIN_TRITON == (3, 3)
    for old in ("3.2.0", "3.1.0", "2.3.1"):
        reason = triton_version_reason(old)
        assert reason is not None and old in reason and "3.3" in reason
    for ok in ("3.3.0", "3.3.1", "3.6.0", "3.9.0+git1234abcd", "4.0.0"):
        assert triton_version_reason(ok) is None
    assert "could not be read" in triton_version_reason("unknown")


def test_everything_imports_and_runs_on_cpu_without_triton():
    """A CPU install has no use for Triton: importing the packages must not need it. The stand-in
    for ``@triton.jit(do_not_specialize=...)`` raised "Triton is not installed" at import."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, eagle, eagle_kernels\n"
        "assert eagle_kernels.backend_info()['triton_unusable'] == 'Triton is not installed'\n"
        "q, k = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 4, 16)\n"
        "eagle_kernels.tree_attention(q, k, k, torch.tensor([2], dtype=torch.int32))\n"
        "assert len(eagle.load('tiny-code').generate(['def f('], 2).tokens[0]) == 2\n"
        "from eagle.cli import main\n"
        "assert main(['info']) in (0, None)\n"  # `make run`, the README's main job, starts with it
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_an_unusable_triton_turns_the_backend_off_with_its_reason(monkeypatch):
    from eagle_kernels import _backend

    reason = "Triton 3.2.0 is older than 3.3, the oldest whose compiler takes these kernels"
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    monkeypatch.setattr(_backend, "TRITON_UNUSABLE_REASON", reason)
    assert _backend._unavailable_reason("verify_tree_greedy", "triton", torch.device("cpu")) == reason
    assert "triton" not in _backend.available_backends("verify_tree_greedy", torch.device("cpu"))
