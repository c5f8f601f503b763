"""Tiny SentencePiece models trained here with the settings of Llama's `tokenizer.model` (its trainer_spec), for the
tests of tokenizer conversion and answer tokenization: no hub, and real SentencePiece rules (byte fallback, the
dummy "▁" prefix, split digits). Needs the `convert` extra (sentencepiece)."""

from __future__ import annotations

import io
from collections.abc import Iterable


def train_llama_like(
    corpus: Iterable[str], vocab_size: int, *, dummy_prefix: bool = True, shuffle: bool = True
) -> bytes:
    """The serialized model (what a `tokenizer.model` file holds). `dummy_prefix=False`: Gemma's setting."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=shuffle,
        minloglevel=2,
    )
    return out.getvalue()
