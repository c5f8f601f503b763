"""Tiny random-weight vision-language models of real Hugging Face families, built offline.

Each builder assembles a family's own config, model and processor classes at toy sizes, with a
word-level tokenizer that carries the family's real special tokens and a chat template in the
family's real format, and saves everything to a folder that loads through `from_pretrained`.
They exist so that the reward service's per-family code paths (prompt layout, image-token
expansion, extra processor outputs) run in tests without hub access or real weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaifv.trainer.shapes.tiny_vlm import DEFAULT_WORDS, PUNCTUATION

if TYPE_CHECKING:  # transformers is untyped here (follow_imports=skip): these names document, mypy sees Any
    from transformers import (
        BaseImageProcessor,
        PreTrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
        ProcessorMixin,
    )

FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "llava_next",
    "idefics3",
    "gemma3",
    "qwen2_5_vl",
    "qwen3_vl",
    "mistral3",
    "smolvlm",
    "internvl",
    "llava",
    "omnilmm",
    "mllama",
    "llava_onevision",
    "idefics2",
    "qwen3_vl_moe",
    "glm4v",
    "vipllava",
    "aya_vision",
)

SPACE = "▁"
UNK_TOKEN = "<unk>"
TEMPLATE_WORDS = ("user", "assistant", "system", "model", "you", "are", "helpful", "USER", "ASSISTANT")
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_word_tokenizer(
    specials: Sequence[str],
    *,
    eos: str,
    pad: str,
    chat_template: str,
    bos: str | None = None,
    add_bos_token: bool = False,
    named: Mapping[str, str] | None = None,
    plain: Sequence[str] = ("\n",),
    words: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with a family's special tokens, never split and kept in order.

    Every word exists bare and with the Metaspace "▁" prefix: after a special token the real
    families tokenize a word without a leading space ("<|im_start|>user"), elsewhere with one, so
    both forms keep `decode(encode(text))` readable. `plain` tokens (newlines, "[INST]") are added
    as non-special tokens so that decoding with `skip_special_tokens` keeps them. `words` extends
    the vocabulary (a family's fixed system prompt).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    ordered = [UNK_TOKEN, pad, *([bos] if bos else []), eos, *specials, *named.values()]
    vocab: dict[str, int] = {}
    for piece in [*ordered, *plain, SPACE, *PUNCTUATION, ":"]:
        vocab.setdefault(piece, len(vocab))
    for word in [*DEFAULT_WORDS, *TEMPLATE_WORDS, *words]:
        for variant in (word, word.capitalize()):
            vocab.setdefault(variant, len(vocab))
            vocab.setdefault(SPACE + variant, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(ordered)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    extra = [t for t in dict.fromkeys(specials) if t not in named.values()]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=UNK_TOKEN,
        pad_token=pad,
        add_bos_token=add_bos_token,
        add_eos_token=False,
        extra_special_tokens=named or extra,
        model_max_length=4096,
        padding_side="right",
    )
    if named and extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    fast.chat_template = chat_template
    return fast


def _ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    """Token ids that must exist: a typo in a special token should fail the build, not yield unk."""
    ids: list[int | None] = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokens missing from the tiny vocabulary: {missing}")
    return [i for i in ids if i is not None]  # every one: the check ruled None out


def _text_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    """Text-config kwargs tying the decoder's vocabulary and bos/eos/pad ids to the tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save_pieces(
    folder: Path,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: BaseImageProcessor,
    processor_class: str,
    **init_kwargs: Any,
) -> None:
    """Save a processor piece by piece, for processors that cannot be built or saved here.

    Their video processors (or, for Pixtral, the processor module itself) need torchvision and
    SmolVLM's needs num2words; the files written are those `save_pretrained` would write.
    """
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    (folder / "processor_config.json").write_text(
        json.dumps({"processor_class": processor_class, **init_kwargs}, indent=2, sort_keys=True) + "\n"
    )


def _model(
    model_cls: type[PreTrainedModel], config: PreTrainedConfig, tokenizer: PreTrainedTokenizerFast, seed: int
) -> PreTrainedModel:
    """The model with weights fixed by `seed`, and generation stopping at the tokenizer's eos."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def _chatml(image: str, *, system: str | None = None) -> str:
    """Qwen's ChatML template, image parts rendered as `image` and a default system turn if `system`."""
    default_system = (
        f"{{% if loop.first and message['role'] != 'system' %}}<|im_start|>system\n{system}<|im_end|>\n{{% endif %}}"
        if system
        else ""
    )
    return (
        "{% for message in messages %}" + default_system + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        + image
        + "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN_VISION: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": TEXT["hidden_size"]},
    "qwen2_5_vl": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "window_size": 32,
        "fullatt_block_indexes": [1],
    },
    "qwen3_vl": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    },
}


def _qwen(family: str, folder: Path, seed: int) -> PreTrainedModel:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE): ChatML prompts, 8 px patches merged 2x2, M-RoPE over a
    16-wide head.

    Only Qwen2-VL and Qwen2.5-VL templates add the default system turn. Qwen3-VL interleaves its
    M-RoPE sections, which caps each spatial section at a third of the rotary half (8 here). The MoE text
    model routes each token to 2 of 4 experts; its processor is Qwen3-VL's.
    """
    import transformers
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL", "qwen3_vl_moe": "Qwen3VLMoe"}
    config_cls, model_cls = (getattr(transformers, prefix[family] + s) for s in ("Config", "ForConditionalGeneration"))
    processor_cls = getattr(transformers, prefix[family.removesuffix("_moe")] + "Processor")
    qwen3 = family.startswith("qwen3_vl")
    system = None if qwen3 else "You are a helpful assistant."
    tokenizer = build_word_tokenizer(
        QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=_chatml("<|vision_start|><|image_pad|><|vision_end|>", system=system),
    )
    normalize = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, min_pixels=32 * 32, max_pixels=96 * 96, **normalize
    )
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    text: dict[str, Any] = {}
    if qwen3:
        rope |= {"mrope_section": [4, 2, 2], "mrope_interleaved": True}
    if family == "qwen3_vl_moe":
        text = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1}
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = config_cls(
        text_config={**TEXT, **_text_ids(tokenizer), "rope_parameters": rope, **text},
        vision_config={
            "depth": 2,
            "patch_size": 8,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            **QWEN_VISION[family.removesuffix("_moe")],
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    model = _model(model_cls, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, processor_cls.__name__)
    return model


GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GLM4V_SPECIALS = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|video|>",
    "<|end_of_video|>",
)


def _glm4v(folder: Path, seed: int) -> PreTrainedModel:
    """GLM-4.1V layout: "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|>...", 8 px patches merged 2x2 like
    Qwen2-VL's, M-RoPE on half of each head (partial rotary), positions from the model's own get_rope_index."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v import Glm4vImageProcessorPil

    tokenizer = build_word_tokenizer(GLM4V_SPECIALS, eos="<|endoftext|>", pad="<|pad|>", chat_template=GLM4V_TEMPLATE)
    image_processor = Glm4vImageProcessorPil(
        patch_size=8, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96}
    )
    image, video, start, end, video_start, video_end = _ids(
        tokenizer,
        "<|image|>",
        "<|video|>",
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
    )
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    config = Glm4vConfig(
        text_config={**TEXT, **_text_ids(tokenizer), "rope_parameters": rope},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT["hidden_size"],
        },
        image_token_id=image,
        video_token_id=video,
        image_start_token_id=start,
        image_end_token_id=end,
        video_start_token_id=video_start,
        video_end_token_id=video_end,
    )
    model = _model(Glm4vForConditionalGeneration, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, "Glm4vProcessor")
    return model


def _vision(image_size: int, patch_size: int) -> dict[str, Any]:
    """Vision-tower kwargs shared by the ViT-style towers (CLIP, SigLIP, Idefics3, Pixtral, InternViT)."""
    return {**VISION, "image_size": image_size, "patch_size": patch_size}


LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    " [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + content['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _llava_next(folder: Path, seed: int) -> PreTrainedModel:
    """llava-v1.6-mistral layout: "[INST] <image>\\n...[/INST]", the tokenizer (not the template) adds <s>."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next import LlavaNextImageProcessorPil

    tokenizer = build_word_tokenizer(
        (),
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos_token=True,
        named={"image_token": "<image>"},
        plain=("\n", "[INST]", "[/INST]"),
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    init_kwargs = {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template, **init_kwargs
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision(32, 8), projection_dim=32),
        text_config=MistralConfig(**TEXT, **_text_ids(tokenizer)),
        image_grid_pinpoints=pinpoints,
        image_token_index=_ids(tokenizer, "<image>")[0],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _model(LlavaNextForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


def _llava_onevision(folder: Path, seed: int) -> PreTrainedModel:
    """llava-onevision-qwen2 layout: ChatML, a SigLIP tower over a 32 px base view plus 32 px crops of the
    image's best pinpoint grid (the processor counts each crop's tokens and a newline per row). Its processor
    cannot be built here (its video part needs torchvision): saved piece by piece."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    tokenizer = build_word_tokenizer(
        (*QWEN_SPECIALS, "<image>", "<video>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=_chatml("<image>\n", system="You are a helpful assistant."),
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    init_kwargs = {
        "num_image_tokens": 16,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
    }
    image, video = _ids(tokenizer, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_vision(32, 8)},
        text_config={"model_type": "qwen2", **TEXT, **_text_ids(tokenizer)},
        image_grid_pinpoints=pinpoints,
        image_token_index=image,
        video_token_index=video,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    model = _model(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, "LlavaOnevisionProcessor", **init_kwargs)
    return model


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIALS = (
    "<|im_start|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)


def idefics3_parts(text: dict[str, Any], **config_kwargs: Any) -> tuple[ProcessorMixin, PreTrainedConfig]:
    """(processor, config) of the Idefics3-8B-Llama3 layout: 32 px crops of a <=64 px image, 4 tokens per crop
    after pixel shuffle. `text` sizes the Llama (the families' tests use TEXT; vLLM needs head size >= 32)."""
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_word_tokenizer(
        IDEFICS3_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<end_of_utterance>",
        pad="<|end_of_text|>",
        add_bos_token=True,
        chat_template=IDEFICS3_TEMPLATE,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    config = Idefics3Config(
        vision_config=_vision(32, 8),
        text_config={"model_type": "llama", **text, **_text_ids(tokenizer)},
        image_token_id=_ids(tokenizer, "<image>")[0],
        scale_factor=2,
        **config_kwargs,
    )
    return processor, config


def _idefics3(folder: Path, seed: int) -> PreTrainedModel:
    from transformers import Idefics3ForConditionalGeneration

    processor, config = idefics3_parts(TEXT)
    model = _model(Idefics3ForConditionalGeneration, config, processor.tokenizer, seed)
    processor.save_pretrained(folder)
    return model


def _idefics2(folder: Path, seed: int) -> PreTrainedModel:
    """Idefics2-8B layout (Idefics3's template and tokens): a perceiver resampler turns each 32 px crop into 4
    latents; a wide image is split into crops plus the whole image, a square one is not split."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2 import Idefics2ImageProcessorPil

    tokenizer = build_word_tokenizer(
        ("<fake_token_around_image>", "<image>"),
        bos="<s>",
        eos="<end_of_utterance>",
        pad="<unk_pad>",
        add_bos_token=True,
        chat_template=IDEFICS3_TEMPLATE.replace("<|im_start|>", ""),
    )
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64, "shortest_edge": 32})
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    config = Idefics2Config(
        vision_config=_vision(32, 8),
        perceiver_config={
            "hidden_size": TEXT["hidden_size"],
            "resampler_n_latents": 4,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
        text_config={"model_type": "mistral", **TEXT, **_text_ids(tokenizer)},
        image_token_id=_ids(tokenizer, "<image>")[0],
    )
    model = _model(Idefics2ForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _gemma3(folder: Path, seed: int) -> PreTrainedModel:
    """Gemma 3 layout: a 32 px SigLIP image pooled to 4 soft tokens between <start_of_image>/<end_of_image>."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tokenizer = build_word_tokenizer(
        ("<eos>", "<start_of_turn>"),
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        add_bos_token=True,
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        chat_template=GEMMA3_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4, chat_template=tokenizer.chat_template
    )
    boi, eoi, image = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**_vision(32, 8)),
        text_config={
            "model_type": "gemma3_text",
            **TEXT,
            **_text_ids(tokenizer),
            "query_pre_attn_scalar": TEXT["head_dim"],
            "sliding_window": 512,
        },
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
    )
    model = _model(Gemma3ForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}[IMG]{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{{ content['text'] }}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


PIXTRAL_PROCESSOR_KWARGS = {
    "patch_size": 8,
    "spatial_merge_size": 2,
    "image_token": "[IMG]",
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
}


def _mistral3(folder: Path, seed: int) -> PreTrainedModel:
    """Mistral-Small-3.1 layout: "<s>[INST][IMG]...[/INST]"; Pixtral rows of [IMG] ended by [IMG_BREAK]/[IMG_END].

    The processor object is not built: `transformers.models.pixtral.processing_pixtral` imports
    torchvision, so the folder gets its pieces and the builder returns no processor.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig
    from transformers.models.pixtral import PixtralImageProcessorPil

    tokenizer = build_word_tokenizer(
        ("[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos_token=True,
        chat_template=MISTRAL3_TEMPLATE,
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    config = Mistral3Config(
        vision_config={"model_type": "pixtral", **_vision(64, 8), "head_dim": 16},
        text_config=MistralConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_index=_ids(tokenizer, "[IMG]")[0],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = _model(Mistral3ForConditionalGeneration, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, "PixtralProcessor", **PIXTRAL_PROCESSOR_KWARGS)
    return model


def _smolvlm(folder: Path, seed: int) -> PreTrainedModel:
    """SmolVLM-Instruct layout (Idefics3 prompt, SmolLM2 tokens: <|im_start|> is bos, nothing added by the tokenizer).

    The processor object is not built: SmolVLMProcessor refuses to start without num2words.
    """
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm import SmolVLMImageProcessorPil

    tokenizer = build_word_tokenizer(
        tuple(t for t in IDEFICS3_SPECIALS if t != "<|im_start|>"),
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        chat_template=IDEFICS3_TEMPLATE,
    )
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    config = SmolVLMConfig(
        vision_config=_vision(32, 8),
        text_config={"model_type": "llama", **TEXT, **_text_ids(tokenizer)},
        image_token_id=_ids(tokenizer, "<image>")[0],
        scale_factor=2,
    )
    model = _model(SmolVLMForConditionalGeneration, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, "SmolVLMProcessor", image_seq_len=4)
    return model


def _internvl(folder: Path, seed: int) -> PreTrainedModel:
    """InternVL3-hf layout: ChatML with "<img><IMG_CONTEXT>*n</img>" per 32 px tile, 4 tokens a tile."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = build_word_tokenizer(
        QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named=named,
        chat_template=_chatml("<IMG_CONTEXT>\n"),
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    config = InternVLConfig(
        vision_config={**_vision(32, 8), "image_size": [32, 32], "patch_size": [8, 8]},
        text_config={"model_type": "qwen2", **TEXT, **_text_ids(tokenizer)},
        image_token_id=_ids(tokenizer, "<IMG_CONTEXT>")[0],
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = _model(InternVLForConditionalGeneration, config, tokenizer, seed)
    _save_pieces(folder, tokenizer, image_processor, "InternVLProcessor", image_seq_length=4)
    return model


LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _llava_processor(
    chat_template: str, plain: Sequence[str] = ("\n",)
) -> tuple[PreTrainedTokenizerFast, ProcessorMixin]:
    """LLaVA-1.5's tokenizer and processor (VipLLaVA's too): <s>/</s>, "<image>" for a 32 px CLIP tile of 16 tokens."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_word_tokenizer(
        (),
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        add_bos_token=True,
        named={"image_token": "<image>"},
        plain=plain,
        chat_template=chat_template,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return tokenizer, processor


def _llava(folder: Path, seed: int) -> PreTrainedModel:
    """llava-1.5-hf layout: "USER: <image>\\n... ASSISTANT:", a 32 px CLIP tile = 16 tokens; <s> from the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer, processor = _llava_processor(LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision(32, 8), projection_dim=32),
        text_config=LlamaConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_index=_ids(tokenizer, "<image>")[0],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _model(LlavaForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MLLAMA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>", "<|end_of_text|>")


def _mllama(folder: Path, seed: int) -> PreTrainedModel:
    """Llama 3.2 Vision layout: one `<|image|>` token per image, read by cross-attention layers (here the second
    of three) over up to 4 tiles of 32 px, 16 patches + 1 class token each; a wide image fills two tiles."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama import MllamaImageProcessorPil

    tokenizer = build_word_tokenizer(
        MLLAMA_SPECIALS,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        add_bos_token=True,
        chat_template=MLLAMA_TEMPLATE,
    )
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)
    config = MllamaConfig(
        vision_config={
            "hidden_size": VISION["hidden_size"],
            "intermediate_size": VISION["intermediate_size"],
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "max_num_tiles": 4,
            "vision_output_dim": 2 * VISION["hidden_size"],
            "intermediate_layers_indices": [0],
        },
        text_config={**TEXT, **_text_ids(tokenizer), "num_hidden_layers": 3, "cross_attention_layers": [1]},
        image_token_index=_ids(tokenizer, "<|image|>")[0],
    )
    model = _model(MllamaForConditionalGeneration, config, tokenizer, seed)
    import torch

    with torch.no_grad():  # the image's gates start closed (zero), which would make every text token blind to it
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate")):
                param.fill_(1.0)
    processor.save_pretrained(folder)
    return model


# openbmb/RLAIF-V-12B config.json as published (hub commit 836cce5; OmniLMM-12B's differs only in the
# name, transformers_version and the absent attention_dropout). The tiny instance keeps every key.
OMNILMM_PUBLISHED_CONFIG: dict[str, Any] = {
    "_name_or_path": "HaoyeZhang/RLAIF-V-12B",
    "architectures": ["OmniLMMForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "fully_tune": True,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_size": 448,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "mm_use_im_start_end": True,
    "mm_vision_tower": "eva02_enormous_patch14_clip_224.laion2b_plus",
    "model_type": "omnilmm",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_query": 256,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "tune_CLIP": True,
    "tune_mm_mlp_adapter": False,
    "use_cache": False,
    "use_mm_proj": True,
    "vocab_size": 32009,
}
# Toy sizes. The resampler has hidden_size // 128 heads, as in the original, hence a 256-wide decoder.
OMNILMM_TINY: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "num_query": 16,  # a 4 x 4 query grid
    "image_size": 32,  # an 8 x 8 patch grid: both position tables are resampled, as at 448 px
    "torch_dtype": "float32",
    "mm_vision_config": {
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 2,
        "mlp_ratio": 2.0,
    },
}
OMNILMM_TOKENS = ("<im_patch>", "<im_start>", "<im_end>", "<box>", "</box>", "<ref>", "</ref>", "<quad>", "</quad>")
OMNILMM_WORDS = (
    "artificial", "intelligence", "which", "gives", "detailed", "polite", "answers", "to", "human", "s", "questions",
)  # fmt: skip


def omnilmm_tiny_parts(seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random OmniLMM (published config keys and checkpoint layout) and its processor."""
    from rlaifv.reward.omnilmm import register
    from rlaifv.reward.omnilmm.configuration import OmniLMMConfig
    from rlaifv.reward.omnilmm.modeling import OmniLMMForCausalLM
    from rlaifv.reward.omnilmm.processing import OMNILMM_CHAT_TEMPLATE, OmniLMMImageProcessor, OmniLMMProcessor

    register()
    tokenizer = build_word_tokenizer(
        OMNILMM_TOKENS,
        bos="<s>",
        eos="</s>",
        pad=UNK_TOKEN,  # keeps the Llama ids <unk> 0, <s> 1, </s> 2
        add_bos_token=True,
        plain=("\n", "<|system|>", "<|user|>", "<|assistant|>"),
        words=OMNILMM_WORDS,
        chat_template=OMNILMM_CHAT_TEMPLATE,
    )
    patch, start, end = _ids(tokenizer, "<im_patch>", "<im_start>", "<im_end>")
    config = OmniLMMConfig.from_dict(
        {
            **OMNILMM_PUBLISHED_CONFIG,
            **OMNILMM_TINY,
            **_text_ids(tokenizer),
            "im_patch_token_id": patch,
            "im_start_token_id": start,
            "im_end_token_id": end,
        }
    )
    image_processor = OmniLMMImageProcessor(image_size=config.image_size)
    processor = OmniLMMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_query=config.num_query)
    return _model(OmniLMMForCausalLM, config, tokenizer, seed), processor


# The chat template of Zephyr-7B-beta's tokenizer, which OmniLMM's tokenizer carries (OmniLMM renders prompts
# with `tokenizer.apply_chat_template` after inserting its own system turn).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def build_tiny_omnilmm_original(folder: str | Path, *, seed: int = 0, weights: str = "safetensors") -> Path:
    """A tiny OmniLMM folder as the hub publishes one: config.json with the published keys only (plus the tiny
    tower's `mm_vision_config`), weights under the published names (`model.safetensors`, or one pickled
    `pytorch_model.bin` as OmniLMM-12B ships), a tokenizer with Zephyr's template, and no processor files."""
    import torch

    from rlaifv.reward.omnilmm.modeling import published_key

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = omnilmm_tiny_parts(seed)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    tokenizer.save_pretrained(folder)
    if weights == "bin":
        state = {published_key(key): value.contiguous() for key, value in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.save_pretrained(folder)
    config = {**OMNILMM_PUBLISHED_CONFIG, **OMNILMM_TINY, **_text_ids(tokenizer)}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _omnilmm(folder: Path, seed: int) -> PreTrainedModel:
    """OmniLMM-12B / RLAIF-V-12B layout: Zephyr turns after OmniLMM's system turn; an image -> 16 resampled tokens."""
    model, processor = omnilmm_tiny_parts(seed)
    processor.save_pretrained(folder)
    return model


VIPLLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '###Human: ' }}{% elif message['role'] == 'assistant' %}"
    "{{ '###Assistant: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)


def _vipllava(folder: Path, seed: int) -> PreTrainedModel:
    """VipLLaVA layout: "###Human: <image>\\n...###Assistant:", a CLIP tile read from several of its layers."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )

    tokenizer, processor = _llava_processor(VIPLLAVA_TEMPLATE, plain=("\n", "###Human:", "###Assistant:"))
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**{**_vision(32, 8), "num_hidden_layers": 4}, projection_dim=32),
        text_config=LlamaConfig(**TEXT, **_text_ids(tokenizer)),
        image_token_index=_ids(tokenizer, "<image>")[0],
        image_seq_length=16,
        vision_feature_layers=[-2, -4, 1],
    )
    model = _model(VipLlavaForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


AYA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = {'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>', 'system': '<|SYSTEM_TOKEN|>'}"
    "[message['role']] %}"
    "{{ '<|START_OF_TURN_TOKEN|>' + role }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
AYA_TILES = ("TILE_1", "TILE_2", "TILE_3", "TILE_GLOBAL")


def _aya_vision(folder: Path, seed: int) -> PreTrainedModel:
    """Aya Vision layout: Cohere turns; an image as up to 3 tiles of 32 px + a global view, each a SigLIP grid
    pixel-shuffled 2x2 into 4 <|IMG_PATCH|> tokens, behind its tile marker; a Cohere2 decoder."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    image_tokens = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", *AYA_TILES)
    tokenizer = build_word_tokenizer(
        ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", *image_tokens),
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        add_bos_token=True,
        named={"image_token": "<image>"},
        chat_template=AYA_TEMPLATE,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=3
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        img_size=32,
        downsample_factor=2,
        chat_template=tokenizer.chat_template,
    )
    config = AyaVisionConfig(
        vision_config={"model_type": "siglip_vision_model", **_vision(32, 8)},
        text_config={"model_type": "cohere2", **TEXT, **_text_ids(tokenizer), "logit_scale": 1.0},
        downsample_factor=2,
        image_token_index=_ids(tokenizer, "<|IMG_PATCH|>")[0],
    )
    model = _model(AyaVisionForConditionalGeneration, config, tokenizer, seed)
    processor.save_pretrained(folder)
    return model


BUILDERS: dict[str, Callable[[Path, int], PreTrainedModel]] = {
    "qwen2_vl": partial(_qwen, "qwen2_vl"),
    "qwen2_5_vl": partial(_qwen, "qwen2_5_vl"),
    "qwen3_vl": partial(_qwen, "qwen3_vl"),
    "qwen3_vl_moe": partial(_qwen, "qwen3_vl_moe"),
    "glm4v": _glm4v,
    "llava_next": _llava_next,
    "idefics3": _idefics3,
    "gemma3": _gemma3,
    "smolvlm": _smolvlm,
    "mistral3": _mistral3,
    "internvl": _internvl,
    "llava": _llava,
    "omnilmm": _omnilmm,
    "mllama": _mllama,
    "llava_onevision": _llava_onevision,
    "idefics2": _idefics2,
    "vipllava": _vipllava,
    "aya_vision": _aya_vision,
}


def build_tiny_family(name: str, folder: str | Path, *, seed: int = 0) -> Path:
    """Create tiny random-weight family `name` (one of `FAMILIES`) in `folder` and return its path.

    Processors are saved as files and loaded back through `rlaifv.reward.models.load_processor`, the
    service's own path (which builds video-capable ones without their video part here).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny family {name!r}; known: {', '.join(BUILDERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = BUILDERS[name](folder, seed)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tiny_family.json").write_text(json.dumps({"family": name, "seed": seed}) + "\n")
    return folder
