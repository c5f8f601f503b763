"""Settings of the iterative RLAIF-V loop (`rlaifv train iterate`)."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pydantic

from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.errors import ConfigError
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.preference_pairs import PairConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")

# Settings that may change when resuming an output folder (everything else must match).
RESUMABLE_CHANGES = (
    "rounds",
    "export_round",
    "export_reference",
    "best_metric",
    "best_mode",
    "bundle_name",
    "normalize",  # the exported bundle's reward only: no round depends on it
    "progress",
    "output_dir",
)


@dataclass
class IterateConfig:
    """k rounds of sample -> feedback -> pairs -> DPO -> (eval), then export one round as a bundle."""

    model: str = field(
        metadata={"help": "Initial model folder (the SFT model): round 1's policy and the bundle's reference."}
    )
    output_dir: str = field(metadata={"help": "Run folder; rerunning with the same settings resumes it."})
    rounds: int = field(default=4, metadata={"help": "Number of rounds (RLAIF-V: 4)."})
    prompts_per_round: int = field(default=64, metadata={"help": "Prompts sampled per round (RLAIF-V: ~4k)."})
    reference_mode: Literal["previous", "initial"] = field(
        default="previous",
        metadata={
            "help": "DPO reference of round r: the round's starting policy (RLAIF-V) or the initial model. "
            "LoRA: the round's starting adapter over the base, or the base (then token_kl needs 'initial')."
        },
    )
    export_round: str | int = field(
        default="last", metadata={"help": "Round to export: 'last', 'best' (by best_metric) or a number."}
    )
    export_reference: Literal["initial", "round"] = field(
        default="initial",
        metadata={
            "help": "The bundle's reference: the initial (SFT) model, or the DPO reference of the exported round"
            " (with reference_mode 'previous', the round before it), under which that round's implicit reward was"
            " trained. Full fine-tuning only."
        },
    )
    best_metric: str | None = field(default=None, metadata={"help": "Eval metric that picks the 'best' round."})
    best_mode: Literal["max", "min"] = field(
        default="max", metadata={"help": "Whether a higher or lower best_metric is better."}
    )
    bundle_name: str = field(default="rlaifv", metadata={"help": "Model name the service advertises for the bundle."})
    normalize: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "Reward normalisation stored in the bundle."}
    )
    seed: int = field(default=0, metadata={"help": "Run seed; rounds, prompts and samples derive theirs from it."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if self.prompts_per_round < 1:
            raise ConfigError("prompts_per_round must be >= 1")
        if self.reference_mode not in ("previous", "initial"):
            raise ConfigError("reference_mode must be 'previous' or 'initial'")
        if self.dpo.lora and self.dpo.token_kl > 0 and self.reference_mode == "previous" and self.rounds > 1:
            raise ConfigError(
                "dpo.token_kl with LoRA needs reference_mode=initial: the per-token KL is taken against the base at"
                " every step, while reference_mode=previous anchors round 2 on the previous round's adapter"
            )
        if self.best_mode not in ("max", "min"):
            raise ConfigError("best_mode must be 'max' or 'min'")
        if self.normalize not in ("mean", "sum"):
            raise ConfigError("normalize must be 'mean' or 'sum'")
        if self.export_reference not in ("initial", "round"):
            raise ConfigError("export_reference must be 'initial' or 'round'")
        if self.export_reference == "round" and self.dpo.lora:
            raise ConfigError("export_reference 'round' needs full fine-tuning (a LoRA bundle's reference is its base)")
        if self.export_round not in ("last", "best"):
            try:
                number = int(self.export_round)
            except ValueError:
                raise ConfigError("export_round must be 'last', 'best' or a round number") from None
            if not 1 <= number <= self.rounds:
                raise ConfigError(f"export_round {number} is outside 1..{self.rounds}")
        if self.export_round == "best" and not self.best_metric:
            raise ConfigError("export_round 'best' needs best_metric")
        sections: dict[str, FeedbackConfig | PairConfig | DPOConfig] = {
            "feedback": self.feedback,
            "pairs": self.pairs,
            "dpo": self.dpo,
        }
        unused = [
            f"{name}.seed={section.seed}" for name, section in sections.items() if section.seed not in (0, self.seed)
        ]
        if unused:
            warnings.warn(
                f"each round's seeds derive from the run's seed={self.seed} (seed * 1000 + round), so"
                f" {', '.join(unused)} is not used: set seed instead",
                stacklevel=3,
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as run.json and the bundle's provenance keep them (feedback.llm_url without credentials)."""
        data = asdict(self)
        data["feedback"] = self.feedback.to_dict()
        data["dpo"] = self.dpo.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterateConfig:
        data = dict(data)
        nested = {"feedback": FeedbackConfig, "pairs": PairConfig, "dpo": DPOConfig}
        for key, kind in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = build_config(kind, data[key], key)
        return build_config(cls, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> IterateConfig:
        return cls.from_dict(read_settings_file(path))


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A JSON object of settings (possibly partial), with a ConfigError for unreadable files."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    return data


def build_config(kind: type[ConfigT], data: dict[str, Any], prefix: str) -> ConfigT:
    """The config `kind` from `data`, each value checked against its field's type first: a dataclass takes any
    value, and `"False"` (a string) turned LoRA on, `1.5` epochs failed mid-run."""
    names = {f.name for f in dataclasses.fields(kind)}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(where + u for u in unknown)}")
    hints = typing.get_type_hints(kind)
    checked = dict(data)
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and dataclasses.is_dataclass(value):
            continue
        try:
            checked[name] = pydantic.TypeAdapter(hints[name]).validate_python(value, strict=True)  # 1 -> 1.0
        except pydantic.ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise ConfigError(f"setting {where}{name}: {problem}, got {value!r}") from None
    try:
        return kind(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` / `section.key=value` strings to a config dict. A value is read as JSON (`false`, `null`,
    `3e-7`), else as a Python literal (`False`, `None`: how `rlaifv train options` prints defaults), else taken as
    text; `build_config` then checks it against the setting's type."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = raw
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {key!r}: {part} is not a section")
        target[parts[-1]] = value
    return data


def describe_settings(kind: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(name, default, help) for every field of a config dataclass, nested sections flattened."""
    rows = []
    for f in dataclasses.fields(kind):
        if dataclasses.is_dataclass(f.type) or (f.name in ("feedback", "pairs", "dpo") and kind is IterateConfig):
            sub = {"feedback": FeedbackConfig, "pairs": PairConfig, "dpo": DPOConfig}[f.name]
            rows.extend(describe_settings(sub, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows
