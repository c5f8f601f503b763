"""OmniLMM (OmniLMM-12B, RLAIF-V-12B) as a transformers model: EVA tower -> resampler -> Mistral.

What the original computes (`omnilmm/model/omnilmm.py`, OpenBMB's code as RLHF-V/RLAIF-V ships it):
each image (3 x 448 x 448) goes through the EVA tower (last block removed, class token dropped),
the resampler turns its 32 x 32 patch tokens into `num_query` = 256 vectors of the language
model's width, and those vectors replace the input embeddings of the 256 `<im_patch>` tokens that
follow each `<im_start>` (the `<im_start>` / `<im_end>` tokens keep their own embeddings). The
sequence then runs through an ordinary Mistral decoder and a separate `lm_head`.

Here the language model is a transformers `MistralModel` under `model.language_model`, the
layout of transformers' own VLMs (`LlavaForConditionalGeneration`), so the engine, PEFT and the
trainer's LoRA targets treat it like any other family. The published checkpoint keeps the
language model at `model.{embed_tokens,layers,norm}`; a checkpoint conversion mapping registered
for `model_type: omnilmm` renames those keys on load and back on save, so published shards load
with no missing or unexpected keys and saved folders keep the published layout.

Image features are placed at the `<im_patch>` positions in order (images in the order of
`pixel_values`, row by row), which equals the original's splice after each `<im_start>` for the
prompts its processor builds; a prompt whose `<im_patch>` count is not num_query per image is
refused instead of silently misread.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, MistralModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rlaifv.reward.omnilmm.configuration import OmniLMMConfig
from rlaifv.reward.omnilmm.eva import EvaAttention, EvaVisionTower
from rlaifv.reward.omnilmm.resampler import Resampler, sincos_table

# Published key -> module path. `^` anchors keep `model.vision_tower.norm` and `model.resampler.*` out.
PUBLISHED_TO_MODULE = {r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1."}


def published_key(module_key: str) -> str:
    """A state-dict key of this implementation as the published checkpoint names it."""
    return re.sub(r"^model\.language_model\.", "model.", module_key)


def published_layout(config: OmniLMMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for `config` must hold, by published name, with its shape (no weights allocated)."""
    with torch.device("meta"):
        model = OmniLMMForCausalLM(config)
    return {published_key(key): tuple(value.shape) for key, value in model.state_dict().items()}


class OmniLMMPreTrainedModel(PreTrainedModel):
    config_class = OmniLMMConfig
    config: OmniLMMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["MistralDecoderLayer", "EvaBlock", "Resampler"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random initialisation for tests and new models; loaded weights are left alone (transformers' guards)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, EvaVisionTower):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, EvaAttention):
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, Resampler):
            init.copy_(module.pos_embed, sincos_table(module.embed_dim, module.grid).to(module.pos_embed.dtype))
            init.trunc_normal_(module.query, std=std)
            init.normal_(module.proj, mean=0.0, std=module.embed_dim**-0.5)


class OmniLMMModel(OmniLMMPreTrainedModel):
    """The decoder with the vision tower and resampler; returns hidden states (no LM head)."""

    def __init__(self, config: OmniLMMConfig) -> None:
        super().__init__(config)
        spec = config.vision_spec()
        self.language_model = MistralModel(config)
        self.vision_tower = EvaVisionTower(spec)
        self.resampler = Resampler(
            num_query=config.num_query,
            embed_dim=config.hidden_size,
            num_heads=config.resampler_heads,
            kv_dim=spec.embed_dim,
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> (n_images, num_query, hidden_size), in the tower's dtype as the original casts."""
        dtype = self.vision_tower.pos_embed.dtype
        return self.resampler(self.vision_tower(pixel_values.to(dtype)))

    def image_token_mask(self, input_ids: torch.Tensor, images: int) -> torch.Tensor:
        """Where the image features go: the `<im_patch>` tokens, `num_query` per image, in order."""
        config = self.config
        if config.im_patch_token_id is None:
            raise ValueError(
                "config.json has no im_patch_token_id: convert the published folder with"
                " `rlaifv convert omnilmm` (it reads the image token ids from the tokenizer)"
            )
        mask = input_ids == config.im_patch_token_id
        if int(mask.sum()) != images * config.num_query:
            raise ValueError(
                f"{images} images need {images * config.num_query} <im_patch> tokens ({config.num_query} each);"
                f" the prompt has {int(mask.sum())}"
            )
        return mask

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None and pixel_values.shape[0] > 0:
                mask = self.image_token_mask(input_ids, pixel_values.shape[0])
                features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids to find the <im_patch> positions")
        output: BaseModelOutputWithPast = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return output


class OmniLMMForCausalLM(OmniLMMPreTrainedModel, GenerationMixin):
    """The class the published config names (`architectures: ["OmniLMMForCausalLM"]`)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: OmniLMMConfig) -> None:
        super().__init__(config)
        self.model = OmniLMMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args: Any, pixel_values: Any = None, **kwargs: Any) -> dict[str, Any]:
        """`generate`: images only with the first (prompt) forward, never again with the cache."""
        inputs: dict[str, Any] = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("past_key_values")
        if pixel_values is not None and (cache is None or cache.get_seq_length() == 0):
            inputs["pixel_values"] = pixel_values
        return inputs


__all__ = [
    "PUBLISHED_TO_MODULE",
    "OmniLMMForCausalLM",
    "OmniLMMModel",
    "OmniLMMPreTrainedModel",
    "published_key",
    "published_layout",
]
