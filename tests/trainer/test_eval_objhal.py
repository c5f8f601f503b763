"""Object HalBench on COCO-format fixtures: CHAIR computed by hand must match exactly.

Fixture (tests/trainer/data/eval, the official COCO 2014 layouts):
- image 101: instances person, person, dog; captions add frisbee      -> {person, dog, frisbee}
- image 102: instances pizza, dining table, cup; captions add knife    -> {pizza, dining table, cup, knife}
- image 103: instances cat, couch ("orange cat": orange is a colour)   -> {cat, couch}
- image 104: instances train                                           -> {train}
Answers (objhal_answers.jsonl), mentions by hand:
1 (101) man->person, dog, man->person, frisbee, cat, bench    6 mentions, cat and bench hallucinated
2 (102) pizza, dining table, cup, fork, knife                 5 mentions, fork hallucinated
3 (103) cat, couch ("orange cat": a colour)                   2 mentions, none hallucinated
4 (104) "train tracks", "bus stop" name no objects            0 mentions
5 (104) "passenger train"->train, car, "baby elephant"->elephant  3 mentions, car and elephant hallucinated
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_server import ChatServer, Reply
from eval_images import b64, good_png, png_declaring, truncated_jpeg
from typer.testing import CliRunner

from rlaifv.cli.eval_run import Source
from rlaifv.cli.main import app
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.candidates import Prompt, Sampled, Sampling, image_bytes
from rlaifv.trainer.evaluation.chair import chair, chair_items, chair_totals
from rlaifv.trainer.evaluation.coco_objects import CocoObjects, read_table
from rlaifv.trainer.evaluation.coco_truth import find_annotation_files, ground_truth
from rlaifv.trainer.evaluation.llm import ChatSettings
from rlaifv.trainer.evaluation.llm_objects import LLMObjectExtractor, parse_object_list
from rlaifv.trainer.evaluation.objhal import Answer, evaluate_objhal, read_answers, read_prompts

DATA = Path(__file__).parent / "data" / "eval"
COCO = DATA / "coco"

# By hand, from the module docstring.
MENTIONS = 6 + 5 + 2 + 0 + 3
HALLUCINATED = 2 + 1 + 0 + 0 + 2
EXPECTED = {
    "chair_i": 5 / 16,
    "chair_s": 3 / 5,  # answers 1, 2 and 5 hallucinate, of 5 answers
    "chair_s_object_answers": 3 / 4,  # of the 4 answers that mention a COCO object
    "recall": 10 / 11,  # found 3 + 4 + 2 + 0 + 1 of 3 + 4 + 2 + 1 + 1 true objects
    "repeats": 1 / 5,  # answer 1 names a person twice
    "answers": 5,
    "answers_with_objects": 4,
    "mentions": 16,
    "hallucinated_mentions": 5,
}


@pytest.fixture(scope="module")
def objects() -> CocoObjects:
    return CocoObjects()


@pytest.fixture(scope="module")
def truth(objects: CocoObjects) -> dict[int, frozenset[str]]:
    instances, captions = find_annotation_files(COCO)
    return ground_truth([101, 102, 103, 104], instances, captions, objects)


def test_ground_truth_is_instances_plus_caption_objects(truth: dict[int, frozenset[str]]) -> None:
    assert truth == {
        101: {"person", "dog", "frisbee"},
        102: {"pizza", "dining table", "cup", "knife"},
        103: {"cat", "couch"},
        104: {"train"},
    }


def test_unknown_image_ids_are_refused(objects: CocoObjects) -> None:
    instances, captions = find_annotation_files(COCO)
    with pytest.raises(DataError, match="999"):
        ground_truth([101, 999], instances, captions, objects)


def test_chair_matches_the_hand_count(objects: CocoObjects, truth: dict[int, frozenset[str]]) -> None:
    answers = read_answers(DATA / "objhal_answers.jsonl")
    assert answers[0].answer.startswith("A man")  # "Assistant:" removed, as the original does
    report = evaluate_objhal(answers, truth, objects=objects)
    metrics = report["metrics"]
    assert {k: metrics[k] for k in EXPECTED} == EXPECTED
    assert [item["hallucinated"] for item in report["items"]] == [
        ["cat", "bench"],
        ["fork"],
        [],
        [],
        ["car", "elephant"],
    ]
    assert report["items"][0]["mentions"] == ["person", "dog", "person", "frisbee", "cat", "bench"]


def test_answers_of_three_words_name_no_objects(objects: CocoObjects, truth: dict[int, frozenset[str]]) -> None:
    answers = [Answer(image_id=101, answer="A cat, dog."), Answer(image_id=101, answer="A cat and dog.")]
    items = evaluate_objhal(answers, truth, objects=objects)["items"]
    assert [item["mentions"] for item in items] == [[], ["cat", "dog"]]


def test_shapes_world_chair_uses_the_same_counts() -> None:
    """`chair` (the shapes world's view) and `chair_totals` are one computation."""
    answers = ["a red circle and a red circle.", "a blue square.", "nothing here."]
    truths = [{"red circle"}, {"green square"}, {"red circle"}]

    def extract(text: str) -> list[str]:
        words = text.replace(".", "").split()
        return [f"{a} {b}" for a, b in itertools.pairwise(words) if b in ("circle", "square")]

    report = chair(answers, truths, extract)
    totals = chair_totals(chair_items(answers, truths, extract))
    assert report.chair_i == totals["chair_i"] == 1 / 3
    assert report.chair_s == totals["chair_s"] == 1 / 3
    assert totals["chair_s_object_answers"] == 1 / 2
    assert report.recall == totals["recall"] == 1 / 3
    assert report.repeats == 1 / 3


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("An orange cat next to an orange.", ["cat", "orange"]),
        ("An orange and white cat.", ["cat"]),
        ("A baseball player swings a baseball bat.", ["person", "baseball bat"]),
        ("He caught the baseball.", ["sports ball"]),
        ("People skiing down a ski slope.", ["person"]),
        ("The cooked food and a trained dog.", ["dog"]),
        ("Two knives, three geese and the children.", ["knife", "bird", "person"]),
        ("A hot-dog and a teddy bear.", ["hot dog", "teddy bear"]),
        ("A toilet seat near the bus station.", ["toilet"]),
        ("The baby is asleep.", ["person"]),
        # a missing space after a full stop: the tokenizer splits at the capital, lowercasing first hid it
        ("There is a dog.There is a cat.", ["dog", "cat"]),
        ("A TV. A DOG ON A BED.", ["tv", "dog", "bed"]),
    ],
)
def test_rule_extractor(objects: CocoObjects, text: str, mentions: list[str]) -> None:
    assert objects(text) == mentions


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        # before a verb, a modifier word is the object itself
        ("An orange sits on the table.", ["orange", "dining table"]),
        ("A baby sleeps in a crib.", ["person"]),
        ("Oranges fill the bowl.", ["orange", "bowl"]),
        ("The football lies on the grass.", ["sports ball"]),
        ("The skis lean against the wall.", ["skis"]),
        ("A passenger waits for the train.", ["person", "train"]),
        ("The orange sat on a plate.", ["orange"]),
        # before a noun, it is not (COCO names and other nouns alike)
        ("A glass of orange juice.", []),
        ("A man in a baseball cap.", ["person"]),
        ("A baby elephant and a baby stroller.", ["elephant"]),
        ("The passenger seat of the car.", ["car"]),
        ("Skiers on the ski slope.", ["person"]),
    ],
)
def test_a_modifier_is_one_only_before_a_noun(objects: CocoObjects, text: str, mentions: list[str]) -> None:
    assert objects(text) == mentions


def test_reference_captions_are_read_by_the_same_rule(tmp_path: Path, objects: CocoObjects) -> None:
    """An object a caption names before a verb is ground truth, so an answer naming it is no hallucination."""
    instances, captions = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    instances.write_text(json.dumps({"categories": [{"id": 67, "name": "dining table"}], "annotations": []}))
    lines = ["An orange sits on the table.", "A baby sleeps nearby.", "The football lies on the floor."]
    captions.write_text(json.dumps({"annotations": [{"image_id": 201, "caption": c} for c in lines]}))
    truth = ground_truth([201], [instances], [captions], objects)
    assert truth == {201: {"dining table", "orange", "person", "sports ball"}}


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("A rowing crew on the river.", []),  # lookup lemma: crow -> bird
        ("A calf was born here; the film bore me.", ["cow"]),  # bear
        ("A man pays his taxes.", ["person"]),  # taxis -> car
        ("The boat sank, and the ship has sunk.", ["boat", "boat"]),  # sink
        ("Two SUVs, limos, firetrucks and tugboats.", ["car", "car", "truck", "boat"]),
        ("Jetliners, iPhones, loveseats and paddleboards.", ["airplane", "cell phone", "couch", "surfboard"]),
        ("Two labradors in bowties.", ["dog", "tie"]),
        ("Knives, geese, mice, buses and ponies.", ["knife", "bird", "mouse", "bus", "horse"]),
    ],
)
def test_lemmas_are_only_a_nouns_singular(objects: CocoObjects, text: str, mentions: list[str]) -> None:
    assert objects(text) == mentions


def test_synonym_table_names_the_80_coco_categories() -> None:
    table = read_table()
    assert len(table.categories) == 80
    categories = json.loads((COCO / "instances_val2014.json").read_text())["categories"]
    assert {c["name"] for c in categories} <= set(table.categories)


def test_synonym_table_refuses_a_word_of_two_categories(tmp_path: Path) -> None:
    bad = tmp_path / "table.txt"
    bad.write_text("dog: puppy\ncat: puppy\n")
    with pytest.raises(DataError, match="puppy"):
        read_table(bad)


def test_listed_objects_map_by_their_head(objects: CocoObjects) -> None:
    listed = ["red car", "cars", "cup of coffee", "dog leash", "man", "woman", "train tracks", "tennis rackets"]
    assert objects.listed(listed) == ["car", "cup", "person", "person", "tennis racket"]


def test_parse_object_list() -> None:
    assert parse_object_list('Here:\n```json\n["dog", "ball"]\n```') == ["dog", "ball"]
    assert parse_object_list('Objects:\n["dog"]') == ["dog"]
    assert parse_object_list("[]") == []
    assert parse_object_list("I see a dog.") is None


def test_llm_extractor_against_a_real_chat_server(
    tmp_path: Path, objects: CocoObjects, truth: dict[int, frozenset[str]]
) -> None:
    """Listed objects become mentions; <= 3 words need no call; a reply that never parses fails and is counted."""

    def reply(prompt: str) -> Reply:
        if "cat watches" in prompt:
            return Reply('```json\n["man", "dog", "red frisbee", "cat"]\n```')
        if "A pizza sits" in prompt:
            return Reply("I would rather not.")  # never a list: retried, then failed
        return Reply('["train", "car"]')

    answers = read_answers(DATA / "objhal_answers.jsonl")
    answers[2] = answers[2].model_copy(update={"answer": "A cat."})  # three words: no call, no objects
    settings = ChatSettings(url="", model="lister", retries=1, backoff_s=0, timeout_s=10)
    with ChatServer(reply) as server:
        llm = LLMObjectExtractor(
            settings.model_copy(update={"url": server.url}), objects, store=tmp_path / "objects.jsonl", progress=False
        )
        report = evaluate_objhal(answers, truth, objects=objects, llm=llm)
        assert not any("A cat." in p for p in server.hits)
        assert sum(1 for p in server.hits if "pizza" in p) == 1 and max(server.hits.values()) == 2
        again = evaluate_objhal(answers, truth, objects=objects, llm=llm)  # listed answers come from the store
        assert sum(server.hits.values()) == 5 + 2  # 5 calls, then only the failed answer again (twice)
    metrics = report["metrics"]
    assert metrics["extraction_failed"] == 1
    # kept: 1 [person, dog, frisbee, cat], 3 [], 4 [train, car], 5 [train, car]
    assert metrics["mentions"] == 8 and metrics["hallucinated_mentions"] == 1 + 1 + 1
    assert metrics["chair_s_object_answers"] == 3 / 3
    assert report["items"][1]["extraction"]["status"] == "failed"
    assert report["items"][1]["extraction"]["replies"] == ["I would rather not."] * 2
    assert again["metrics"] == metrics


def test_cli_scores_an_answers_file(tmp_path: Path) -> None:
    out = tmp_path / "objhal.json"
    result = CliRunner().invoke(
        app, ["eval", "objhal", "--coco", str(COCO), "--answers", str(DATA / "objhal_answers.jsonl"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["benchmark"] == "objhal"
    assert {k: report["metrics"][k] for k in EXPECTED} == EXPECTED
    assert "| chair_i | 0.3125 |" in out.with_suffix(".md").read_text()


def test_nothing_to_divide_by_is_none_not_zero(objects: CocoObjects, truth: dict[int, frozenset[str]]) -> None:
    """Answers of three words or fewer name no object: CHAIR is n/a, not 0.0 (which reads as perfect)."""
    answers = [Answer(image_id=101, answer="Yes."), Answer(image_id=102, answer="A dog, maybe.")]
    m = evaluate_objhal(answers, truth, objects=objects)["metrics"]
    assert (m["chair_i"], m["chair_s"], m["chair_s_object_answers"]) == (None, None, None)
    assert (m["answers"], m["mentions"], m["recall"]) == (2, 0, 0.0)
    empty = chair_totals([])
    assert all(empty[k] is None for k in ("chair_i", "chair_s", "chair_s_object_answers", "recall", "repeats"))


def test_cli_refuses_an_empty_answers_file_and_reports_short_answers_as_na(tmp_path: Path) -> None:
    answers, out = tmp_path / "answers.json", tmp_path / "r.json"
    answers.write_text("[]")
    args = ["eval", "objhal", "--coco", str(COCO), "--answers", str(answers), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "error: " in result.output and "no rows" in result.output
    assert not out.exists()
    answers.write_text('[{"image_id": 101, "answer": "Yes."}]')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: no answer names a COCO object" in result.output
    assert "| chair_i | n/a |" in out.with_suffix(".md").read_text()


def test_cli_says_why_the_extractor_failed(tmp_path: Path) -> None:
    """Every LLM call fails: the console names the first error, not only "rerun"; a URL httpx cannot call is
    refused before anything runs."""
    args = ["eval", "objhal", "--coco", str(COCO), "--answers", str(DATA / "objhal_answers.jsonl")]
    args += ["--extractor", "llm", "--llm-model", "m", "--llm-retries", "0"]
    with ChatServer(lambda _: Reply(status=401)) as server:
        result = CliRunner().invoke(app, [*args, "--llm-url", server.url, "-o", str(tmp_path / "a.json")])
    assert result.exit_code == 2, result.output
    assert "first error: HTTP 401" in result.output
    result = CliRunner().invoke(app, [*args, "--llm-url", "notaurl", "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "http:// or https://" in result.output
    assert not (tmp_path / "b.json").exists()


def test_cli_names_the_bad_row(tmp_path: Path) -> None:
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"image_id": 101, "answer": "A dog."}\n{"image_id": "x", "answer": "A dog."}\n')
    out = str(tmp_path / "r.json")
    result = CliRunner().invoke(app, ["eval", "objhal", "--coco", str(COCO), "--answers", str(bad), "-o", out])
    assert result.exit_code == 1
    assert "row 2" in result.output and "image_id" in result.output


def test_an_image_path_that_is_not_there_is_named_at_read_time(tmp_path: Path) -> None:
    """ "img/cat1" is valid base64 too: read as such, it failed at generation with "data is not a recognised image",
    naming neither the file nor the row. A value that looks like a path (a "/" or a file extension) and is no file
    is a missing file; base64 of something that is no image is said as such; a path and a base64 image still read."""
    import base64
    import io

    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "PNG")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat0.png").write_bytes(buf.getvalue())
    prompts = tmp_path / "prompts.jsonl"
    good = [{"image_id": 101, "question": "Describe.", "image": "img/cat0.png"}]
    good.append({"image_id": 102, "question": "Describe.", "image": base64.b64encode(buf.getvalue()).decode()})
    noise = io.BytesIO()  # base64 with a run of over 255 characters without "/": as a file name, ENAMETOOLONG
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "a" * 600)
    Image.new("RGB", (8, 8), (40, 200, 40)).save(noise, "PNG", pnginfo=text)
    assert max(len(part) for part in base64.b64encode(noise.getvalue()).split(b"/")) > 255
    good.append({"image_id": 103, "question": "Describe.", "image": base64.b64encode(noise.getvalue()).decode()})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in good))
    [(first, _), (second, _), (third, _)] = read_prompts(prompts)
    assert first.image == tmp_path / "img" / "cat0.png" and second.image == buf.getvalue()
    assert third.image == noise.getvalue() and image_bytes(base64.b64encode(noise.getvalue()).decode()) == third.image
    for image, message in [
        ("img/cat1", "image file 'img/cat1' not found"),
        ("cat1.jpg", "image file 'cat1.jpg' not found"),
        (base64.b64encode(b"not an image" * 8).decode(), "base64 that is no usable image: .*not a recognised image"),
        ("not base64!", r"is neither a file \(looked in .*\) nor base64 of an image"),
    ]:
        row = {"image_id": 104, "question": "Describe.", "image": image}
        prompts.write_text(json.dumps(good[0]) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"{prompts}, row 2, column 'image': .*{message}"):
            read_prompts(prompts)


def test_answers_holding_a_unicode_line_separator_are_one_row_and_a_null_image_takes_image_path(tmp_path) -> None:
    """`json.dumps(ensure_ascii=False)` writes U+2028 as is: `splitlines()` cut the row in two ("not JSON"); pandas
    writes `"image": null` beside `image_path`, and the alias took the null."""
    import json

    from rlaifv.trainer.evaluation.files import read_rows
    from rlaifv.trainer.evaluation.objhal import PromptRow

    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": 1, "image_id": 5, "text": "a cat\u2028on a mat\u0085"}, {"question_id": 2, "text": "x"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert [r["text"] for r in read_rows(path)] == ["a cat\u2028on a mat\u0085", "x"]
    row = PromptRow.model_validate({"image_id": 1, "question": "q", "image": None, "image_path": "COCO_1.jpg"})
    assert row.image == "COCO_1.jpg"


def _no_model(self: Source) -> None:
    pytest.fail("a model was loaded: the prompts file should have been refused first")


def test_a_bad_image_is_named_by_its_row_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decompression bomb was a traceback (Pillow's DecompressionBombError is no OSError); base64 of a damaged
    JPEG ("/9j/...") was a missing file; a 5000x5000 PNG or a truncated file failed at its batch, after the model
    loaded and earlier batches were sampled, naming no file or row. Each is one error line naming the row when the
    file is read, in the trainer's words."""
    monkeypatch.setattr(Source, "generator", _no_model)
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "COCO_val2014_000000000102.jpg").write_bytes(truncated_jpeg())
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "r.json"
    good = {"image_id": 101, "question": "Describe.", "image": b64(good_png())}
    cut = "undecodable image: image could not be decoded: image file is truncated"
    for image, message in [
        (b64(png_declaring(30000, 30000)), "column 'image': base64 that is no usable image: image too large: .*bomb"),
        (b64(truncated_jpeg()), f"column 'image': base64 that is no usable image: {cut}"),
        (b64(png_declaring(5000, 5000)), "column 'image': base64 .*: image is 5000x5000 = 25000000 pixels, over the"),
        ("cut.jpg", f"column 'image': image {re.escape(str(tmp_path / 'cut.jpg'))}: {cut}"),
        (None, f"image {re.escape(str(tmp_path / 'COCO_val2014_000000000102.jpg'))}: {cut}"),  # found by its COCO id
    ]:
        bad = {"image_id": 102, "question": "Describe."} | ({"image": image} if image else {})
        prompts.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        args = ["eval", "objhal", "--coco", str(COCO), "--prompts", str(prompts), "--images", str(tmp_path)]
        result = CliRunner().invoke(app, [*args, "--service", "http://127.0.0.1:9", "-o", str(out)])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(f"{re.escape(str(prompts))}, row 2(, |: ){message}", result.output), result.output
        assert not out.exists()


class Counting:
    """A generator that answers every prompt with one sentence and counts the prompts it was asked to sample."""

    fingerprint = "fake:counting"

    def __init__(self) -> None:
        self.sampled: list[str] = []

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        self.sampled += [p.question for p in prompts]
        return [Sampled(texts=["A dog on the grass."] * n, dpo=[0.0] * n) for _ in prompts]


def test_a_rerun_of_an_edited_prompts_file_samples_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompt ids were `<line>:<image id>`: deleting line 1 sampled every later prompt again (and with N > 1 under
    new seeds). Ids are the image id and the question now, so the rerun samples nothing; the same question about one
    image twice is refused naming both rows."""
    generator = Counting()
    monkeypatch.setattr(Source, "generator", lambda self: generator)
    rows = [{"image_id": i, "question": q, "image": b64(good_png((i, 40, 40)))} for i, q in
            [(101, "Describe."), (102, "Describe."), (101, "What is there?"), (103, "Describe.")]]  # fmt: skip
    prompts, cache = tmp_path / "prompts.jsonl", tmp_path / "candidates.jsonl"
    args = ["eval", "objhal", "--coco", str(COCO), "--prompts", str(prompts), "--service", "http://127.0.0.1:9"]
    args += ["--cache", str(cache), "-n", "2", "--select", "random"]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = [p.id for p, _ in read_prompts(prompts)]
    assert len(set(first)) == 4 and not any(":" in i for i in first)  # never an id of the old form
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    assert len(generator.sampled) == 4
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert [p.id for p, _ in read_prompts(prompts)] == first[1:]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert len(generator.sampled) == 4  # nothing sampled again
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[2]]))
    with pytest.raises(
        DataError, match=r"row 5: image_id 101 is asked the question 'What is there\?' twice in rows 3 and 5"
    ):
        read_prompts(prompts)


def test_an_answer_given_twice_is_refused_naming_both_rows(tmp_path: Path) -> None:
    """A repeated answer was scored twice without a word (6 answers reported for 4); `eval amber` refuses one."""
    lines = (DATA / "objhal_answers.jsonl").read_text().splitlines()
    answers, out = tmp_path / "answers.jsonl", tmp_path / "r.json"
    answers.write_text("\n".join([*lines, lines[1]]) + "\n")
    result = CliRunner().invoke(app, ["eval", "objhal", "--coco", str(COCO), "--answers", str(answers), "-o", str(out)])
    assert result.exit_code == 1 and not out.exists(), result.output
    assert f"{answers}, row 6: image_id 102 is answered twice for the question 'Describe the image in detail.'" in (
        result.output.replace("\n", "")
    )
    assert "in rows 2 and 6" in result.output.replace("\n", "")
