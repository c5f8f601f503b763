"""Training the shapes world's reference model: vision pre-training, then SFT on noisy captions + yes/no.

1. The vision tower (16 patches of 16 px per image) learns alone which of the 12
   objects are present (max-pooled per-patch logits) and which object each patch
   shows (dense labels).
2. The projector and language model (and the tower, at a tenth of the rate)
   learn to caption (30 % of captions name an absent object, as web captions do)
   and to answer yes/no questions (half the "no" questions name an absent object
   sharing a present one's colour, so colour alone cannot answer them).
3. The judge is probed per kind of question and the result kept with the build;
   with `judge_target` set, SFT is run again (fresh language model, another
   order of batches) while it has not bound colour and shape: a judge that
   answers from colour alone teaches the RLAIF-V round nothing.

The SFT loss is the answer log-prob from `rlaifv.reward.logprobs.answer_logprobs`,
the same function the service scores with.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypedDict

import torch
from tqdm.auto import tqdm

from rlaifv.reward.logprobs import answer_logprobs
from rlaifv.reward.prompt import EncodedPrompt, encode_answer, encode_prompt, end_of_turn_id
from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_model, build_processor
from rlaifv.trainer.shapes.world import (
    CAPTION_QUESTION,
    OBJECTS,
    Scene,
    caption,
    noisy_caption,
    question_kinds,
    sample_training_yes_no,
    scenes,
    vocabulary,
    yes_no_question,
)

HELD_OUT_SEED_OFFSET = 50_000  # the judge probe's scenes; the evaluation's held-out images use other seeds


def shapes_spec(seed: int = 0, *, object_tokens: bool = False, patch_size: int = 16) -> TinyVLMSpec:
    """~1.1M parameters: CLIP hidden 128 x 3 layers on 64x64 (16 image tokens of 16 px; recipe 5 and earlier: 64
    of 8 px), Llama hidden 128 x 2 layers.

    `object_tokens`: each object name ("red circle") is one token, as a BPE tokenizer merges a frequent bigram.
    """
    return TinyVLMSpec(
        words=vocabulary(),
        phrases=OBJECTS if object_tokens else (),
        image_size=64,
        patch_size=patch_size,
        vision_hidden=128,
        vision_layers=3,
        vision_heads=4,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=4,
        intermediate=256,
        max_positions=256,
        seed=seed,
    )


@dataclass
class ReferenceConfig:
    """Recipe of the reference model (defaults: the prototype's, sized for 2 CPU cores)."""

    seed: int = field(default=0, metadata={"help": "Seed for scenes, noise and initialisation."})
    train_images: int = field(default=6000, metadata={"help": "Pool of training scenes."})
    hallucination_rate: float = field(default=0.3, metadata={"help": "Share of captions with one absent object."})
    patch_size: int = field(
        default=16,
        metadata={
            "help": "Vision patch size in pixels: 16 gives 16 image tokens per 64 px image (recipe 6), 8 gives 64."
            " With 64 tokens, three quarters of them background, the judge's lookup of the asked object among"
            " the image tokens formed late or never (docs/shapes-world.md)."
        },
    )
    patch_min_cover: float = field(
        default=0.15,
        metadata={
            "help": "Dense patch labels: a patch is labelled with the object covering most of its object pixels"
            " when that object covers at least this share of it (0: the majority label, background included)."
        },
    )
    vision_steps: int = field(default=1500, metadata={"help": "Vision pre-training steps."})
    vision_batch: int = field(default=128, metadata={"help": "Vision pre-training batch size."})
    vision_lr: float = field(default=2e-3, metadata={"help": "Vision pre-training learning rate."})
    patch_labels: bool = field(
        default=True, metadata={"help": "Also teach each patch which object covers it (dense labels)."}
    )
    sft_steps: int = field(default=1200, metadata={"help": "SFT steps."})
    sft_batch: int = field(default=64, metadata={"help": "SFT batch size (yes/no questions and captions)."})
    sft_lr: float = field(
        default=1e-3,
        metadata={"help": "SFT peak learning rate (cosine, 5% warm-up); 2e-3 (recipe 5) kept the judge from binding."},
    )
    tower_lr_scale: float = field(
        default=0.1, metadata={"help": "Vision tower learning rate during SFT, as a share of sft_lr (0: frozen)."}
    )
    yes_no_share: float = field(
        default=2 / 3, metadata={"help": "Share of each SFT batch that is yes/no questions (the rest: captions)."}
    )
    colour_miss: float = field(
        default=0.5, metadata={"help": "Share of 'no' questions about an absent object sharing a present colour."}
    )
    shape_miss: float = field(
        default=0.25, metadata={"help": "Share of 'no' questions about an absent object sharing a present shape."}
    )
    loss_per: Literal["token", "answer"] = field(
        default="token",
        metadata={
            "help": "SFT loss averaged over answer tokens, or over answers (each answer's mean token NLL): a"
            " one-word 'yes' then weighs as much as a twelve-token caption."
        },
    )
    judge_target: float = field(
        default=0.9,
        metadata={
            "help": "While the judge answers any kind of yes/no question below this after SFT, SFT is run again"
            " (0: one run, recipe 3; recipe 5 measured 0.9 on 3 seeds x 2 thread counts: docs/shapes-world.md)."
        },
    )
    sft_attempts: int = field(
        default=3,
        metadata={
            "help": "SFT runs at most: each from the same pre-trained tower with a freshly initialised language model"
            " and another order of batches; the run whose judge is best is kept."
        },
    )
    plateau_check: int = field(
        default=700,
        metadata={
            "help": "At this SFT step a run whose judge still gives one answer to every question is given up (0:"
            " never; the last allowed run always finishes)."
        },
    )
    object_tokens: bool = field(
        default=False,
        metadata={"help": "One token per object name ('red circle'), so a yes/no question names its object once."},
    )
    presence_aux: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an auxiliary loss during SFT: a linear probe on the hidden state at the yes/no"
            " question's object token (after `presence_layer` layers) predicts whether the object is present;"
            " it gives the judge's image lookup a gradient of its own (the probe is discarded). 0: off."
        },
    )
    presence_layer: int = field(default=1, metadata={"help": "Decoder layer whose output the presence probe reads."})

    # Settings added after recipe 3 shipped, with the value that reproduces it (left out of the fingerprint).
    ADDED_NEUTRAL: ClassVar[dict[str, Any]] = {
        "loss_per": "token",
        "judge_target": 0.0,
        "sft_attempts": 3,
        "plateau_check": 700,
        "object_tokens": False,
        "presence_aux": 0.0,
        "presence_layer": 1,
        "patch_size": 8,
        "patch_min_cover": 0.0,
    }

    def __post_init__(self) -> None:
        if not 0.0 <= self.hallucination_rate < 1.0:
            raise ValueError("hallucination_rate must be in [0, 1)")
        if not 0.0 < self.yes_no_share < 1.0 or self.colour_miss + self.shape_miss > 1.0:
            raise ValueError("yes_no_share must be in (0, 1) and colour_miss + shape_miss <= 1")
        if self.loss_per not in ("token", "answer"):
            raise ValueError("loss_per must be 'token' or 'answer'")
        if not 0.0 <= self.judge_target <= 1.0 or self.sft_attempts < 1 or self.plateau_check < 0:
            raise ValueError("judge_target must be in [0, 1], sft_attempts >= 1 and plateau_check >= 0")
        if self.patch_size < 1 or 64 % self.patch_size or not 0.0 <= self.patch_min_cover <= 1.0:
            raise ValueError("patch_size must divide the 64 px image and patch_min_cover must be in [0, 1]")
        if self.presence_aux < 0 or self.presence_layer < 1:
            raise ValueError("presence_aux must be >= 0 and presence_layer >= 1")
        if min(self.vision_steps, self.sft_steps, self.vision_batch, self.sft_batch, self.train_images) < 1:
            raise ValueError("steps, batches and train_images must be positive")


def pixel_values(processor: Any, images: list[Any]) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _cosine(step: int, total: int, warmup: float = 0.05) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def pretrain_vision(
    model: Any,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    config: ReferenceConfig,
    patch_labels: torch.Tensor | None = None,
) -> float:
    """Object presence (max-pooled per-patch logits) and, given `patch_labels`, each patch's own object.

    Returns the final batch's exact-match rate of the presence head. Max pooling
    makes some patch say which object is there; the per-patch labels (which of
    the 12 objects, or background, covers most of the patch) make *every* patch
    of an object say it, in the same direction for every image. Without them the
    tower's features depended on the seed so much that the language model
    learned to bind colour and shape for one seed and never for another.
    """
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(OBJECTS))
    patch_head = torch.nn.Linear(tower.config.hidden_size, len(OBJECTS) + 1)
    params = list(tower.parameters()) + list(head.parameters()) + list(patch_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(config.seed)
    tower.train()
    accuracy = 0.0
    for step in (bar := tqdm(range(config.vision_steps), desc="vision pre-training", leave=False)):
        for group in optimizer.param_groups:
            group["lr"] = config.vision_lr * _cosine(step, config.vision_steps)
        idx = torch.randint(0, pixels.shape[0], (config.vision_batch,), generator=gen)
        patches = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]  # (B, P, H), CLS dropped as LLaVA does
        logits = head(patches).max(dim=1).values  # (B, 12)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
        if patch_labels is not None:
            per_patch = patch_head(patches).flatten(0, 1)  # (B * P, 13)
            loss = loss + torch.nn.functional.cross_entropy(per_patch, patch_labels[idx].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        accuracy = float(((logits > 0).float() == labels[idx]).all(-1).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", exact=f"{accuracy:.2f}")
    tower.eval()
    return accuracy


class SFTBatch(NamedTuple):
    prompts: list[EncodedPrompt]
    answers: list[list[list[int]]]
    asked: list[tuple[int, int, bool]]  # yes/no items: (index in the batch, the object's last token, present)


def _object_position(tokenizer: Any, input_ids: torch.Tensor, obj: str) -> int:
    """Index of the last token of `obj`'s name in a prompt (the question names it once)."""
    name = tokenizer(" " + obj, add_special_tokens=False).input_ids
    ids = input_ids.tolist()
    starts = [i for i in range(len(ids) - len(name) + 1) if ids[i : i + len(name)] == name]
    if len(starts) != 1:
        raise ValueError(f"the question names {obj!r} {len(starts)} times")
    return starts[0] + len(name) - 1


def presence_loss(model: Any, head: torch.nn.Module, batch: SFTBatch, layer: int) -> torch.Tensor:
    """BCE of a linear probe on the hidden state at each yes/no question's object token: is the object there?

    The judge's answer needs a two-step circuit (find the asked object, look it
    up among the image tokens) whose steps get no gradient until both exist, so
    it forms at a random step (docs/shapes-world.md). The probe trains the
    lookup at the object token directly; reading its result at the answer is
    then one step. Yes/no prompts all have one length, so they run as one batch.
    """
    rows = [batch.prompts[i] for i, _, _ in batch.asked]
    ids = torch.stack([p.input_ids for p in rows])
    vision = {key: torch.cat([p.vision[key] for p in rows]) for key in rows[0].vision}
    hidden = model(input_ids=ids, **vision, output_hidden_states=True).hidden_states[layer]
    at = hidden[torch.arange(len(rows)), torch.tensor([pos for _, pos, _ in batch.asked])]
    target = torch.tensor([float(present) for _, _, present in batch.asked])
    return torch.nn.functional.binary_cross_entropy_with_logits(head(at).squeeze(-1), target)


class SFTData:
    """Pre-encoded prompts and answers, so each SFT step only indexes tensors."""

    def __init__(self, processor: Any, scene_list: list[Scene], pixels: torch.Tensor, config: ReferenceConfig) -> None:
        self.scenes = scene_list
        self.pixels = pixels
        self.config = config
        self.tokenizer = processor.tokenizer
        self.eot = end_of_turn_id(self.tokenizer, processor=processor)
        blank = [scene_list[0].render()]
        self.caption_ids = encode_prompt(processor, blank, CAPTION_QUESTION).input_ids
        self.question_ids = {obj: encode_prompt(processor, blank, yes_no_question(obj)).input_ids for obj in OBJECTS}
        self.object_position = {obj: _object_position(self.tokenizer, q, obj) for obj, q in self.question_ids.items()}
        self._answers: dict[str, list[int]] = {}

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = encode_answer(self.tokenizer, text, eot_id=self.eot)
        return self._answers[text]

    def batch(self, rng: random.Random, size: int) -> SFTBatch:
        prompts, answers, asked = [], [], []
        questions = round(size * self.config.yes_no_share)
        for k in range(size):
            i = rng.randrange(len(self.scenes))
            vision = {"pixel_values": self.pixels[i : i + 1]}
            if k >= questions:
                text = noisy_caption(self.scenes[i], rng, self.config.hallucination_rate)
                prompts.append(EncodedPrompt(self.caption_ids, vision))
            else:
                config = self.config
                question, text, _ = sample_training_yes_no(self.scenes[i], rng, config.colour_miss, config.shape_miss)
                obj = question.removeprefix("Is there a ").split(" in the image")[0]
                prompts.append(EncodedPrompt(self.question_ids[obj], vision))
                asked.append((k, self.object_position[obj], text == "yes"))
            answers.append([self.answer(text)])
        return SFTBatch(prompts, answers, asked)


def judge_probe(model: Any, processor: Any, held_out: list[Scene], per_kind: int = 100) -> dict[str, float]:
    """The yes/no judge's accuracy per kind of question (`world.question_kinds`) on held-out scenes.

    Asked through `YesNoJudge`, the labeler the RLAIF-V round's self-feedback uses (p(yes) > 0.5), so it
    measures what the round will get. `colour_miss` ("a red square?" over a red circle) is the kind a judge
    answering from colour alone gets wrong: it says whether colour and shape are bound. Seconds.
    """
    from rlaifv.reward.yes_no import YesNoJudge

    rng = random.Random(12345)
    asked: dict[str, list[tuple[Scene, str]]] = {}
    for scene in held_out:
        for kind, pool in question_kinds(scene).items():
            if pool and len(asked.setdefault(kind, [])) < per_kind:
                asked[kind].append((scene, rng.choice(pool)))
    judge = YesNoJudge(model, processor)
    was_training = model.training
    model.eval()
    accuracy = {}
    for kind, items in asked.items():
        p_yes = judge.p_yes_batch([([scene.render()], [yes_no_question(obj)]) for scene, obj in items])
        accuracy[kind] = sum((p[0] > 0.5) == (kind == "present") for p in p_yes) / len(items)
    model.train(was_training)
    return accuracy


def one_answer(accuracy: dict[str, float], margin: float = 0.02) -> bool:
    """Whether the judge gives (nearly) the same answer to every kind of question: the plateau before it reads
    the image. Its yes-rate is the accuracy on present objects and one minus it on absent ones."""
    yes = [accuracy[k] if k == "present" else 1.0 - accuracy[k] for k in accuracy]
    return all(y >= 1.0 - margin for y in yes) or all(y <= margin for y in yes)


class _ParamGroup(TypedDict):
    """An SFT optimizer group: its parameters and its share of the scheduled learning rate."""

    params: list[torch.nn.Parameter]
    scale: float


def sft(
    model: Any, data: SFTData, config: ReferenceConfig, pad_id: int, *, attempt: int = 0, probe: Any = None
) -> dict[str, Any]:
    """One SFT run: answer NLL, the vision tower at `tower_lr_scale` x the rate (0: frozen).

    With `probe` (the judge's accuracy per kind of question) and `plateau_check`,
    the run stops early when the judge still gives one answer to everything at
    that step: its exit from that plateau comes at a random step, and one that
    comes late leaves too little of the schedule to bind colour and shape.
    Attempt 0 draws batches exactly as recipe 3 did.
    """
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    groups: list[_ParamGroup] = [{"params": rest, "scale": 1.0}]
    if config.tower_lr_scale > 0:
        groups.append({"params": tower, "scale": config.tower_lr_scale})
    else:
        for p in tower:
            p.requires_grad_(False)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1) if config.presence_aux > 0 else None
    if head is not None:
        groups[0]["params"] = rest + list(head.parameters())
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.sft_lr, weight_decay=0.01)
    rng = random.Random(config.seed + 1 + 7919 * attempt)
    loss_value = float("nan")
    result: dict[str, Any] = {"attempt": attempt, "steps": config.sft_steps, "gave_up": False}
    model.train()
    desc = "reference SFT" if attempt == 0 else f"reference SFT (attempt {attempt + 1})"
    for step in (bar := tqdm(range(config.sft_steps), desc=desc, leave=False)):
        if probe is not None and step > 0 and step == config.plateau_check:
            result["judge_at_check"] = probe(model)
            if one_answer(result["judge_at_check"]):
                result.update(steps=step, gave_up=True)
                break
            model.train()
        for group in optimizer.param_groups:
            group["lr"] = config.sft_lr * group["scale"] * _cosine(step, config.sft_steps)
        batch = data.batch(rng, config.sft_batch)
        per_token = [t for group in answer_logprobs(model, batch.prompts, batch.answers, pad_id) for t in group]
        if config.loss_per == "answer":
            loss = -sum(t.mean() for t in per_token) / len(per_token)
        else:
            loss = -sum(t.sum() for t in per_token) / sum(t.numel() for t in per_token)
        if head is not None and batch.asked:
            loss = loss + config.presence_aux * presence_loss(model, head, batch, config.presence_layer)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    for p in tower:
        p.requires_grad_(True)
    if probe is not None and not result["gave_up"]:
        result["judge"] = probe(model)
    return result | {"final_loss": loss_value}


def sft_until_bound(
    make_model: Any, data: SFTData, config: ReferenceConfig, pad_id: int, probe: Any
) -> tuple[Any, dict[str, Any]]:
    """SFT runs until the judge answers every kind of question at `judge_target` (at most `sft_attempts`).

    The yes/no judge sits on a plateau of one answer while captions are learned
    and leaves it at a step that varies with seed, batch order and the CPU's
    floating point from ~200 to past the schedule (docs/shapes-world.md);
    longer SFT after the schedule did not fix a late exit (recipe 4). Runs are
    independent draws, so a few of them make the miss rare; the best judge is
    kept. `make_model(attempt)` gives a model with the pre-trained tower and a
    language model initialised for that attempt.
    """
    attempts = config.sft_attempts if config.judge_target > 0 else 1
    runs: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    for attempt in range(attempts):
        model = make_model(attempt)
        last = attempt == attempts - 1
        run_config = config if not last else replace(config, plateau_check=0)
        run = sft(model, data, run_config, pad_id, attempt=attempt, probe=probe)
        runs.append(run)
        if run["gave_up"]:
            continue
        score = min(run["judge"].values())
        if best is None or score > best[0]:
            best = (score, model)
        if score >= config.judge_target:
            break
    assert best is not None  # the last run never gives up
    chosen = next(r for r in runs if not r["gave_up"] and min(r["judge"].values()) == best[0])
    return best[1], {
        "sft_final_loss": chosen["final_loss"],
        "sft_runs": runs,
        "sft_chosen_attempt": chosen["attempt"],
        "judge_accuracy": chosen["judge"],
    }


def train_reference(folder: str | Path, config: ReferenceConfig | None = None) -> dict[str, Any]:
    """Build, pre-train and SFT the reference model; save it (safetensors + processor) to `folder`."""
    config = config or ReferenceConfig()
    torch.manual_seed(config.seed)
    spec = shapes_spec(config.seed, object_tokens=config.object_tokens, patch_size=config.patch_size)
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer).train()
    pool = scenes(config.seed, config.train_images)
    pixels = pixel_values(processor, [s.render() for s in pool])
    labels = torch.tensor([[float(o in s.names) for o in OBJECTS] for s in pool])
    patch_labels = (
        torch.tensor([s.patch_labels(spec.patch_size, config.patch_min_cover) for s in pool])
        if config.patch_labels
        else None
    )
    vision_acc = pretrain_vision(model, pixels, labels, config, patch_labels)
    data = SFTData(processor, pool, pixels, config)
    held_out = scenes(HELD_OUT_SEED_OFFSET + config.seed, 400)
    tower_state = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}

    def make_model(attempt: int) -> Any:
        if attempt == 0:
            return model
        fresh = build_model(replace(spec, seed=spec.seed + 7919 * attempt), processor.tokenizer)
        fresh.model.vision_tower.load_state_dict(tower_state)
        return fresh

    def probe(m: Any) -> dict[str, float]:
        return judge_probe(m, processor, held_out)

    chosen, result = sft_until_bound(make_model, data, config, processor.tokenizer.pad_token_id, probe)
    folder = Path(folder)
    chosen.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return {"vision_exact_match": vision_acc, **result}


__all__ = ["ReferenceConfig", "caption", "shapes_spec", "train_reference"]
