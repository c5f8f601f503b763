"""OmniLMM's image transform, prompt layout and chat template, as a transformers processor.

The original inference path (RLAIF-V `chat.py`, `omnilmm/train/train_utils.py::omni_preprocess`,
`omnilmm/model/utils.py::build_transform(is_train=False, std_mode='OPENAI_CLIP')`):

- image: RGB, resized to image_size x image_size (448) with PIL's bicubic filter (torchvision's
  `Resize` on a PIL image), scaled to [0, 1] (`ToTensor`) and normalised with the OpenAI CLIP
  mean and std (`Normalize`), all in float32; no crop, no padding, whatever the aspect ratio;
- prompt: the user's text becomes `<im_start>` + `<im_patch>` x num_query + `<im_end>` + "\\n" + text
  (or `<image>` in the text is replaced by that block), a default system turn is inserted, and the
  tokenizer's Zephyr template renders `<|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n`;
  the tokenizer then adds `<s>`.

The chat template here renders the same text from Hugging Face chat messages, an image part
becoming `<image>\\n`; the processor expands each `<image>` into the image block. Everything is
PIL / NumPy / torch: no torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"
DEFAULT_SYSTEM = (
    "You are an artificial intelligence assistant, which gives helpful, detailed, "
    "and polite answers to the human's questions."
)

OMNILMM_CHAT_TEMPLATE = (
    """{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set system = messages[0]['content'] -%}
    {%- else -%}
        {%- set texts = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') -%}
        {%- set system = texts | join('') -%}
    {%- endif -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = \""""
    + DEFAULT_SYSTEM
    + """\" -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- '<|system|>\\n' + system + eos_token + '\\n' -}}
{%- for message in turns -%}
    {{- '<|' + message['role'] + '|>\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {{- '<image>\\n' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- eos_token + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- endif -%}"""
)


class OmniLMMImageProcessor(BaseImageProcessor):
    """Square bicubic resize, /255, CLIP normalisation: OmniLMM's evaluation transform."""

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 448,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, image_size, image_size) float32."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"OmniLMM's processor takes PIL images, got {type(image).__name__}")
        image = image.convert("RGB")
        side = self.image_size
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return pixels.sub(mean).div(std)

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        items = list(images) if isinstance(images, list | tuple) else [images]
        flat = [image for item in items for image in (item if isinstance(item, list | tuple) else [item])]
        pixels = torch.stack([self.transform(image) for image in flat]) if flat else torch.empty(0, 3, 0, 0)
        return BatchFeature(data={"pixel_values": pixels}, tensor_type=None)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


class OmniLMMProcessor(ProcessorMixin):
    """Tokenizer + image processor; each `<image>` in the text becomes the image block.

    The block is `<im_start>`, `num_query` x `<im_patch>`, `<im_end>`.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_query: int = 256,
        **kwargs: Any,
    ) -> None:
        self.num_query = int(num_query)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or OMNILMM_CHAT_TEMPLATE, **kwargs)

    @property
    def image_block(self) -> str:
        return IM_START + IM_PATCH * self.num_query + IM_END

    def expand(self, text: str) -> str:
        return text.replace(IMAGE_PLACEHOLDER, self.image_block)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("OmniLMMProcessor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        pixels = self.image_processor(images)["pixel_values"] if images else None
        count = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        given = 0 if pixels is None else int(pixels.shape[0])
        if count != given:
            raise ValueError(f"the text has {count} {IMAGE_PLACEHOLDER} placeholders but {given} images were given")
        encoded = self.tokenizer([self.expand(t) for t in texts], return_tensors=return_tensors, **kwargs)
        data = dict(encoded)
        if pixels is not None:
            data["pixel_values"] = pixels
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = [
    "DEFAULT_SYSTEM",
    "OMNILMM_CHAT_TEMPLATE",
    "OmniLMMImageProcessor",
    "OmniLMMProcessor",
]
