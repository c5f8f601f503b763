"""Every supported model family gives exact log-probs through the shared-prefix engine.

Tiny random-weight models of each family, built offline from the family's own
config and processor classes (`rlaifv.testing.tiny_families`), loaded through
the same `load_model` / `load_processor` path as a real checkpoint. The ground
truth is a plain `model(**inputs)` over prompt + answer, where the model
computes its own positions (`full_forward_logprobs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.families import FAMILIES as RULES
from rlaifv.reward.families import (
    SEQUENCE_KEYS,
    as_sequence,
    batch_groups,
    extended,
    family_of,
    module_part,
    rope_module,
)
from rlaifv.reward.logprobs import answer_logprobs, continuation_logits, full_forward_logprobs
from rlaifv.reward.models import has_torchvision, load_model, load_processor
from rlaifv.reward.prompt import EncodedPrompt, encode_answer, encode_prompt, end_of_turn_id
from rlaifv.reward.sampling import SamplingParams, sample_answers
from rlaifv.testing.tiny_families import FAMILIES, build_tiny_family

TOLERANCE = 1e-4
QUESTION = "Describe the image."
NEEDS_TORCHVISION = ("mistral3",)  # transformers' Pixtral processor module imports torchvision
SERVED = [name for name in FAMILIES if has_torchvision() or name not in NEEDS_TORCHVISION]


def _images() -> list[list[Image.Image]]:
    """One square image, one wide image, two images: different crop, patch and token counts in one batch."""
    return [
        [Image.new("RGB", (48, 48), (200, 30, 30))],
        [Image.new("RGB", (96, 40), (30, 180, 60))],
        [Image.new("RGB", (48, 48), (30, 60, 200)), Image.new("RGB", (56, 56), (220, 200, 30))],
    ]


@pytest.fixture(scope="module", params=SERVED)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param))
    model = load_model(folder, device="cpu")
    processor = load_processor(folder)
    prompts = [encode_prompt(processor, images, QUESTION) for images in _images()]
    tokenizer = processor.tokenizer
    eot = end_of_turn_id(tokenizer)
    answers = [[encode_answer(tokenizer, text, eot_id=eot) for text in ("a red circle.", "two dogs")] for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "name": request.param,
        "folder": folder,
        "model": model,
        "processor": processor,
        "prompts": prompts,
        "answers": answers,
        "eot": eot,
        "pad": pad,
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_prompts_are_what_the_processors_own_chat_template_path_gives(family: dict[str, Any]) -> None:
    """The ground truth of the other tests shares `encode_prompt`; this one does not. Two images went to the
    processor as a flat list, which LLaVA-OneVision reads as two one-image samples (each tiled: 202 tokens, not
    the 60 of its multi-image mode; rewards off by as much as the rewards themselves)."""
    processor = family["processor"]
    if getattr(processor, "accepts_images", True) is False:
        pytest.skip("a text-only processor")
    for images, prompt in zip(_images(), family["prompts"], strict=True):
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": QUESTION}]
        try:
            own = processor.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
        except (TypeError, ValueError, KeyError) as exc:  # a template or processor without the one-call path
            pytest.skip(f"{family['name']}: no apply_chat_template(tokenize=True) with images: {exc}")
        assert own["input_ids"][0].tolist() == prompt.input_ids.tolist(), family["name"]
        for key, value in prompt.vision.items():
            if isinstance(value, torch.Tensor) and key in own:
                assert torch.equal(torch.as_tensor(own[key]), value), (family["name"], key)


def test_every_token_left_to_sample_is_text_its_answer_shows(family: dict[str, Any]) -> None:
    """Only the declared special tokens were kept from sampling: Idefics2's `<image>` placeholder was sampled
    (an answer no plain forward could score) and Idefics3's `<row_1_col_1>` layout tokens were, which the text
    drops (rescored from its text, the answer got another reward)."""
    from rlaifv.reward.prompt import markup_ids

    processor = family["processor"]
    tokenizer = processor.tokenizer
    blocked = markup_ids(processor) - {family["eot"]}
    image_id = getattr(processor, "image_token_id", None)
    if isinstance(image_id, int):
        assert image_id in blocked, family["name"]
    added = [i for i in tokenizer.added_tokens_decoder if i not in blocked and i != family["eot"]]
    dropped = [i for i in added if not tokenizer.decode([i], skip_special_tokens=True)]
    assert not dropped, (family["name"], tokenizer.convert_ids_to_tokens(dropped[:10]))


def test_the_family_is_registered_with_its_rules(family: dict[str, Any]) -> None:
    rules = family_of(family["model"])
    assert rules == RULES[family["name"]]
    assert rules.mrope == (rope_module(family["model"]) is not None), rules  # mrope: the model has get_rope_index


@torch.no_grad()
def test_shared_prefix_batch_equals_a_plain_forward(family: dict[str, Any]) -> None:
    model, prompts, answers = family["model"], family["prompts"], family["answers"]
    batched = answer_logprobs(model, prompts, answers, family["pad"])
    worst = 0.0
    for b, prompt in enumerate(prompts):
        alone = answer_logprobs(model, [prompt], [answers[b]], family["pad"])[0]
        for i, answer in enumerate(answers[b]):
            truth = full_forward_logprobs(model, prompt, answer)
            worst = max(worst, _max_diff(batched[b][i], truth), _max_diff(alone[i], truth))
    print(f"{family['name']}: max abs log-prob difference {worst:.1e}")  # pytest -s -k shared_prefix: the table
    assert worst < TOLERANCE, f"{family['name']}: max abs log-prob difference {worst:.2e}"


@torch.no_grad()
def test_sampled_logprobs_equal_teacher_forcing_and_do_not_depend_on_the_batch(family: dict[str, Any]) -> None:
    model, prompts, tokenizer = family["model"], family["prompts"], family["processor"].tokenizer
    # Special tokens other than the end of turn are banned from the draws: an answer holding an image placeholder
    # has no teacher-forcing truth (a full forward reads it as an image slot); a random tiny model draws them.
    banned = {i: -100.0 for i in tokenizer.all_special_ids if i != family["eot"]}
    params = [SamplingParams(seed=7 + b, max_tokens=6, logit_bias=banned) for b in range(len(prompts))]
    kwargs = {"stop_ids": [family["eot"]], "pad_id": family["pad"]}
    batched = sample_answers(model, prompts, [2] * len(prompts), params, **kwargs)
    for b, prompt in enumerate(prompts):
        alone = sample_answers(model, [prompt], [2], [params[b]], **kwargs)[0]
        assert [s.token_ids for s in alone] == [s.token_ids for s in batched[b]]
        for sample in batched[b]:
            truth = full_forward_logprobs(model, prompt, sample.token_ids)
            assert _max_diff(sample.logprobs, truth) < TOLERANCE


@torch.no_grad()
def test_continuations_share_the_prefix_exactly(family: dict[str, Any]) -> None:
    """The yes/no judge's path: next-token logits after prompt ++ continuation."""
    model, prompts, answers = family["model"], family["prompts"], family["answers"]
    logits = continuation_logits(model, prompts, answers, family["pad"])
    probe = family["eot"]
    for b, prompt in enumerate(prompts):
        for i, answer in enumerate(answers[b]):
            truth = full_forward_logprobs(model, _followed_by(model, prompt, answer), [probe])
            predicted = torch.log_softmax(logits[b][i], -1)[probe]
            assert abs(float(predicted) - float(truth[0])) < TOLERANCE


def _followed_by(model: Any, prompt: EncodedPrompt, tokens: list[int]) -> EncodedPrompt:
    """The prompt with `tokens` of text after it, its sequence-aligned inputs extended as the family's rules say."""
    continued = family_of(model).continued
    vision = {
        key: extended(as_sequence(value), len(tokens), key in continued) if key in SEQUENCE_KEYS else value
        for key, value in prompt.vision.items()
    }
    return EncodedPrompt(torch.cat([prompt.input_ids, torch.tensor(tokens)]), vision)


def test_prompts_of_different_image_shapes_batch_or_group(family: dict[str, Any]) -> None:
    """Families that read real extents from sizes or masks pad; others split into groups of equal shapes."""
    groups = batch_groups(family["prompts"], family_of(family["model"]))
    if family_of(family["model"]).pad_vision:
        assert groups == [[0, 1, 2]]
    assert sorted(i for g in groups for i in g) == [0, 1, 2]


@pytest.mark.parametrize("size", [(20, 1), (1, 20), (1, 1), (3, 40), (40, 3)])
def test_a_thin_image_is_encoded_or_refused_as_an_image_error(family: dict[str, Any], size: tuple[int, int]) -> None:
    """Images a pixel or three thin pass the service's checks; a processor that cannot take one (Idefics2 divides by
    zero on 1 px high) is the request's image error naming it, not a server fault."""
    from rlaifv.reward.errors import ImageError

    image = Image.new("RGB", size, (200, 30, 30))
    try:
        encode_prompt(family["processor"], [image], QUESTION)
    except ImageError as exc:
        assert exc.param == "images[0]" and f"{size[0]}x{size[1]} px" in exc.message
        assert family["name"] != "idefics2" or size[1] == 1, exc.message
    else:
        assert family["name"] != "idefics2" or size[1] != 1
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}]
    if family["name"] == "idefics2" and size == (20, 1):
        with pytest.raises(ImageError) as info:
            encode_prompt(family["processor"], [image], messages=messages)
        assert info.value.param == "messages[0].content[1]"


def test_the_processor_loads_from_the_saved_folder(family: dict[str, Any]) -> None:
    processor = load_processor(Path(family["folder"]))
    again = encode_prompt(processor, _images()[1], QUESTION)
    assert torch.equal(again.input_ids, family["prompts"][1].input_ids)


TEXT_MODEL_PARTS = ("language_model", "text_model", "lm_head")


def test_the_image_encoder_and_projector_paths_cover_every_non_text_parameter(family: dict[str, Any]) -> None:
    """The trainer freezes by these paths: a family whose encoder were named otherwise would train it."""
    rules = family_of(family["model"])
    parts: dict[str | None, list[str]] = {"vision": [], "projector": [], None: []}
    for name, _ in family["model"].named_parameters():
        parts[module_part(rules, name)].append(name)
    assert parts["vision"] and parts["projector"], {k: v[:3] for k, v in parts.items()}
    assert all(any(p in name for p in TEXT_MODEL_PARTS) for name in parts[None]), parts[None]


def test_full_fine_tuning_freezes_the_family_encoder_and_trains_its_projector(family: dict[str, Any]) -> None:
    from rlaifv.trainer.dpo import _trainable_parameters
    from rlaifv.trainer.dpo_config import DPOConfig

    model, rules = family["model"], family_of(family["model"])
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        _trainable_parameters(model, DPOConfig(freeze_vision=True, freeze_projector=False))
        for name, param in model.named_parameters():
            assert param.requires_grad == (module_part(rules, name) != "vision"), name
        _trainable_parameters(model, DPOConfig(freeze_vision=True, freeze_projector=True))
        assert all(p.requires_grad == (module_part(rules, n) is None) for n, p in model.named_parameters())
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(before[name])


@pytest.mark.skipif(has_torchvision(), reason="torchvision is installed: the family is served and tested above")
@pytest.mark.parametrize("name", NEEDS_TORCHVISION)
def test_a_family_whose_processor_needs_torchvision_is_refused_naming_the_fix(name: str, tmp_path: Path) -> None:
    folder = build_tiny_family(name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="install the torchvision release built for torch"):
        load_processor(folder)


@torch.no_grad()
def test_a_lora_policy_and_its_base_as_reference_are_exact(family: dict[str, Any], tmp_path: Path) -> None:
    """A LoRA pair: the adapter on gives the policy, off the reference; both through the shared-prefix path."""
    from rlaifv.reward.models import load_adapter
    from rlaifv.trainer.shapes.tiny_vlm import random_lora

    adapter = random_lora(family["folder"], tmp_path / "adapter")
    policy = load_adapter(load_model(family["folder"], device="cpu"), adapter)
    prompts, answers = family["prompts"], family["answers"]
    with_adapter = answer_logprobs(policy, prompts, answers, family["pad"])
    with policy.disable_adapter():
        without = answer_logprobs(policy, prompts, answers, family["pad"])
    moved = 0.0
    for b, prompt in enumerate(prompts):
        for i, answer in enumerate(answers[b]):
            assert _max_diff(with_adapter[b][i], full_forward_logprobs(policy, prompt, answer)) < TOLERANCE
            base = full_forward_logprobs(family["model"], prompt, answer)
            assert _max_diff(without[b][i], base) < TOLERANCE
            moved = max(moved, _max_diff(with_adapter[b][i], base))
    assert moved > 1e-3, "the adapter must change the policy"


@torch.no_grad()
def test_the_yes_no_judge_equals_a_plain_forward_of_each_question(family: dict[str, Any]) -> None:
    """The claims reward's labeler: one shared image prefix, the questions as continuations (the prefix is cut
    with its sequence-aligned inputs, e.g. Qwen2-VL's mm_token_type_ids and Gemma3's token_type_ids)."""
    from rlaifv.reward.yes_no import YesNoJudge

    judge = YesNoJudge(family["model"], family["processor"])
    questions = ["Is there a red circle in the image?", "Are there two dogs?"]
    items = [(images, questions) for images in _images()]
    got = judge.p_yes_batch(items)
    ids = judge.yes_ids + judge.no_ids
    for (images, _), scores in zip(items, got, strict=True):
        for question, score in zip(questions, scores, strict=True):
            prompt = encode_prompt(family["processor"], images, question)
            logprobs = torch.stack([full_forward_logprobs(family["model"], prompt, [i])[0] for i in ids])
            probs = logprobs.exp()
            truth = float(probs[: len(judge.yes_ids)].sum() / probs.sum())
            assert abs(score - truth) < TOLERANCE, (family["name"], question, score, truth)


def test_a_freeze_that_finds_no_encoder_is_refused_naming_the_setting() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlaifv.trainer.dpo import _trainable_parameters
    from rlaifv.trainer.dpo_config import DPOConfig
    from rlaifv.trainer.errors import ConfigError

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(ConfigError, match="freeze_vision is set but model type 'llama' has no parameters under"):
        _trainable_parameters(model, DPOConfig(freeze_vision=True))
    _trainable_parameters(model, DPOConfig(freeze_vision=False))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("name", "closer"), [("qwen2_vl", "<|im_end|>"), ("gemma3", "<end_of_turn>"), ("llava", None)])
def test_an_answer_ends_with_what_the_chat_template_ends_a_turn_with(name: str, closer: str | None, tmp_path) -> None:
    """Gemma-3-it's EOS is `<eos>` while its turns end with `<end_of_turn>`: given answers were closed with EOS,
    so the same text scored otherwise given than sampled (sampling stops at either). The template decides; EOS
    only where it writes no special token after an assistant message (LLaVA-1.5's template here)."""
    processor = load_processor(build_tiny_family(name, tmp_path / name))
    tokenizer = processor.tokenizer
    others = [t for t in map(tokenizer.convert_ids_to_tokens, tokenizer.all_special_ids) if t not in (closer, "<unk>")]
    tokenizer.eos_token = others[0]  # an EOS that is not the turn's end, as Gemma-3-it's
    expected = closer if closer is not None else tokenizer.eos_token
    assert end_of_turn_id(tokenizer, processor=processor) == tokenizer.convert_tokens_to_ids(expected)
    assert end_of_turn_id(tokenizer, tokenizer.eos_token, processor) == tokenizer.eos_token_id  # the bundle's own


def test_a_template_for_string_content_still_names_its_turn_end(tmp_path) -> None:
    """A text model's template that prints `content` as it is rendered parts as a Python list after the answer,
    so the turn's end was not found and EOS taken: plain string content is tried too."""
    from rlaifv.reward.prompt import template_end_of_turn
    from rlaifv.testing.tiny_text import build_text_model

    processor = load_processor(build_text_model(tmp_path / "text"))
    tokenizer = processor.tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    tokenizer.eos_token = "<|im_start|>"
    assert template_end_of_turn(processor) == "<|im_end|>"
