"""Build tiny LLaVA-style models offline, for tests, benchmarks and the shapes world.

The result is a standard `transformers` LLaVA (CLIP vision tower + Llama decoder)
saved with `save_pretrained`, so it is served through exactly the same loading
path as a real checkpoint such as RLAIF-V 7B. The tokenizer is word-level and
built by code from a word list: no network, no hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} ASSISTANT:"
    "{% else %}"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")
PUNCTUATION = (".", ",", "?", "!", ";", "'")
DEFAULT_WORDS = [
    "a",
    "an",
    "the",
    "is",
    "are",
    "there",
    "in",
    "on",
    "of",
    "and",
    "with",
    "yes",
    "no",
    "image",
    "picture",
    "what",
    "describe",
    "this",
    "it",
    "left",
    "right",
    "top",
    "bottom",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "circle",
    "square",
    "triangle",
    "star",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "person",
    "sky",
    "grass",
    "small",
    "big",
    "one",
    "two",
    "three",
    "please",
    "answer",
    "or",
    "shows",
    "see",
    "i",
    "can",
]


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of a tiny LLaVA. Defaults give a ~0.3M-parameter model that loads in ms."""

    words: tuple[str, ...] = tuple(DEFAULT_WORDS)
    phrases: tuple[str, ...] = ()
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 512
    seed: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PHRASE_JOINER = "ˍ"  # U+02CD, a letter to the pre-tokenizer (an underscore is punctuation)


def build_tokenizer(words: tuple[str, ...] | list[str], phrases: tuple[str, ...] | list[str] = ()) -> Any:
    """A word-level fast tokenizer whose pieces decode back to readable text.

    Metaspace marks word starts ("▁red") and punctuation is split off, so
    "a red circle." round-trips exactly through encode/decode. Each of
    `phrases` ("red circle") is one token, as a BPE tokenizer merges a frequent
    bigram: a normalizer joins its words ("redˍcircle", same length, so offsets
    hold) and the decoder splits them again.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    for piece in PUNCTUATION + tuple(TEMPLATE_WORDS):
        vocab.setdefault(piece, len(vocab))
    joined = [phrase.replace(" ", PHRASE_JOINER) for phrase in phrases]
    for word in list(words) + list(TEMPLATE_WORDS) + joined:
        for variant in (word, word.capitalize()):
            vocab.setdefault("▁" + variant, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    if phrases:
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.Replace(variant, variant.replace(" ", PHRASE_JOINER))
                for phrase in phrases
                for variant in (phrase, phrase.capitalize())
            ]
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace(PHRASE_JOINER, " "), metaspace]) if phrases else metaspace
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(spec: TinyVLMSpec) -> Any:
    """A LlavaProcessor pairing the word tokenizer with a CLIP image processor."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.words, spec.phrases),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_model(spec: TinyVLMSpec, tokenizer: Any) -> Any:
    """A randomly initialised LlavaForConditionalGeneration sized by `spec`."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.image_seq_length,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_tiny_vlm(folder: str | Path, spec: TinyVLMSpec | None = None) -> Path:
    """Create a tiny LLaVA with its processor in `folder` (safetensors) and return the path."""
    spec = spec or TinyVLMSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    (folder / "tiny_spec.json").write_text(
        json.dumps(
            {k: v for k, v in spec.__dict__.items() if k not in ("words", "phrases")}
            | {"words": list(spec.words), "phrases": list(spec.phrases)},
            indent=1,
        )
    )
    return folder


def perturb_copy(source: str | Path, target: str | Path, *, scale: float = 0.05, seed: int = 1) -> Path:
    """A copy of a model whose language-model weights are nudged: a stand-in "aligned" policy."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    model = AutoModelForImageTextToText.from_pretrained(str(source), use_safetensors=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name or "lm_head" in name:
                param.add_(
                    torch.randn(param.shape, generator=gen) * scale * (param.std() if param.numel() > 1 else 1.0)
                )
    model.save_pretrained(target, safe_serialization=True)
    return target


def random_lora(base_folder: str | Path, target: str | Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA adapter with random (non-zero) weights over the model in `base_folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(str(base_folder), use_safetensors=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=r".*(language_model|text_model).*\.(q_proj|v_proj|o_proj)",  # Idefics3 names it text_model
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(target), safe_serialization=True)
    return Path(target)


def build_tiny_bundle(
    folder: str | Path, *, lora: bool = False, spec: TinyVLMSpec | None = None, beta: float = 0.1
) -> Path:
    """A complete bundle of random tiny models: reference, and a perturbed (or LoRA) policy."""
    from rlaifv.reward.bundle import write_bundle
    from rlaifv.reward.scoring import RewardConfig

    folder = Path(folder)
    reference = build_tiny_vlm(folder / "reference", spec)
    if lora:
        random_lora(reference, folder / "policy")
    else:
        perturb_copy(reference, folder / "policy")
    write_bundle(
        folder,
        policy=folder / "policy",
        reference=reference,
        policy_type="lora" if lora else "full",
        reward=RewardConfig(beta=beta),
        name="tiny-llava",
        provenance={"kind": "tiny random-weight model for tests and plumbing"},
    )
    return folder
