"""eagle: lossless EAGLE speculative decoding for Hugging Face Llama-family checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"

from eagle.api import EagleModel, GenerateResult, load  # noqa: E402
from eagle.speculate import SamplingParams  # noqa: E402
from eagle.tree import TreeConfig  # noqa: E402

__all__ = ["EagleModel", "GenerateResult", "SamplingParams", "TreeConfig", "load", "__version__"]
