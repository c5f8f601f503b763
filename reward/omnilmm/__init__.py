"""OmniLMM (OmniLMM-12B, RLAIF-V-12B), implemented natively and registered with the transformers auto classes.

The hub repositories ship no modeling code and neither transformers nor vLLM knows `model_type:
omnilmm`; the original code needs timm (and so torchvision) for its EVA tower. This package
rebuilds the model from the original sources with timm's and OmniLMM's parameter names:

- `configuration.OmniLMMConfig`: the published config keys;
- `eva.EvaVisionTower`, `resampler.Resampler`, `modeling.OmniLMMForCausalLM`: the network;
- `processing.OmniLMMProcessor`: the 448 px CLIP-normalised image transform, the
  `<im_start>`/`<im_patch>`/`<im_end>` prompt block and the Zephyr-style template with
  OmniLMM's default system turn.

`register()` makes `AutoConfig`, `AutoModelForImageTextToText`, `AutoModelForCausalLM`,
`AutoImageProcessor` and `AutoProcessor` resolve them, and registers the checkpoint key mapping
(published `model.layers.*` <-> `model.language_model.layers.*`). The reward core calls it before
loading any model or processor (`reward/models.py`); importing this package alone has no effect.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register OmniLMM with transformers' auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from rlaifv.reward.omnilmm.configuration import OmniLMMConfig
    from rlaifv.reward.omnilmm.modeling import PUBLISHED_TO_MODULE, OmniLMMForCausalLM
    from rlaifv.reward.omnilmm.processing import OmniLMMImageProcessor, OmniLMMProcessor

    AutoConfig.register(OmniLMMConfig.model_type, OmniLMMConfig, exist_ok=True)
    AutoModelForImageTextToText.register(OmniLMMConfig, OmniLMMForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(OmniLMMConfig, OmniLMMForCausalLM, exist_ok=True)
    AutoImageProcessor.register(OmniLMMConfig, image_processor_classes={"pil": OmniLMMImageProcessor}, exist_ok=True)
    AutoProcessor.register(OmniLMMConfig, OmniLMMProcessor, exist_ok=True)
    renames = [WeightRenaming(source, target) for source, target in PUBLISHED_TO_MODULE.items()]
    register_checkpoint_conversion_mapping(OmniLMMConfig.model_type, renames, True)
    _registered = True


__all__ = ["register"]
