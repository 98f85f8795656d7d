"""eagle: lossless EAGLE speculative decoding for Hugging Face Llama-family checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"
