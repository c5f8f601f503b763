"""Tiny random-weight models of families the engine has no rules for, to test its load-time check.

- PaliGemma: 1-indexed positions and a bidirectional prefix (token_type_ids); the default rules serve it
  exactly, so the check lets it through.
- BLIP-2: its output carries no `past_key_values` at the top level, so the shared-prefix engine cannot run
  it; the check refuses it at load time instead of the first request failing.
- `chunked_llama`: a Llama whose logits depend on how many tokens one forward call reads (a stand-in for
  any model whose incremental and chunked computations differ); the engine runs it but its log-probs are
  not the model's own, so the check refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaifv.reward.prompt import EncodedPrompt
from rlaifv.testing.tiny_families import GEMMA3_TEMPLATE, TEXT, VISION, _ids, _model, _text_ids, build_word_tokenizer

PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


def build_tiny_paligemma(folder: str | Path, *, seed: int = 0) -> Path:
    """PaliGemma: a 32 px SigLIP image as 16 tokens, `<bos>` after the image, the question, a newline."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    folder = Path(folder)
    tokenizer = build_word_tokenizer(
        (),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos_token=True,
        named={"image_token": "<image>"},
        chat_template=PALIGEMMA_TEMPLATE,
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **VISION, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "gemma", **TEXT, **_text_ids(tokenizer)},
        image_token_index=_ids(tokenizer, "<image>")[0],
        projection_dim=TEXT["hidden_size"],
    )
    model = _model(PaliGemmaForConditionalGeneration, config, tokenizer, seed)
    with torch.no_grad():  # Gemma's final norm scales by 1 + w: x8 logits, answers with non-uniform log-probs
        model.model.language_model.norm.weight.fill_(7.0)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def blip2_config(text_ids: dict[str, Any], image_token: int) -> Any:
    """BLIP-2's config at toy sizes: a 32 px ViT, a one-layer Q-Former of 4 queries, a two-layer OPT."""
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={**VISION, "image_size": 32, "patch_size": 8},
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": VISION["hidden_size"],
        },
        text_config={
            "model_type": "opt",
            "hidden_size": TEXT["hidden_size"],
            "ffn_dim": TEXT["intermediate_size"],
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": TEXT["hidden_size"],
            **text_ids,
        },
        num_query_tokens=4,
        image_token_index=image_token,
    )


def build_tiny_blip2(folder: str | Path, *, seed: int = 0) -> Path:
    """BLIP-2 over OPT: a Q-Former's 4 queries as image tokens, Gemma-style turns."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    folder = Path(folder)
    tokenizer = build_word_tokenizer(
        ("<start_of_turn>",),
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        add_bos_token=True,
        chat_template=GEMMA3_TEMPLATE.replace("<start_of_image>", ""),  # the processor puts the queries first
    )
    processor = Blip2Processor(  # adds "<image>" to the vocabulary, as for the hub's BLIP-2 checkpoints
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
        chat_template=tokenizer.chat_template,
    )
    config = blip2_config(_text_ids(tokenizer), _ids(tokenizer, "<image>")[0])
    model = _model(Blip2ForConditionalGeneration, config, tokenizer, seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def chunked_llama(text_folder: str | Path) -> Any:
    """The text Llama in `text_folder` with logits shifted by 0.5 x (tokens in the call - 1) on token 0.

    One token per call (`generate`'s decode steps) leaves the logits alone; the engine's scoring pass reads an
    answer in one call, so its log-probs differ: what a family with unknown incremental rules would do."""
    from transformers import LlamaForCausalLM

    class ChunkedLlama(LlamaForCausalLM):
        def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
            out = super().forward(input_ids=input_ids, **kwargs)
            out.logits[..., 0] += 0.5 * (out.logits.shape[1] - 1)
            return out

    model = ChunkedLlama.from_pretrained(str(text_folder))
    model.config.model_type = "chunked_llama"
    return model.eval()


# -- a survey of transformers' other image-text-to-text families, without processors -----------------------------
# Each builder returns a random-weight model and two prompts made by hand in the processor's output format (image
# tokens already expanded). `tests/reward/test_family_check.py` runs the load-time comparison on each: the families
# in SERVED_EXACTLY match their own `generate`, those in REFUSED fail it (the check refuses them at load).

SURVEY_VOCAB = 300
IMAGE_ID = 250
SURVEY_TEXT: dict[str, Any] = {
    **TEXT,
    "vocab_size": SURVEY_VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
SIGLIP_32 = {"model_type": "siglip_vision_model", **VISION, "image_size": 32, "patch_size": 8}


def _survey_ids(image_tokens: int, tail: tuple[int, ...]) -> Any:
    import torch

    return torch.tensor([1, 7, *([IMAGE_ID] * image_tokens), 11, 12, *tail])


def _survey_prompts(image_tokens: int, vision: Callable[[Any], dict[str, Any]]) -> list[EncodedPrompt]:
    """Two prompts of different text lengths (left padding in the batch), each with its own random image;
    `vision(input_ids)` makes a prompt's processor outputs."""
    import torch

    torch.manual_seed(1)
    prompts = []
    for tail in ((13,), (14, 15)):
        ids = _survey_ids(image_tokens, tail)
        prompts.append(EncodedPrompt(ids, vision(ids)))
    return prompts


def _one_image(ids: Any) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.randn(1, 3, 32, 32)}


def _finish(model: Any) -> Any:
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        setattr(model.generation_config, key, value)
    return model.eval()


def _survey_paligemma() -> tuple[Any, list[EncodedPrompt]]:
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=SIGLIP_32,
        text_config={"model_type": "gemma", **SURVEY_TEXT},
        image_token_index=IMAGE_ID,
        projection_dim=TEXT["hidden_size"],
    )

    def vision(ids: Any) -> dict[str, Any]:
        return {"pixel_values": torch.randn(1, 3, 32, 32), "token_type_ids": torch.zeros_like(ids)}

    return _finish(PaliGemmaForConditionalGeneration(config)), _survey_prompts(16, vision)


def _survey_cohere2_vision() -> tuple[Any, list[EncodedPrompt]]:
    """Cohere2-Vision: a Cohere2 decoder over SigLIP features pixel-shuffled 2x2 (4 tokens). Aya Vision, the same
    layout, is registered (its processor builds without torchvision, Cohere2-Vision's does not)."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    config = Cohere2VisionConfig(
        vision_config=SIGLIP_32,
        text_config={"model_type": "cohere2", **SURVEY_TEXT},
        downsample_factor=2,
        image_token_id=IMAGE_ID,
    )
    return _finish(Cohere2VisionForConditionalGeneration(config)), _survey_prompts(4, _one_image)


def _survey_blip2() -> tuple[Any, list[EncodedPrompt]]:
    from transformers import Blip2ForConditionalGeneration

    config = blip2_config({"vocab_size": SURVEY_VOCAB}, IMAGE_ID)
    return _finish(Blip2ForConditionalGeneration(config)), _survey_prompts(4, _one_image)


def _survey_lfm2_vl() -> tuple[Any, list[EncodedPrompt]]:
    """LFM2-VL: its language model mixes short convolutions (a cache of conv states) with attention."""
    import torch
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    config = Lfm2VlConfig(
        vision_config={"model_type": "siglip2_vision_model", **VISION, "num_patches": 16, "patch_size": 8},
        text_config={
            "model_type": "lfm2",
            **{k: v for k, v in SURVEY_TEXT.items() if k != "head_dim"},
            "layer_types": ["conv", "full_attention"],
        },
        image_token_id=IMAGE_ID,
        downsample_factor=2,
    )

    def vision(ids: Any) -> dict[str, Any]:
        return {
            "pixel_values": torch.randn(1, 16, 3 * 64),
            "spatial_shapes": torch.tensor([[4, 4]]),
            "pixel_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        }

    return _finish(Lfm2VlForConditionalGeneration(config)), _survey_prompts(4, vision)


SURVEY: dict[str, Callable[[], tuple[Any, list[EncodedPrompt]]]] = {
    "paligemma": _survey_paligemma,
    "cohere2_vision": _survey_cohere2_vision,
    "blip-2": _survey_blip2,
    "lfm2_vl": _survey_lfm2_vl,
}
SERVED_EXACTLY = ("paligemma", "cohere2_vision")
REFUSED = {  # why the engine cannot run them: no top-level cache in BLIP-2's output, LFM2's cache of convolution
    # states that the engine cannot fork
    "blip-2": "could not run it through the shared-prefix engine: AttributeError: 'Blip2",
    "lfm2_vl": "its cache holds recurrent or convolution states (LinearAttentionLayer",
}
