"""The model pairs `rlaifv bench engine` measures: the issue's CPU model, and 7B shapes built on a GPU.

- `cpu`: LLaVA whose text part is a Llama of hidden 512 x 8 layers (8 heads, intermediate 1408,
  vocabulary ~32000: 59M parameters), a CLIP tower of 192 px / patch 8 (576 image tokens). Random
  weights from configs, saved as safetensors and loaded through `load_bundle` (the real
  `from_pretrained` path), as a full pair (reference + perturbed policy) and a LoRA pair over one base.
  Cached under ~/.cache/rlaifv/.
- `llava-7b`, `qwen2-vl-7b`: LLaVA-1.5-7B and Qwen2-VL-7B shapes (576 image tokens each), built from
  configs directly on the device in the requested dtype: a forward's cost does not depend on the weight
  values, and writing 2 x 14 GB to disk would cost more device time than the measurements.
- `llava-tiny`, `qwen2-vl-tiny`: the same builders at toy sizes, so the GPU code path runs on a CPU.

The processors are real `LlavaProcessor` / `Qwen2VLProcessor` instances over word-level tokenizers
padded with filler words to the real vocabulary size (no hub access).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec


class TextSizes(TypedDict):
    """A shape's decoder sizes, as `Shape` keywords."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


CPU_TEXT: TextSizes = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 8, "intermediate": 1408, "vocab": 32000}


@dataclass(frozen=True)
class Shape:
    """Sizes of one benchmark model pair."""

    name: str
    family: str  # "llava" | "qwen2_vl"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    image_size: int  # pixels of the square test image (and of the CLIP tower)
    patch: int
    vision: dict[str, int] = field(default_factory=dict)
    max_positions: int = 4096
    question: str = "Describe the image in detail, listing every object and its colour."

    @property
    def image_tokens(self) -> int:
        grid = self.image_size // self.patch
        return grid * grid if self.family == "llava" else (grid // 2) ** 2


SHAPES: dict[str, Shape] = {
    "cpu": Shape(
        "cpu", "llava", **CPU_TEXT, image_size=192, patch=8,
        vision={"hidden": 128, "layers": 2, "heads": 4}, max_positions=2048,
    ),
    "llava-7b": Shape(  # llava-hf/llava-1.5-7b-hf: Llama-2-7B + CLIP ViT-L/14-336
        "llava-7b", "llava", hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32064,
        image_size=336, patch=14, vision={"hidden": 1024, "layers": 24, "heads": 16},
    ),
    "qwen2-vl-7b": Shape(  # Qwen/Qwen2-VL-7B-Instruct; a 672 px image = 48 x 48 patches -> 576 tokens after 2x2 merge
        "qwen2-vl-7b", "qwen2_vl", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
        image_size=672, patch=14, vision={"hidden": 1280, "layers": 32, "heads": 16}, max_positions=32768,
    ),
    "llava-tiny": Shape(
        "llava-tiny", "llava", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=2000,
        image_size=64, patch=8, vision={"hidden": 32, "layers": 2, "heads": 2},
    ),
    "qwen2-vl-tiny": Shape(
        "qwen2-vl-tiny", "qwen2_vl", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2000,
        image_size=64, patch=8, vision={"hidden": 32, "layers": 2, "heads": 2},
    ),
}  # fmt: skip


def filler_words(count: int) -> list[str]:
    """Distinct lowercase words that pad a word-level vocabulary to a real model's size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: list[str] = []
    i = 0
    while len(words) < count:
        n, word = i, ""
        while True:
            n, r = divmod(n, 26)
            word = letters[r] + word
            if n == 0:
                break
        words.append("q" + word)  # "q"-prefixed: never one of the real template words
        i += 1
    return words


# -- the CPU model: saved and loaded through load_bundle ---------------------------------------------------


def cpu_spec(shape: Shape) -> TinyVLMSpec:
    """The TinyVLMSpec of a LLaVA shape, its word list padded so the vocabulary is ~shape.vocab."""
    from rlaifv.trainer.shapes.tiny_vlm import DEFAULT_WORDS, TinyVLMSpec

    base = TinyVLMSpec()
    # tiny_vlm's tokenizer: specials + punctuation + template pieces, then "▁word" and "▁Word" per word.
    fixed = 5 + 6 + 3 + 2 * (len(DEFAULT_WORDS) + 3)
    words = (*DEFAULT_WORDS, *filler_words(max(0, (shape.vocab - fixed) // 2)))
    return replace(
        base,
        words=tuple(words),
        image_size=shape.image_size,
        patch_size=shape.patch,
        vision_hidden=shape.vision["hidden"],
        vision_layers=shape.vision["layers"],
        vision_heads=shape.vision["heads"],
        text_hidden=shape.hidden,
        text_layers=shape.layers,
        text_heads=shape.heads,
        text_kv_heads=shape.kv_heads,
        intermediate=shape.intermediate,
        max_positions=shape.max_positions,
    )


def saved_bundles(shape: Shape, cache: Path | None = None) -> tuple[Path, Path]:
    """(full pair, LoRA pair) bundle folders of `shape`, built once into the cache (safetensors)."""
    from rlaifv.reward.bundle import write_bundle
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_bundle, random_lora

    root = cache or Path.home() / ".cache" / "rlaifv" / f"bench-engine-{shape.name}-{shape.hidden}x{shape.layers}"
    full, lora = root / "full", root / "lora"
    if not (full / "rlaifv.json").is_file():
        build_tiny_bundle(full, spec=cpu_spec(shape))
    if not (lora / "rlaifv.json").is_file():
        random_lora(full / "reference", lora / "policy", rank=16)
        write_bundle(
            lora,
            policy=lora / "policy",
            reference=(full / "reference").resolve(),
            policy_type="lora",
            reward=RewardConfig(),
            name="bench-lora",
            provenance={"kind": "random LoRA for rlaifv bench engine"},
        )
    return full, lora


# -- GPU shapes: built from configs on the device ----------------------------------------------------------


def _llava_processor(shape: Shape, folder: Path) -> Any:
    from rlaifv.reward.models import load_processor
    from rlaifv.trainer.shapes.tiny_vlm import build_processor

    build_processor(cpu_spec(shape)).save_pretrained(folder)
    return load_processor(folder)


def _qwen_processor(shape: Shape, folder: Path) -> Any:
    from transformers.models import qwen2_vl

    from rlaifv.reward.models import load_processor
    from rlaifv.testing.tiny_families import QWEN_SPECIALS, _chatml, _save_pieces, build_word_tokenizer

    fixed = len(QWEN_SPECIALS) + 20  # specials, punctuation and template words: a few hundred at most
    tokenizer = build_word_tokenizer(
        QWEN_SPECIALS,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=_chatml("<|vision_start|><|image_pad|><|vision_end|>", system="You are a helpful assistant."),
        words=filler_words(max(0, (shape.vocab - fixed) // 4 - 60)),
    )
    # transformers >= 5.2x names the PIL (torchvision-free) processor ...Pil; older 5.x call it Qwen2VLImageProcessor.
    cls = getattr(qwen2_vl, "Qwen2VLImageProcessorPil", None) or qwen2_vl.Qwen2VLImageProcessor
    pixels = shape.image_size * shape.image_size
    image_processor = cls(
        patch_size=shape.patch, temporal_patch_size=2, merge_size=2, min_pixels=pixels, max_pixels=pixels
    )
    _save_pieces(folder, tokenizer, image_processor, "Qwen2VLProcessor")
    return load_processor(folder)


def _config(shape: Shape, tokenizer: Any) -> Any:
    ids = {
        "vocab_size": max(shape.vocab, len(tokenizer)),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": False,
        **ids,
    }
    if shape.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        vision = CLIPVisionConfig(
            hidden_size=shape.vision["hidden"],
            intermediate_size=shape.vision["hidden"] * 4,
            num_hidden_layers=shape.vision["layers"],
            num_attention_heads=shape.vision["heads"],
            image_size=shape.image_size,
            patch_size=shape.patch,
            projection_dim=shape.vision["hidden"],
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=shape.image_tokens,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
    else:
        from transformers import Qwen2VLConfig

        head_dim = shape.hidden // shape.heads
        quarter = head_dim // 16  # mrope sections (t, h, w) over the rotary half: Qwen2-VL-7B has 16/24/24 of 64
        rope = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter],
        }
        image, video, start, end = tokenizer.convert_tokens_to_ids(
            ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        )
        config = Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config={
                "depth": shape.vision["layers"],
                "embed_dim": shape.vision["hidden"],
                "num_heads": shape.vision["heads"],
                "mlp_ratio": 4,
                "hidden_size": shape.hidden,
                "patch_size": shape.patch,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
            },
            image_token_id=image,
            video_token_id=video,
            vision_start_token_id=start,
            vision_end_token_id=end,
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, ids[key])
    return config


def _build_on_device(config: Any, family: str, device: str, dtype: Any, seed: int) -> Any:
    """Random weights initialised directly on `device` in `dtype`, as `from_pretrained(dtype=...)` builds a model."""
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model.eval()


def built_pair(shape: Shape, device: str, dtype: Any, *, lora: bool = False) -> ModelPair:
    """A full pair (reference + policy of another seed) or a LoRA pair (rank 16 over one base) of a GPU shape.

    Built on `device` one at a time, so the memory each pair needs is measured with only it resident.
    """
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.models import register_native_families

    register_native_families()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        processor = _llava_processor(shape, folder) if shape.family == "llava" else _qwen_processor(shape, folder)
    config = _config(shape, processor.tokenizer)
    reference = _build_on_device(config, shape.family, device, dtype, seed=0)
    if not lora:
        policy = _build_on_device(config, shape.family, device, dtype, seed=1)
        return ModelPair(policy, processor, reference=reference, name=f"bench-{shape.name}")
    from peft import LoraConfig, get_peft_model

    adapter = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)",
        init_lora_weights=False,
    )
    policy = get_peft_model(reference, adapter).to(device=device, dtype=dtype).eval()
    return ModelPair(policy, processor, name=f"bench-{shape.name}-lora")


def describe(shape: Shape) -> dict[str, Any]:
    described: dict[str, Any] = json.loads(json.dumps(shape.__dict__))
    return described
