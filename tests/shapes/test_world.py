"""The shapes world's generator, captions and metrics (fast, no model)."""

import random

import pytest

from rlaifv.trainer.evaluation.chair import chair, yes_no
from rlaifv.trainer.shapes.world import (
    BACKGROUND,
    OBJECTS,
    caption,
    extract_objects,
    noisy_caption,
    sample_training_yes_no,
    sample_yes_no,
    scenes,
    yes_no_question,
)


def test_scenes_are_deterministic_and_valid():
    a, b = scenes(3, 50), scenes(3, 50)
    assert a == b
    assert scenes(4, 50) != a
    for scene in a:
        assert 1 <= len(scene.objects) <= 3
        assert len(set(scene.names)) == len(scene.names)
        assert [o.x for o in scene.objects] == sorted(o.x for o in scene.objects)
        assert set(scene.names) <= set(OBJECTS)
    assert a[0].render().tobytes() == b[0].render().tobytes()


def test_rendered_colours_match_ground_truth():
    scene = scenes(0, 1)[0]
    image = scene.render()
    from rlaifv.trainer.shapes.world import COLOURS

    for obj in scene.objects:
        assert image.getpixel((obj.x, obj.y + 2)) == COLOURS[obj.colour]


def test_captions_and_extraction_round_trip():
    names = ["red circle", "blue square", "green triangle"]
    text = caption(names)
    assert text == "a red circle, a blue square and a green triangle."
    assert extract_objects(text) == names
    assert caption(["red circle"]) == "a red circle."


def test_noisy_caption_inserts_exactly_one_absent_object():
    scene = scenes(1, 1)[0]
    rng = random.Random(0)
    noisy = noisy_caption(scene, rng, hallucination_rate=1.0)
    mentioned = extract_objects(noisy)
    assert len(mentioned) == len(scene.names) + 1
    assert len(set(mentioned) - set(scene.names)) == 1
    assert noisy_caption(scene, rng, hallucination_rate=0.0) == caption(scene.names)


def test_yes_no_questions_balance_and_near_misses():
    rng = random.Random(0)
    pool = scenes(2, 400)
    asked = [(s, *sample_yes_no(s, rng)) for s in pool]
    yes_share = sum(t for *_, t in asked) / len(asked)
    assert 0.4 < yes_share < 0.6
    for scene, question, answer, truth in asked:
        obj = question.removeprefix("Is there a ").split(" in the image")[0]
        assert (obj in scene.names) == truth == (answer == "yes")
        assert question == yes_no_question(obj)


def test_object_map_and_patch_labels_follow_the_rendered_pixels():
    for scene in scenes(4, 30):
        rgb, labels = scene.render().load(), scene.object_map().load()
        for y in range(0, 64, 3):
            for x in range(0, 64, 3):
                label = labels[x, y]
                assert (label == 0) == (rgb[x, y] == BACKGROUND)
                if label:
                    assert OBJECTS[label - 1] in scene.names
        patches = scene.patch_labels(8)
        assert len(patches) == 64
        assert {OBJECTS[p - 1] for p in patches if p} == set(scene.names)  # every object owns a patch
        coarse = scene.patch_labels(16, min_cover=0.15)  # recipe 6: 16 patches, objects preferred over background
        assert len(coarse) == 16
        assert {OBJECTS[p - 1] for p in coarse if p} == set(scene.names)


def test_large_patches_prefer_an_object_over_the_background_only_above_min_cover():
    from rlaifv.trainer.shapes.world import Placed, Scene

    scene = Scene((Placed("red", "square", 16, 16, 16),))  # pixels 8..24: a quarter of each of patches 0, 1, 4, 5
    red_square = 1 + OBJECTS.index("red square")
    majority = scene.patch_labels(16)
    assert majority[0] == 0  # background covers most of every patch: the object would own none
    assert scene.patch_labels(16, min_cover=0.15)[:6] == [red_square, red_square, 0, 0, red_square, red_square]
    assert set(scene.patch_labels(16, min_cover=0.5)) == {0}


def test_training_questions_are_mostly_same_colour_misses():
    rng = random.Random(1)
    pool = scenes(5, 600)
    asked = [(s, *sample_training_yes_no(s, rng, colour_miss=0.5, shape_miss=0.25)) for s in pool]
    misses = [(s, q) for s, q, _, truth in asked if not truth]
    assert 0.4 < len(misses) / len(asked) < 0.6
    same_colour = 0
    for scene, question in misses:
        obj = question.removeprefix("Is there a ").split(" in the image")[0]
        assert obj not in scene.names
        same_colour += any(obj.split()[0] == n.split()[0] for n in scene.names)
    assert same_colour / len(misses) > 0.45


def test_chair_definitions():
    truths = [{"red circle"}, {"blue square", "green circle"}, {"yellow triangle"}]
    answers = [
        "a red circle.",  # clean
        "a blue square, a red square and a blue square.",  # 1 hallucinated of 3 mentions, a repeat
        "a green star.",  # no object mention at all (star is not a shape here)
    ]
    report = chair(answers, truths, extract_objects)
    assert report.mentions == 4
    assert report.chair_i == pytest.approx(1 / 4)
    assert report.chair_s == pytest.approx(1 / 3)
    assert report.recall == pytest.approx(2 / 4)
    assert report.repeats == pytest.approx(1 / 3)


def test_yes_no_metrics():
    report = yes_no([True, True, False, False, True], [True, False, False, True, True])
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.precision == pytest.approx(2 / 3)
    assert report.recall == pytest.approx(2 / 3)
    assert report.f1 == pytest.approx(2 / 3)


def test_judge_probe_scores_a_judge_that_always_says_no() -> None:
    """The probe asks every kind of question; a model that always answers "no" is right on misses only."""
    import torch

    from rlaifv.trainer.shapes.reference import judge_probe, shapes_spec
    from rlaifv.trainer.shapes.tiny_vlm import build_model, build_processor

    spec = shapes_spec(0)
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer)
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[processor.tokenizer.convert_tokens_to_ids("no")] = 50.0
    with torch.no_grad():
        head.weight.zero_()
    head.bias = torch.nn.Parameter(bias)
    accuracy = judge_probe(model, processor, scenes(4, 60), per_kind=10)
    assert accuracy == {"present": 0.0, "colour_miss": 1.0, "shape_miss": 1.0, "other_miss": 1.0}


def test_question_kinds_split_the_absent_objects() -> None:
    from rlaifv.trainer.shapes.world import OBJECTS, Placed, Scene, question_kinds

    scene = Scene((Placed("red", "circle", 20, 20, 16), Placed("blue", "square", 44, 44, 16)))
    kinds = question_kinds(scene)
    assert kinds["present"] == ["red circle", "blue square"]
    assert set(kinds["colour_miss"]) == {"red square", "red triangle", "blue circle", "blue triangle"}
    assert set(kinds["shape_miss"]) == {"green circle", "yellow circle", "green square", "yellow square"}
    assert set(kinds["other_miss"]) == {"green triangle", "yellow triangle"}
    assert sorted(obj for pool in kinds.values() for obj in pool) == sorted(OBJECTS)


def test_reference_config_refuses_an_unknown_loss() -> None:
    from rlaifv.trainer.shapes.reference import ReferenceConfig

    with pytest.raises(ValueError, match="loss_per"):
        ReferenceConfig(loss_per="sentence")  # type: ignore[arg-type]


def test_a_setting_added_later_changes_the_fingerprint_only_when_active() -> None:
    from rlaifv.trainer.shapes.pipeline import demo_config

    base = demo_config(seed=2).fingerprint()
    assert demo_config(seed=2, overrides=["reference.loss_per=token"]).fingerprint() == base  # the neutral value
    assert demo_config(seed=2, overrides=["reference.loss_per=answer"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["reference.sft_attempts=5"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["reference.judge_target=0.0"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["reference.object_tokens=false"]).fingerprint() == base
    assert demo_config(seed=2, overrides=["reference.presence_aux=0.0"]).fingerprint() == base
    assert demo_config(seed=2, overrides=["reference.object_tokens=true"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["reference.presence_aux=1.0"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["feedback_temperature=1.0"]).fingerprint() == base
    assert demo_config(seed=2, overrides=["feedback_temperature=0.7"]).fingerprint() != base
    assert demo_config(seed=2, overrides=["length_drop=random"]).fingerprint() == base  # recipe 8's default
    assert demo_config(seed=2, overrides=["length_drop=ratio"]).fingerprint() != base
    assert demo_config(seed=3).fingerprint() != base


def test_object_tokens_make_each_object_name_one_token_that_decodes_back() -> None:
    from rlaifv.trainer.shapes.tiny_vlm import build_tokenizer
    from rlaifv.trainer.shapes.world import OBJECTS, vocabulary

    tokenizer = build_tokenizer(vocabulary(), OBJECTS)
    text = "a red circle, a blue square and a green triangle. Red circle? red, circle."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    for obj in OBJECTS:
        assert len(tokenizer(" " + obj, add_special_tokens=False).input_ids) == 1
    assert len(tokenizer(" red, circle", add_special_tokens=False).input_ids) == 3  # not an object name


@pytest.mark.parametrize("object_tokens", [False, True])
def test_presence_loss_reads_the_question_object_and_trains_the_lookup(object_tokens: bool) -> None:
    """The probe reads the hidden state at the asked object's last token and sends a gradient into the decoder."""
    import random

    import torch

    from rlaifv.trainer.shapes.reference import ReferenceConfig, SFTData, pixel_values, presence_loss, shapes_spec
    from rlaifv.trainer.shapes.tiny_vlm import build_model, build_processor

    spec = shapes_spec(0, object_tokens=object_tokens)
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer)
    pool = scenes(5, 8)
    data = SFTData(processor, pool, pixel_values(processor, [s.render() for s in pool]), ReferenceConfig())
    batch = data.batch(random.Random(0), 12)
    assert batch.asked and all(
        batch.prompts[i].input_ids.shape == batch.prompts[0].input_ids.shape for i, _, _ in batch.asked
    )
    tokenizer = processor.tokenizer
    for index, position, present in batch.asked:
        ids = batch.prompts[index].input_ids.tolist()
        question = tokenizer.decode(ids[: position + 1]).split("Is there a ")[-1]
        answer = tokenizer.decode(batch.answers[index][0][:-1])
        assert question.split()[-1] in ("circle", "square", "triangle")
        assert answer == ("yes" if present else "no")
    head = torch.nn.Linear(spec.text_hidden, 1)
    loss = presence_loss(model, head, batch, layer=1)
    loss.backward()
    assert loss.item() > 0
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.grad is None  # layer 1's output only


def test_well_formed_captions_are_the_worlds_own_caption_of_their_objects() -> None:
    from rlaifv.trainer.shapes.world import caption, well_formed

    assert well_formed(caption(["red square", "red square", "blue circle"]))  # a repeat is still grammatical
    assert well_formed("a green triangle.")
    for odd in (
        "a red square and a red green circle.",
        "a green, a green square and a blue triangle.",
        "a red circle, a red circle and a blue Is a blue triangle.",
        "a red square and a blue circle",
        "",
    ):
        assert not well_formed(odd), odd


def test_the_report_table_names_the_evaluations_own_n(shapes_bundle) -> None:
    """The cost line said "sampling 8 captions" whatever --n was."""
    import json

    from rlaifv.trainer.shapes.report import render_markdown

    report = json.loads((shapes_bundle / "report.json").read_text()) | {"n": 2}
    text = render_markdown(report)
    assert "N=2," in text and "sampling 2 captions" in text
