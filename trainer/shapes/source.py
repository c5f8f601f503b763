"""Fresh shapes-world scenes for each RLAIF-V round, as a trainer prompt source."""

from __future__ import annotations

from typing import Any

from rlaifv.trainer.data import PromptItem
from rlaifv.trainer.shapes.world import CAPTION_QUESTION, scenes

ROUND_SEED_STRIDE = 7919  # scenes of different rounds (and the held-out set) never share a generator seed


class ShapesPromptSource:
    """`count` new caption prompts per round, deterministic from (seed, round)."""

    def __init__(self, image_size: int = 64) -> None:
        self.image_size = image_size

    def prompts(self, round_index: int, count: int, seed: int) -> list[PromptItem]:
        scene_seed = 10_000 + seed * ROUND_SEED_STRIDE + round_index
        return [
            PromptItem(f"shapes-s{seed}-r{round_index}-{i}", scene.render(), CAPTION_QUESTION)
            for i, scene in enumerate(scenes(scene_seed, count, image_size=self.image_size))
        ]

    def describe(self) -> dict[str, Any]:
        return {"kind": "shapes-world", "image_size": self.image_size, "question": CAPTION_QUESTION}
