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
from trainer_testkit import png

from rlaifv.reward.models import has_torchvision
from rlaifv.testing.tiny_families import FAMILIES, build_tiny_family
from rlaifv.trainer.data import PreferenceRow
from rlaifv.trainer.dpo import compute_reference_logprobs, encode_pairs, score_pairs, train_dpo
from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.export import export_bundle

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
    from rlaifv.reward import RewardConfig, load_bundle
    from rlaifv.reward.models import load_processor

    model = build_tiny_family(family, tmp_path / family)
    config = DPOConfig(learning_rate=5e-3, epochs=1, batch_size=2, lora=lora, lora_r=4, cpu=True, beta=0.2)
    result = train_dpo(config, ROWS, model_path=model, output_dir=tmp_path / "dpo", progress=False)
    bundle = export_bundle(
        tmp_path / "bundle", policy_dir=result.policy_dir, reference_dir=model, policy_type=result.policy_type, beta=0.2
    )
    pair = load_bundle(bundle)
    processor = load_processor(model)
    pairs, _ = encode_pairs(HELD_OUT, processor.tokenizer, eot_id=pair.eot_id)
    with pair.reference_model() as reference:
        compute_reference_logprobs(reference, processor, pairs, progress=False)
    with torch.no_grad():
        terms = score_pairs(pair.policy, processor, pairs, beta=0.2, pad_id=pair.pad_id)
    for i, row in enumerate(HELD_OUT):
        served = pair.score(
            row.image, row.question, [row.chosen, row.rejected], reward=RewardConfig(beta=0.2, normalize="sum")
        )
        assert served.candidates[0].reward == pytest.approx(float(terms.chosen_rewards[i]), abs=1e-5)
        assert served.candidates[1].reward == pytest.approx(float(terms.rejected_rewards[i]), abs=1e-5)
    assert any(abs(float(r)) > 1e-4 for r in terms.chosen_rewards), "training should have moved the policy"
