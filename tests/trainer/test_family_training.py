"""Trainer -> bundle -> service on every model family: one DPO run per family (full and LoRA), exported as a
bundle, whose served reward equals the trainer's implicit reward for held-out pairs.

Tiny random-weight models (`rlaifv.testing.tiny_families`). This found a processor that could not be saved
beside a fully trained policy (video processors built without torchvision) and default LoRA targets that
matched no module of Idefics2/3 and SmolVLM (`text_model`, not `language_model`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_testkit import check_served_reward_is_trained_reward, png

from rlaifv.reward.models import has_torchvision
from rlaifv.testing.tiny_families import FAMILIES, build_tiny_family
from rlaifv.trainer.data import PreferenceRow

NEEDS_TORCHVISION = ("mistral3",)  # its processor module imports torchvision (tests/reward/test_families.py)
TRAINED = [name for name in FAMILIES if has_torchvision() or name not in NEEDS_TORCHVISION]
ROWS = [
    PreferenceRow("r0", png((200, 30, 30)), "describe the image", "a red circle .", "a blue square ."),
    PreferenceRow("r1", png((30, 160, 60)), "what is this", "the green tree", "the black dog"),
    PreferenceRow("r2", png((40, 40, 200)), "describe the image", "a big house", "a small car"),
    PreferenceRow("r3", png((220, 200, 30)), "what is this", "a white cat .", "a yellow star ."),
]
HELD_OUT = [
    PreferenceRow("h0", png((90, 90, 90)), "what is this", "a green cat .", "a black star ."),
    PreferenceRow("h1", png((10, 120, 60)), "describe the image", "the big house", "the small car"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", TRAINED)
def test_a_trained_family_serves_the_reward_its_trainer_optimised(family: str, lora: bool, tmp_path: Path) -> None:
    model = build_tiny_family(family, tmp_path / family)
    check_served_reward_is_trained_reward(model, ROWS, HELD_OUT, tmp_path, lora=lora)
