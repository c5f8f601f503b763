"""A tiny random-weight *text-only* bundle: two Llama causal LMs (policy, reference) with a ChatML template.

The vLLM engine's tests serve it with `vllm serve` on the CPU (vLLM's multimodal paths need torchvision,
which cannot be installed beside the CPU torch here), and the transformers engine serves the same folders,
so both engines' rewards can be compared on one bundle. Sizes suit vLLM's CPU backend: head size 32
(vLLM wants >= 32), float32 weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlaifv.testing.tiny_families import QWEN_SPECIALS, _chatml, build_word_tokenizer

TEXT_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 1024,
}


def build_text_model(folder: str | Path, *, seed: int = 0, sizes: dict[str, Any] | None = None) -> Path:
    """One tiny `LlamaForCausalLM` with its tokenizer (ChatML; `<|im_end|>` ends a turn) saved to `folder`.

    `sizes` overrides `TEXT_LLAMA` (the benchmarks use a larger one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=_chatml(""))
    config = LlamaConfig(
        **(TEXT_LLAMA | (sizes or {})),
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init: answers with distinct, non-uniform log-probs
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(str(tokenizer.chat_template))
    return folder


def build_tiny_text_bundle(
    folder: str | Path, *, seed: int = 0, name: str = "tiny-text", sizes: dict[str, Any] | None = None
) -> Path:
    """A bundle whose policy and reference are tiny text-only Llamas (seeds `seed` and `seed + 1`)."""
    from rlaifv.reward.bundle import write_bundle

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_text_model(folder / "policy", seed=seed, sizes=sizes)
    build_text_model(folder / "reference", seed=seed + 1, sizes=sizes)
    write_bundle(folder, policy=folder / "policy", reference=folder / "reference", name=name)
    (folder / "tiny_text.json").write_text(json.dumps({"seed": seed}) + "\n")
    return folder
