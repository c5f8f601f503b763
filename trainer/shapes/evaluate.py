"""Evaluating a shapes-world model pair: CHAIR at temperature 1, best-of-N by each reward, yes/no F1.

For each held-out image, N captions are sampled once; every selection rule is
applied to the *same* candidates, so the comparison is paired:

- model:        all N samples (the model's own hallucination rate)
- random-of-N:  the first sample (samples are i.i.d., so this is a random pick)
- bon-implicit: argmax of the RLAIF-V implicit reward (mean-normalised, the pair's beta)
- bon-implicit-sum: argmax of the sum-normalised implicit reward
- bon-claims:   argmax of claim verification by the model's own yes/no answers, counting rejected claims
                (RLAIF-V's feedback score, the service's default claim_score)
- bon-claims-expected: the same verdicts scored by the expected number of hallucinated claims

Besides CHAIR, `malformed` is the share of picks that are not the world's own caption of the objects they
name (repeated or stray words, broken phrases).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from rlaifv.reward.claims import answer_score
from rlaifv.reward.model_pair import GenerateTask, ModelPair
from rlaifv.reward.sampling import SamplingParams
from rlaifv.reward.scoring import RewardConfig, select_best
from rlaifv.reward.yes_no import YesNoJudge
from rlaifv.trainer.evaluation.chair import YesNoReport, chair, yes_no
from rlaifv.trainer.shapes.world import (
    CAPTION_QUESTION,
    Scene,
    extract_objects,
    sample_yes_no,
    scenes,
    well_formed,
)

EVAL_SEED_OFFSET = 1_000_003  # held-out scenes never overlap training or feedback scenes


@dataclass
class EvalConfig:
    images: int = field(default=200, metadata={"help": "Held-out images."})
    n: int = field(default=8, metadata={"help": "Candidates per image for best-of-N."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the captions."})
    max_tokens: int = field(default=32, metadata={"help": "Max caption tokens."})
    yes_no_per_image: int = field(default=4, metadata={"help": "Yes/no questions per image."})
    batch_images: int = field(default=25, metadata={"help": "Images per generation batch."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the held-out scenes."})


def evaluate_pair(
    pair: ModelPair, config: EvalConfig | None = None, *, sample_seed: int = 0
) -> dict[str, dict[str, float]]:
    """Metrics per selection rule (CHAIRi, CHAIRs, recall, repeats) plus yes/no accuracy/F1."""
    config = config or EvalConfig()
    held_out = scenes(config.scene_seed + EVAL_SEED_OFFSET, config.images)
    truths = [set(s.names) for s in held_out]
    picks: dict[str, list[str]] = {
        "model": [],
        "random": [],
        "bon_implicit": [],
        "bon_implicit_sum": [],
        "bon_claims": [],
        "bon_claims_expected": [],
    }
    model_truths: list[set[str]] = []
    claims_mode = RewardConfig(
        mode="claims", beta=pair.reward.beta, normalize=pair.reward.normalize, claim_score="count"
    )
    cost = {"sample_s": 0.0, "reference_s": 0.0, "claims_s": 0.0, "questions_per_image": 0.0}
    for start in tqdm(range(0, len(held_out), config.batch_images), desc="evaluating", leave=False):
        chunk = held_out[start : start + config.batch_images]
        tasks = []
        for offset, scene in enumerate(chunk):
            image = scene.render()
            params = SamplingParams(
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                seed=sample_seed * 100_003 + start + offset,
            )
            tasks.append(GenerateTask(pair.encode([image], CAPTION_QUESTION), config.n, params, claims_mode, [image]))
        rankings = pair.generate_batch(tasks)
        timings = rankings[0].timings  # per batch: every ranking of the batch carries the same numbers
        cost["sample_s"] += timings["generate_s"]
        cost["reference_s"] += timings["score_s"]
        cost["claims_s"] += timings["claims_s"]
        for ranking, scene in zip(rankings, chunk, strict=True):
            questions = {claim.question for c in ranking.candidates for claim in c.claims or []}
            cost["questions_per_image"] += len(questions) / len(held_out)
            texts = [c.text for c in ranking.candidates]
            picks["model"].extend(texts)
            model_truths.extend([set(scene.names)] * len(texts))
            picks["random"].append(texts[0])
            picks["bon_implicit"].append(texts[select_best([c.implicit_reward for c in ranking.candidates])])
            sums = [pair.reward.beta * (c.policy_logprob - c.reference_logprob) for c in ranking.candidates]
            picks["bon_implicit_sum"].append(texts[select_best(sums)])
            picks["bon_claims"].append(texts[ranking.best_index])
            expected = [answer_score(c.claims or [], scoring="expected") for c in ranking.candidates]
            picks["bon_claims_expected"].append(texts[select_best(expected)])
    report = {
        name: chair(answers, model_truths if name == "model" else truths, extract_objects).as_dict()
        | {"malformed": sum(not well_formed(a) for a in answers) / max(len(answers), 1)}
        for name, answers in picks.items()
    }
    report["yes_no"] = evaluate_yes_no(pair, held_out, config.yes_no_per_image, seed=sample_seed).as_dict()
    report["cost"] = cost
    return report


def evaluate_yes_no(pair: ModelPair, held_out: Sequence[Scene], per_image: int, *, seed: int = 0) -> YesNoReport:
    """The policy as a yes/no labeler on held-out scenes (half present, half absent objects)."""
    judge = pair.labeler
    if not isinstance(judge, YesNoJudge):  # a pair given another labeler would measure that one, not the policy
        raise TypeError(f"evaluate_yes_no needs the pair's own YesNoJudge, not {type(judge).__name__}")
    rng = random.Random(seed + 17)
    items: list[tuple[list[Any], list[str]]] = []
    truth: list[bool] = []
    for scene in held_out:
        asked = [sample_yes_no(scene, rng) for _ in range(per_image)]
        items.append(([scene.render()], [q for q, _, _ in asked]))
        truth.extend(t for _, _, t in asked)
    predicted = [p > 0.5 for group in judge.p_yes_batch(items) for p in group]
    return yes_no(predicted, truth)


def summarize(runs: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation of every metric over evaluation seeds."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for rule in runs[0]:
        out[rule] = {}
        for metric in runs[0][rule]:
            values = [run[rule][metric] for run in runs]
            out[rule][metric] = (statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    return out


def evaluate_seeds(pair: ModelPair, config: EvalConfig, seeds: Sequence[int]) -> dict[str, Any]:
    runs = [evaluate_pair(pair, config, sample_seed=s) for s in seeds]
    return {"seeds": list(seeds), "runs": runs, "summary": summarize(runs)}
