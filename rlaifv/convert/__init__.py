"""Converters from published research checkpoint layouts to Hugging Face folders the reward core can load.

The reward core loads models only through transformers' auto classes, so checkpoints released in
their authors' own formats (the original LLaVA repo for RLAIF-V-7B) are converted once, offline.
"""

from __future__ import annotations

from rlaifv.convert.llava import convert_llava

__all__ = ["convert_llava"]
