"""`rlaifv demo build`: the whole shapes-world RLAIF-V pipeline into one cache folder.

    <cache>/reference/        SFT reference (vision pre-training + noisy captions + yes/no)
    <cache>/run/round-NN/     the trainer's iterate rounds (self-feedback, pairs, DPO)
    <cache>/run/bundle/       the exported bundle `rlaifv serve` loads

Every stage is skipped when its output exists, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from rlaifv.trainer.shapes.reference import ReferenceConfig

if TYPE_CHECKING:
    from rlaifv.trainer.iterate_config import IterateConfig

# 2: dpo_lr 3e-5, expected-claims feedback. 3: dense patch labels and a same-colour-heavy yes/no mix (the judge
# binds colour and shape for every seed), one round of 1000 images, counted claims, NLL weight 8 (recall kept).
# 4: extra SFT chunks while the judge was unbound (measured, never the default, replaced by 5).
# 5: SFT reruns (fresh language model, another batch order) while the judge is unbound, the best judge kept; the
# first run is recipe 3's, so a build is recipe 3's bit for bit whenever its judge binds (docs/shapes-world.md).
# 6: 16 image tokens of 16 px instead of 64 of 8 px (with dense labels that give every object its patches), vision
# pre-training 1500 steps, SFT at 1e-3: the judge binds colour and shape within a few hundred SFT steps on every
# seed measured, where it used to plateau on answers from colour alone; RLAIF-V's length filter on, with 2500
# images per round so that enough pairs survive it (docs/shapes-world.md "Recipe 6").
# 7 (never shipped): 16 feedback captions per image instead of 8 and 6 DPO epochs instead of 4: a stronger round,
# and fewer malformed captions among the implicit reward's picks.
# 8: the length filter drops pairs at random among those whose chosen caption is shorter, not the shortest first:
# the ratio order dropped every pair where a hallucination added an object and kept those where the chosen
# caption names one more true object (docs/shapes-world.md "Recipe 8").
# 9: a per-token KL to the reference in the DPO loss (weight 1): the round no longer raises stray words, so the
# implicit reward's picks are fewer malformed captions, which held 15 of 17 of its hallucinated objects on the
# weakest recipe-8 cell (docs/shapes-world.md "Recipe 9").
RECIPE_VERSION = 9


@dataclass
class DemoConfig:
    """The shapes-world recipe: reference SFT, then RLAIF-V rounds with self-feedback."""

    seed: int = field(default=0, metadata={"help": "Seed of the whole build (deterministic given it)."})
    rounds: int = field(
        default=1,
        metadata={"help": "RLAIF-V rounds (self-feedback each round); a second round lost 2-3 points of recall."},
    )
    prompts_per_round: int = field(
        default=2500,
        metadata={"help": "New images per round (2500: with the length filter, 1000 left too few pairs to bind)."},
    )
    samples: int = field(
        default=16,
        metadata={"help": "Captions sampled per image for feedback (8: the implicit reward misranked odd captions)."},
    )
    feedback_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the feedback captions (RLAIF-V samples at 0.7)."}
    )
    dpo_lr: float = field(default=3e-5, metadata={"help": "DPO learning rate (1e-4 collapsed recall)."})
    dpo_epochs: int = field(default=6, metadata={"help": "Passes over the round's pairs."})
    dpo_batch: int = field(default=32, metadata={"help": "Pairs per DPO step."})
    nll_weight: float = field(default=8.0, metadata={"help": "NLL term on the chosen caption (keeps recall)."})
    token_kl: float = field(
        default=1.0,
        metadata={
            "help": "Per-token KL to the reference in the DPO loss (`DPOConfig.token_kl`): keeps the round from"
            " raising stray words, the captions the implicit reward misranked most."
        },
    )
    max_pairs_per_prompt: int = field(default=3, metadata={"help": "Pairs kept per image."})
    length_balance: bool = field(
        default=True,
        metadata={
            "help": "RLAIF-V's length filter. A hallucinated caption here is one with an extra object, so without it"
            " DPO learns 'shorter is better' and the implicit reward ranks answers by length (measured, recipe 6)."
        },
    )
    length_drop: Literal["ratio", "random"] = field(
        default="random",
        metadata={
            "help": "Which pairs the length filter drops (`PairConfig.length_drop`); 'ratio' (RLAIF-V's threshold)"
            " kept the pairs that teach 'name more objects' and dropped those that teach 'not an extra one'."
        },
    )
    claim_score: Literal["count", "expected"] = field(
        default="count",
        metadata={"help": "Feedback score: 'count' (RLAIF-V: -rejected claims) or 'expected' (-sum of p(no))."},
    )
    keep_verified: bool = field(
        default=True, metadata={"help": "Pairs whose chosen caption keeps every verified object of the rejected one."}
    )
    bundle_reference: Literal["initial", "round"] = field(
        default="initial",
        metadata={"help": "The bundle's reference: the SFT model, or the last round's own DPO reference."},
    )
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    ADDED_NEUTRAL: ClassVar[dict[str, Any]] = {"feedback_temperature": 1.0, "length_drop": "ratio", "token_kl": 0.0}

    def __post_init__(self) -> None:
        if isinstance(self.reference, dict):
            self.reference = ReferenceConfig(**self.reference)
        if self.rounds < 1 or self.prompts_per_round < 1 or self.samples < 2:
            raise ValueError("rounds >= 1, prompts_per_round >= 1 and samples >= 2 are required")
        self.reference.seed = self.seed

    def fingerprint(self) -> str:
        """Hash of the recipe. Settings added later are left out while they hold the value that reproduces the
        recipe as it was (`ADDED_NEUTRAL` here and in `ReferenceConfig`), so a new, inactive knob does not
        invalidate builds."""
        import hashlib

        data = asdict(self)
        for settings, added in ((data["reference"], ReferenceConfig.ADDED_NEUTRAL), (data, self.ADDED_NEUTRAL)):
            for key, neutral in added.items():
                if settings.get(key) == neutral:
                    del settings[key]
        payload = json.dumps({"recipe": RECIPE_VERSION, **data}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def demo_config(seed: int = 0, overrides: list[str] | None = None) -> DemoConfig:
    """The default recipe for `seed`, with `key=value` / `reference.key=value` overrides (unknown keys refused)."""
    from rlaifv.trainer.iterate_config import apply_overrides, build_config

    data = apply_overrides(asdict(DemoConfig(seed=seed)), overrides or [])
    data["reference"] = build_config(ReferenceConfig, data["reference"], "reference")
    return build_config(DemoConfig, data, "")


def iterate_config(config: DemoConfig, reference_dir: Path, run_dir: Path, progress: bool = True) -> IterateConfig:
    from rlaifv.trainer.dpo_config import DPOConfig
    from rlaifv.trainer.feedback_config import FeedbackConfig
    from rlaifv.trainer.iterate_config import IterateConfig
    from rlaifv.trainer.preference_pairs import PairConfig

    return IterateConfig(
        model=str(reference_dir),
        output_dir=str(run_dir),
        rounds=config.rounds,
        prompts_per_round=config.prompts_per_round,
        reference_mode="previous",
        export_reference=config.bundle_reference,
        bundle_name="shapes-rlaifv",
        seed=config.seed,
        progress=progress,
        feedback=FeedbackConfig(
            num_samples=config.samples,
            temperature=config.feedback_temperature,
            max_tokens=32,
            labeler="self",
            repeat_penalty=1.0,
            claim_score=config.claim_score,
            prompt_batch=32,
            seed=config.seed,
        ),
        pairs=PairConfig(
            max_pairs_per_prompt=config.max_pairs_per_prompt,
            length_balance=config.length_balance,
            length_drop=config.length_drop,
            keep_verified=config.keep_verified,
            seed=config.seed,
        ),
        dpo=DPOConfig(
            beta=0.1,
            nll_weight=config.nll_weight,
            token_kl=config.token_kl,
            learning_rate=config.dpo_lr,
            epochs=config.dpo_epochs,
            batch_size=config.dpo_batch,
            freeze_vision=True,
            cpu=True,
            seed=config.seed,
            ref_batch_size=64,
        ),
    )


def build_demo(cache_dir: str | Path, config: DemoConfig | None = None, *, progress: bool = True) -> Path:
    """Build (or resume) the shapes-world bundle; returns the bundle folder."""
    from rlaifv.trainer.iterate import run_iterate
    from rlaifv.trainer.shapes.reference import train_reference
    from rlaifv.trainer.shapes.source import ShapesPromptSource

    config = config or DemoConfig()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    earlier = cache / "build.json"
    # A resumed build keeps the times of the stages it did not redo (the shipped provenance reports them).
    timings: dict[str, Any] = json.loads(earlier.read_text()).get("timings", {}) if earlier.is_file() else {}
    reference_dir = cache / "reference"
    if not (reference_dir / "DONE").is_file():
        start = time.perf_counter()
        metrics = train_reference(reference_dir, config.reference)
        (reference_dir / "DONE").write_text(json.dumps(metrics) + "\n")
        timings["reference_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = run_iterate(iterate_config(config, reference_dir, cache / "run", progress), ShapesPromptSource())
    if len(result.resumed_rounds) < config.rounds or "rounds_s" not in timings:
        timings["rounds_s"] = time.perf_counter() - start
    (cache / "build.json").write_text(json.dumps({"config": asdict(config), "timings": timings}, indent=2) + "\n")
    return result.bundle_dir
