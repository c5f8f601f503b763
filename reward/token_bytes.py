"""A token's own bytes, for the OpenAI log-probs' `bytes` field.

A byte-level BPE token can end inside a multi-byte character; its text then decodes to U+FFFD, and the
UTF-8 of that text is not the token's bytes. Clients rebuild such text from `bytes`, so those tokens get the
bytes the token stands for: byte-level BPE pieces through the GPT-2 byte alphabet, SentencePiece byte-fallback
pieces (`<0xE2>`) as their byte.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """`bytes_of(token_id, text)`; `text` is the token's text in context, used wherever it is whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._alphabet: dict[str, int] | None = None
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if decoder is not None and "ByteLevel" in repr(decoder):
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._alphabet = {char: byte for byte, char in bytes_to_unicode().items()}

    def bytes_of(self, token_id: int, text: str) -> list[int]:
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(piece, str):
            return list(text.encode("utf-8"))
        if match := _BYTE_PIECE.fullmatch(piece):
            return [int(match.group(1), 16)]
        if self._alphabet is not None and all(char in self._alphabet for char in piece):
            return [self._alphabet[char] for char in piece]
        return list(text.encode("utf-8"))
