"""Settings of one DPO run (`rlaifv train dpo`, and each round of `rlaifv train iterate`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from rlaifv.trainer.errors import ConfigError

# The language model's attention and MLP projections (vision encoder excluded): under `language_model` in most
# families, `text_model` in Idefics2/3 and SmolVLM; fused ones as GLM (gate_up_proj) and Phi-3 (qkv_proj) name them.
DEFAULT_LORA_TARGETS = (
    r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj)"
)


@dataclass
class DPOConfig:
    """Sigmoid DPO on summed answer log-probs, optionally plus an NLL term on the chosen answer.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) + nll_weight * (-pi_c / T_c)
           + token_kl * (KL_c + KL_r) / 2, KL_a = mean over answer a's positions of KL(pi(.|context) || ref(.|context))

    each term averaged over the pairs of an optimizer step (however they are split into micro-batches).
    """

    beta: float = field(
        default=0.1, metadata={"help": "DPO temperature (RLAIF-V: 0.1); also the bundle's reward beta."}
    )
    nll_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the chosen answer's NLL per token (-pi_c / T_c); keeps recall up. RLAIF-V's SFT"
            " weight multiplies the summed NLL (-pi_c): its weight w is about w * T_c here (T_c: 100-300 tokens)."
        },
    )
    token_kl: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a per-token KL(policy || reference) over the whole vocabulary, averaged over each "
            "answer's positions, then over the two answers; keeps DPO from moving probability onto tokens the "
            "reference finds unlikely (stray words, where the implicit reward is least reliable). Costs a "
            "reference forward per step."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate; default 5e-7 for full fine-tuning, 1e-5 for LoRA (RLAIF-V)."},
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the pairs."})
    batch_size: int = field(default=2, metadata={"help": "Pairs per forward per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forwards per optimizer step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of optimizer steps with linear warm-up."})
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "Schedule after warm-up."}
    )
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not applied to biases and norms)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Train the policy with its dropout off, as TRL's DPOTrainer does by default: the reference"
            " log-probs are taken in eval mode, so a policy scored with dropout on has noisy log-ratios (margins"
            " away from 0 at step 0, a loss partly fitting the noise). Zeroes every dropout module and the"
            " attention's dropout probability (attention_dropout, which TRL's leaves on); LoRA's own lora_dropout"
            " stays as set (an explicit choice for the adapter; TRL zeroes it too). RLAIF-V's models have no"
            " dropout: for them this changes nothing."
        },
    )
    lora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter (reference = adapter disabled) instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout on the adapter's input (kept by disable_dropout)."}
    )
    lora_targets: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex of module names LoRA wraps."})
    freeze_vision: bool = field(
        default=True,
        metadata={
            "help": "Keep the image encoder fixed in full fine-tuning (the family's module paths: "
            "reward/families.py); the projector trains unless freeze_projector."
        },
    )
    freeze_projector: bool = field(
        default=False, metadata={"help": "Also keep the projector (image features -> language model) fixed."}
    )
    max_answer_tokens: int | None = field(
        default=None, metadata={"help": "Drop pairs with a longer answer (tokens, EOT included)."}
    )
    ref_batch_size: int = field(
        default=8, metadata={"help": "Pairs per no-grad forward when precomputing reference log-probs."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weight dtype while training: float32 (full fine-tuning needs it: the optimizer's master"
            " weights), or bfloat16/float16 for the frozen base of a LoRA run."
        },
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "accelerate mixed precision."}
    )
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is visible."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation of LoRA weights and the pair order."})
    checkpoint_every_epoch: bool = field(
        default=False,
        metadata={"help": "Save model+optimizer+scheduler state after each epoch; a rerun resumes from the latest."},
    )
    checkpoint_every_steps: int = field(
        default=0,
        metadata={
            "help": "Also save that state every this many optimizer steps (0: off); a rerun resumes mid-epoch,"
            " skipping the batches already trained on."
        },
    )
    keep_checkpoints: int = field(
        default=1,
        metadata={
            "help": "Newest checkpoints kept (0: all); an older one is removed only once a newer one is complete."
            " They stay after the run (a warning says where and how large). A full 7B checkpoint with its AdamW"
            " state is ~84 GB."
        },
    )
    log_every: int = field(default=1, metadata={"help": "Log metrics every this many optimizer steps."})
    end_of_turn: str | None = field(
        default=None, metadata={"help": "Token closing an answer; the tokenizer's EOS when unset."}
    )

    def __post_init__(self) -> None:
        checks = [
            (self.beta > 0, "beta must be > 0"),
            (self.nll_weight >= 0, "nll_weight must be >= 0"),
            (self.token_kl >= 0, "token_kl must be >= 0"),
            (self.learning_rate is None or self.learning_rate > 0, "learning_rate must be > 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (self.lora_alpha > 0, "lora_alpha must be > 0 (0 scales the adapter to nothing: training changes nothing)"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.max_answer_tokens is None or self.max_answer_tokens >= 1, "max_answer_tokens must be >= 1"),
            (self.ref_batch_size >= 1, "ref_batch_size must be >= 1"),
            (self.lr_scheduler in ("cosine", "linear", "constant"), "lr_scheduler must be cosine, linear or constant"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16"),
            (
                self.lora or self.dtype == "float32",
                f"dtype={self.dtype} with full fine-tuning: AdamW on {self.dtype} weights has no float32 master copy,"
                " so updates at DPO's learning rates round away; use dtype=float32 with mixed_precision=bf16"
                " (float32 master weights, as RLAIF-V's DeepSpeed runs keep) or lora=true",
            ),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0"),
            (self.keep_checkpoints >= 0, "keep_checkpoints must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            re.compile(self.lora_targets)
        except re.error as exc:
            raise ConfigError(f"lora_targets is not a regular expression: {exc}") from None

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-5 if self.lora else 5e-7

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # How often state is saved or logged changes no trained weight: a run may resume with other values.
    BOOKKEEPING: ClassVar[tuple[str, ...]] = (
        "checkpoint_every_epoch",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every",
        "ref_batch_size",  # how many rows the reference pass scores at once (its cache is shared across sizes too)
    )

    EARLIER_VALUES: ClassVar[dict[str, Any]] = {"disable_dropout": False}
    """How versions before each of these settings trained: a run they started goes on so (`iterate`'s later rounds
    train as its first did)."""

    EARLIER_LEFT_OUT: ClassVar[tuple[str, ...]] = (*BOOKKEEPING, *EARLIER_VALUES)
    """What `training_settings` leaves out as versions before `disable_dropout` recorded them: they trained with the
    model's dropout on, so their runs are this one where dropout is left on or the model has none."""

    def training_settings(self, left_out: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The settings that decide the trained weights (what a resumed run must share with the first)."""
        names = self.BOOKKEEPING if left_out is None else left_out
        return {k: v for k, v in asdict(self).items() if k not in names}
