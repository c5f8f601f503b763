"""Helpers of the trainer tests (imported by name: tests/trainer is on sys.path)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def rlaifv_table(rows: Sequence[dict[str, Any]]):
    """A pyarrow table in the exact openbmb/RLAIF-V-Dataset schema (built here, independently of trainer/)."""
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "ds_name": pa.array([r.get("ds_name", "RLAIF-V") for r in rows], type=pa.string()),
            "image": pa.array([r["image"] for r in rows], type=image_type),
            "question": pa.array([r["question"] for r in rows], type=pa.string()),
            "chosen": pa.array([r["chosen"] for r in rows], type=pa.string()),
            "rejected": pa.array([r["rejected"] for r in rows], type=pa.string()),
            "origin_dataset": pa.array([r.get("origin_dataset", "COCO") for r in rows], type=pa.string()),
            "origin_split": pa.array(
                [json.dumps({"generator": "tiny", "labeler": "tiny", "type": "detailed_description"})] * len(rows),
                type=pa.string(),
            ),
            "idx": pa.array([str(r.get("idx", i)) for i, r in enumerate(rows)], type=pa.string()),
            "image_path": pa.array([f"images/{i}.png" for i in range(len(rows))], type=pa.string()),
        }
    )


def write_rlaifv_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rlaifv_table(rows), path)
    return path


COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]


def preference_rows(pairs: Sequence[tuple[str, str]], question: str = "describe the image") -> list[dict[str, Any]]:
    rows = []
    for i, (chosen, rejected) in enumerate(pairs):
        image = {"bytes": png(COLOURS[i % len(COLOURS)]), "path": f"{i}.png"}
        rows.append({"image": image, "question": question, "chosen": chosen, "rejected": rejected})
    return rows


class ControlledLabeler:
    """A labeler whose answers are fixed by the test: p(yes) = accept(question); records every question asked."""

    def __init__(self, accept) -> None:
        self.accept = accept
        self.asked: list[str] = []

    def p_yes(self, image: Any, questions: Sequence[str]) -> list[float]:
        self.asked.extend(questions)
        return [0.9 if self.accept(q) else 0.1 for q in questions]


def check_served_reward_is_trained_reward(
    model: Path, rows: Sequence[Any], held_out: Sequence[Any], folder: Path, *, lora: bool
) -> None:
    """One DPO run on `rows` from `model` (full or LoRA), exported as a bundle: for each held-out pair, the reward
    the bundle serves (normalize='sum') equals the trainer's implicit reward beta * (pi - ref), and training moved
    the policy."""
    import pytest
    import torch

    from rlaifv.reward import RewardConfig, load_bundle
    from rlaifv.reward.models import load_processor
    from rlaifv.trainer.dpo import compute_reference_logprobs, encode_pairs, score_pairs, train_dpo
    from rlaifv.trainer.dpo_config import DPOConfig
    from rlaifv.trainer.export import export_bundle

    config = DPOConfig(learning_rate=5e-3, epochs=1, batch_size=2, lora=lora, lora_r=4, cpu=True, beta=0.2)
    result = train_dpo(config, rows, model_path=model, output_dir=folder / "dpo", progress=False)
    bundle = export_bundle(
        folder / "bundle", policy_dir=result.policy_dir, reference_dir=model, policy_type=result.policy_type, beta=0.2
    )
    pair = load_bundle(bundle)
    processor = load_processor(model)
    pairs, _ = encode_pairs(held_out, processor.tokenizer, eot_id=pair.eot_id)
    with pair.reference_model() as reference:
        compute_reference_logprobs(reference, processor, pairs, progress=False)
    with torch.no_grad():
        terms = score_pairs(pair.policy, processor, pairs, beta=0.2, pad_id=pair.pad_id)
    for i, row in enumerate(held_out):
        sums = RewardConfig(beta=0.2, normalize="sum")
        served = pair.score(row.image, row.question, [row.chosen, row.rejected], reward=sums)
        assert served.candidates[0].reward == pytest.approx(float(terms.chosen_rewards[i]), abs=1e-5)
        assert served.candidates[1].reward == pytest.approx(float(terms.rejected_rewards[i]), abs=1e-5)
        assert served.candidates[0].num_tokens == len(pairs[i].chosen_ids)
    assert any(abs(float(r)) > 1e-4 for r in terms.chosen_rewards), "training should have moved the policy"
