"""The shapes world as an evaluation set: held-out scenes as prompts, CHAIR over colour-shape objects.

Lives in the CLI (the composition root) because the evaluation harness must not import the shapes world;
the CHAIR numbers come from the harness's one implementation (`chair_items` / `chair_totals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlaifv.trainer.evaluation.candidates import Prompt
from rlaifv.trainer.evaluation.chair import chair_items, chair_totals
from rlaifv.trainer.evaluation.scaling import Metric
from rlaifv.trainer.shapes.evaluate import EVAL_SEED_OFFSET
from rlaifv.trainer.shapes.world import CAPTION_QUESTION, extract_objects, scenes


def shapes_prompts(images: int, scene_seed: int = 0) -> tuple[list[Prompt], Metric]:
    """The held-out scenes `rlaifv demo eval` uses (same seed offset), and CHAIR against their objects."""
    held_out = scenes(scene_seed + EVAL_SEED_OFFSET, images)
    prompts = [Prompt(f"shapes:{scene_seed}:{i}", s.render(), CAPTION_QUESTION) for i, s in enumerate(held_out)]
    truths = [set(s.names) for s in held_out]

    def metric(texts: Sequence[str]) -> dict[str, Any]:
        return chair_totals(chair_items(texts, truths, extract_objects))

    return prompts, metric
