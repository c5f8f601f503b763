"""The shapes-world report: reference vs each round, best-of-N by each reward vs a random pick."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from rlaifv.trainer.shapes.evaluate import EvalConfig, evaluate_seeds

if TYPE_CHECKING:
    from rlaifv.reward.model_pair import ModelPair

RULES = {
    "model": "all samples (T=1)",
    "random": "random-of-N",
    "bon_implicit": "best-of-N, implicit reward (mean)",
    "bon_implicit_sum": "best-of-N, implicit reward (sum)",
    "bon_claims": "best-of-N, claims (count, default)",
    "bon_claims_expected": "best-of-N, claims (expected)",
}
METRICS = ("chair_i", "chair_s", "recall", "repeats")


def pair_from_folders(
    policy_dir: Path, reference_dir: Path, policy_type: str, beta: float, normalize: str
) -> ModelPair:
    """One evaluated model against the run's reference, with the bundle's reward settings."""
    from rlaifv.reward.bundle import load_pair
    from rlaifv.reward.scoring import RewardConfig

    reward = RewardConfig(beta=beta, normalize=normalize)
    return load_pair(policy_dir, reference_dir, policy_type=policy_type, reward=reward)


def models_of_bundle(bundle: Path) -> list[tuple[str, Path, str]]:
    """(label, policy folder, policy type): the reference, every round recorded in provenance, the exported policy."""
    from rlaifv.reward.bundle import read_manifest, resolve
    from rlaifv.trainer.iterate import policy_of

    manifest = read_manifest(bundle)
    reference = resolve(bundle, manifest.reference)
    entries = [("reference", reference, "full")]
    run_dir = bundle.parent
    for item in manifest.provenance.get("rounds", []):
        report = run_dir / f"round-{int(item['round']):02d}" / "report.json"
        if report.is_file():
            data = json.loads(report.read_text())
            policy = policy_of(run_dir, data)  # relative to the run folder, or absolute in reports made before
            if policy.is_dir():
                entries.append((f"round {item['round']}", policy, data["policy_type"]))
    if len(entries) == 1:
        entries.append(("policy", resolve(bundle, manifest.policy), manifest.policy_type))
    return entries


def evaluate_bundle(bundle: Path, *, seeds: Sequence[int], images: int = 200, n: int = 8) -> dict[str, Any]:
    from rlaifv.reward.bundle import read_manifest, resolve

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    reference = resolve(bundle, manifest.reference)
    config = EvalConfig(images=images, n=n)
    results: dict[str, Any] = {"bundle": str(bundle), "images": images, "n": n, "seeds": list(seeds), "models": {}}
    for label, policy_dir, policy_type in tqdm(models_of_bundle(bundle), desc="models", leave=False):
        pair = pair_from_folders(policy_dir, reference, policy_type, manifest.beta, manifest.normalize)
        results["models"][label] = evaluate_seeds(pair, config, seeds)["summary"]
    return results


def _cell(stats: tuple[float, float], percent: bool) -> str:
    mean, std = stats
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.3f} ± {std:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['images']} held-out images, N={report['n']}, temperature 1, seeds {report['seeds']} (mean ± std)",
        "",
        "| model | selection | CHAIRi % | CHAIRs % | recall | repeats % | yes/no F1 | yes/no acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, summary in report["models"].items():
        yes_no = summary["yes_no"]
        for rule, title in RULES.items():
            row = summary[rule]
            if label == "reference" and rule.startswith("bon_implicit"):
                continue  # policy == reference: every implicit reward is 0
            lines.append(
                f"| {label} | {title} | {_cell(row['chair_i'], True)} | {_cell(row['chair_s'], True)} | "
                f"{_cell(row['recall'], False)} | {_cell(row['repeats'], True)} | "
                f"{_cell(yes_no['f1'], False)} | {_cell(yes_no['accuracy'], False)} |"
            )
    lines += [
        "",
        f"Cost of the rewards (seconds over the whole evaluation, mean over seeds): sampling {report['n']} captions,",
        "the reference pass of the implicit reward, and claim verification (distinct questions per image).",
        "",
        "| model | sampling s | implicit reward: reference pass s | claims: labeler s | questions / image |",
        "|---|---|---|---|---|",
    ]
    for label, summary in report["models"].items():
        c = summary["cost"]
        lines.append(
            f"| {label} | {c['sample_s'][0]:.2f} | {c['reference_s'][0]:.2f} | {c['claims_s'][0]:.2f} | "
            f"{c['questions_per_image'][0]:.1f} |"
        )
    return "\n".join(lines)
