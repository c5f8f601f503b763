"""The miniature RLAIF-V loop works: less hallucination at T=1, recall kept, claim-checked best-of-N beats random.

Slow: builds the default shapes bundle (reference SFT + two self-feedback DPO rounds, seed 0) once per session.
The thresholds say "clearly better", below the targets; docs/shapes-world.md reports the measured numbers.
"""

from __future__ import annotations

import pytest

from trainer.shapes.evaluate import EvalConfig, evaluate_pair
from trainer.shapes.report import _pair, models_of_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(shapes_bundle):
    from reward.bundle import read_manifest, resolve

    manifest = read_manifest(shapes_bundle)
    reference = resolve(shapes_bundle, manifest.reference)
    config = EvalConfig(images=200, n=8)
    out = {}
    for label, policy_dir, policy_type in models_of_bundle(shapes_bundle):
        pair = _pair(policy_dir, reference, policy_type, manifest.beta, manifest.normalize)
        out[label] = evaluate_pair(pair, config, sample_seed=0)
    return out


def _aligned(reports):
    return reports[[label for label in reports if label != "reference"][-1]]


def test_rlaifv_rounds_reduce_hallucination_and_keep_recall(reports):
    ref, aligned = reports["reference"]["model"], _aligned(reports)["model"]
    assert ref["chair_i"] > 0.08, "the reference must hallucinate at T=1 for the test to mean anything"
    assert aligned["chair_i"] <= 0.65 * ref["chair_i"], (ref, aligned)
    assert aligned["recall"] >= ref["recall"] - 0.06, (ref, aligned)
    assert aligned["repeats"] <= ref["repeats"], (ref, aligned)


def test_yes_no_judge_survives_alignment(reports):
    assert reports["reference"]["yes_no"]["f1"] > 0.8
    assert _aligned(reports)["yes_no"]["f1"] >= reports["reference"]["yes_no"]["f1"] - 0.05


def test_claim_verification_best_of_n_beats_random(reports):
    for label, rules in reports.items():
        assert rules["bon_claims"]["chair_i"] <= 0.85 * rules["random"]["chair_i"], (label, rules)
