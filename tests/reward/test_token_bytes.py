"""OpenAI's log-probs `bytes`: a token that ends inside a character gives its own bytes, so clients can rebuild
the text by concatenating them."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlaifv.reward.token_bytes import TokenBytes

TEXT = "é😀 a red circle"


def _rebuilt(tokenizer: PreTrainedTokenizerFast) -> tuple[bytes, int]:
    tokens = TokenBytes(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = [bytes(tokens.bytes_of(i, tokenizer.decode([i]))) for i in ids]
    return b"".join(pieces), sum("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_byte_level_bpe_tokens_inside_a_character_give_their_bytes() -> None:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a red circle", "a blue square"] * 20, trainer)
    rebuilt, partial = _rebuilt(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert partial >= 2, "the emoji and the accent must split inside their characters"
    assert rebuilt.decode("utf-8") == TEXT


def test_sentencepiece_byte_fallback_pieces_give_their_byte() -> None:
    vocab = {"<unk>": 0, "▁a": 1, "▁red": 2, "▁circle": 3, "▁": 4}
    vocab |= {f"<0x{b:02X}>": 5 + b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    rebuilt, partial = _rebuilt(tokenizer)
    assert partial >= 6
    assert rebuilt.decode("utf-8").replace("▁", " ") == TEXT
