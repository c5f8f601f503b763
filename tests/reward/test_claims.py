"""Claim splitting, question writing, scoring and the yes/no judge."""

import pytest
import torch
from PIL import Image

from rlaifv.reward.claims import RuleQuestionWriter, SpacyClaimSplitter, normalize_claim, verify_answers
from rlaifv.reward.prompt import encode_prompt
from rlaifv.reward.scoring import RewardConfig
from rlaifv.reward.yes_no import YesNoJudge


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        (
            "a red circle, a blue square and a green triangle.",
            ["There is a red circle.", "There is a blue square.", "There is a green triangle."],
        ),
        ("There is a cat and a dog. The sky is blue.", ["There is a cat.", "There is a dog.", "The sky is blue."]),
        ("The dog has a red collar.", ["The dog has a red collar."]),
        ("", []),
        ("There is a black and white cat.", ["There is a black and white cat."]),
        ("a red and blue ball, a dog and cat.", ["There is a red and blue ball.", "There is a dog.", "There is cat."]),
        (
            "There are two dogs, a cat and several birds.",
            ["There are two dogs.", "There is a cat.", "There are several birds."],
        ),
        ("There are cats and dogs.", ["There are cats.", "There are dogs."]),
        ("There are no dogs in the image.", ["There are no dogs in the image."]),
        ("The image shows a man and two children.", ["There is a man.", "There are two children."]),
    ],
)
def test_splitter(answer, claims):
    assert SpacyClaimSplitter().split(answer) == claims


@pytest.mark.parametrize(
    ("claim", "question"),
    [
        ("There is a red circle.", "Is there a red circle in the image? Please answer yes or no."),
        ("There are two dogs.", "Are there two dogs in the image? Please answer yes or no."),
        ("The sky is not blue.", "Is the sky not blue? Please answer yes or no."),
        ("The dog has a collar.", "Is it true that the dog has a collar? Please answer yes or no."),
        ("There are no dogs in the image.", "Are there no dogs in the image? Please answer yes or no."),
        ("There is a cat on the sofa.", "Is there a cat on the sofa in the image? Please answer yes or no."),
        ("There is a cat in this picture.", "Is there a cat in this picture? Please answer yes or no."),
    ],
)
def test_question_writer(claim, question):
    assert RuleQuestionWriter().question(claim) == question


def test_answer_tokens_skip_a_bare_space_token_that_would_count_for_yes_and_no():
    """A SentencePiece-style tokenizer encodes " yes" as [space, yes]: the space is neither answer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlaifv.reward.yes_no import NO_FORMS, YES_FORMS, first_token_ids

    vocab = {"<unk>": 0, " ": 1, "yes": 2, "Yes": 3, "YES": 4, "no": 5, "No": 6, "NO": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer(" yes", add_special_tokens=False)["input_ids"] == [1, 2]
    assert first_token_ids(tokenizer, YES_FORMS) == [2, 3, 4]
    assert first_token_ids(tokenizer, NO_FORMS) == [5, 6, 7]


def test_normalize_claim_matches_repeats():
    assert normalize_claim("There is a red circle.") == normalize_claim("there is the red circle")
    assert normalize_claim("There is a red circle.") != normalize_claim("There is a blue circle.")


class ScriptedLabeler:
    """Answers yes exactly for the objects it is told are present."""

    def __init__(self, present):
        self.present = present
        self.asked = []

    def p_yes(self, image, questions):
        self.asked.extend(questions)
        return [0.9 if any(f" {obj} " in q for obj in self.present) else 0.1 for q in questions]


def test_verify_answers_scores_rejections_and_repeats():
    labeler = ScriptedLabeler({"red circle", "blue square"})
    answers = [
        "a red circle and a blue square.",  # 0 rejected
        "a red circle and a green star.",  # 1 rejected
        "a red circle, a red circle and a cat.",  # 1 rejected + 1 repeat
        "a green star, a yellow cat, a dog.",  # 3 rejected
    ]
    verdicts = verify_answers(None, answers, labeler)
    assert [v.score for v in verdicts] == [0.0, -1.0, -2.0, -3.0]
    assert [(v.rejected, v.repeated) for v in verdicts] == [(0, 0), (1, 0), (1, 1), (3, 0)]
    assert len(labeler.asked) == len(set(labeler.asked))  # each distinct question asked once
    assert verdicts[2].claims[1].repeated and verdicts[2].claims[1].accepted


def test_expected_scoring_sums_p_no_and_breaks_the_ties_of_counting():
    class Graded:
        def p_yes(self, image, questions):
            sure = {"red circle": 0.99, "blue square": 0.6, "green star": 0.55, "cat": 0.1}
            return [next(v for k, v in sure.items() if f" {k} " in q) for q in questions]

    answers = [
        "a red circle and a blue square.",
        "a red circle and a green star.",
        "a red circle, a red circle, a cat.",
    ]
    count = verify_answers(None, answers, Graded())
    expected = verify_answers(None, answers, Graded(), scoring="expected")
    assert [v.score for v in count] == [0.0, 0.0, -2.0]  # a tie the count cannot break
    assert [v.score for v in expected] == pytest.approx([-(0.01 + 0.4), -(0.01 + 0.45), -(0.01 + 0.01 + 0.9) - 1])
    assert [v.rejected for v in expected] == [0, 0, 1]  # verdicts are the same; only the score differs


def test_judge_shares_the_image_prefix_and_matches_separate_forwards(tiny_pair):
    judge = YesNoJudge(tiny_pair.policy, tiny_pair.processor)
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    questions = ["Is there a red circle in the image? Please answer yes or no.", "Is there a cat?", "Is it true?"]
    got = judge.p_yes(image, questions)
    with torch.no_grad():
        for question, value in zip(questions, got, strict=True):
            prompt = encode_prompt(tiny_pair.processor, [image], question)
            probs = tiny_pair.policy(input_ids=prompt.input_ids[None], **prompt.vision).logits[0, -1].softmax(-1)
            yes, no = probs[judge.yes_ids].sum(), probs[judge.no_ids].sum()
            assert value == pytest.approx(float(yes / (yes + no)), abs=1e-5)


def test_markup_in_a_question_made_from_a_sampled_answer_is_dropped_not_refused(tiny_pair):
    """Claims come from what the model wrote: a "</s>" or "<image>" in them is not the request's fault."""
    judge = YesNoJudge(tiny_pair.policy, tiny_pair.processor)
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    marked, plain = "Is there a </s> red <image> circle?", "Is there a   red   circle?"
    assert judge.p_yes(image, [marked]) == pytest.approx(judge.p_yes(image, [plain]), abs=1e-6)


def test_claims_reward_mode_ranks_by_verification(tiny_bundle):
    from rlaifv.reward import load_bundle

    pair = load_bundle(tiny_bundle)
    pair._labeler = ScriptedLabeler({"red circle"})
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    answers = ["a cat and a dog.", "a red circle.", "a red circle and a cat."]
    ranking = pair.score(
        image, "What is in the image?", answers, reward=RewardConfig(mode="claims", claim_score="count")
    )
    assert ranking.rewards == [-2.0, 0.0, -1.0]
    assert ranking.best_index == 1
    assert [c.accepted for c in ranking.best.claims] == [True]
    # The implicit reward is still reported beside the ranking reward.
    dpo = pair.score(image, "What is in the image?", answers)
    assert [c.implicit_reward for c in ranking.candidates] == pytest.approx(dpo.rewards, abs=1e-9)


def test_claims_reward_honours_the_claim_threshold(tiny_bundle):
    """The service's claims reward uses the same acceptance threshold setting as the trainer's feedback."""
    from rlaifv.reward import load_bundle

    pair = load_bundle(tiny_bundle)
    pair._labeler = ScriptedLabeler({"red circle"})  # p(yes) 0.9 for the red circle, 0.1 otherwise
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    answers = ["a red circle.", "a cat."]
    strict = RewardConfig(mode="claims", claim_threshold=0.95)
    assert pair.score(image, "What is in the image?", answers, reward=strict).rewards == [-1.0, -1.0]
    lenient = RewardConfig(mode="claims", claim_threshold=0.05)
    assert pair.score(image, "What is in the image?", answers, reward=lenient).rewards == [0.0, 0.0]


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        (
            "The image shows a man wearing a hat, holding an umbrella, and standing next to a red car.",
            [
                "There is a man wearing a hat.",
                "There is a man holding an umbrella.",
                "There is a man standing next to a red car.",
            ],
        ),
        (
            "There is a red car, which is parked near a tree, and a man.",
            ["There is a red car which is parked near a tree.", "There is a man."],
        ),
        ("a dog, sleeping on a sofa, and two cats.", ["There is a dog sleeping on a sofa.", "There are two cats."]),
        ("a big striped cat, sitting on a mat.", ["There is a big striped cat sitting on a mat."]),
        (
            "There is a parked car, a striped cat and a dog.",
            ["There is a parked car.", "There is a striped cat.", "There is a dog."],
        ),
    ],
)
def test_participial_and_relative_clauses_stay_with_their_object(answer, claims):
    """A clause after a comma describes the object before it; alone it made "There is holding an umbrella."."""
    assert SpacyClaimSplitter().split(answer) == claims


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        ("1. A cat is on the table 2. A dog is on the floor", ["A cat is on the table.", "A dog is on the floor."]),
        ("- a cat\n- a dog\n- a bird", ["There is a cat.", "There is a dog.", "There is a bird."]),
        ("1) a red ball\n2) The ball is big.", ["There is a red ball.", "The ball is big."]),
        ("There are 2. The dog is brown.", ["There are 2.", "The dog is brown."]),  # no "1.": not a list
    ],
)
def test_list_markers_cut_items_and_are_no_claims(answer, claims):
    assert SpacyClaimSplitter().split(answer) == claims


def test_cjk_sentence_marks_end_claims_and_are_stripped():
    """The English tokenizer needs whitespace to see a sentence end; CJK text has none."""
    splitter, writer = SpacyClaimSplitter(), RuleQuestionWriter()
    claims = splitter.split("图片中有一只猫和一只狗。桌子上有一个红色的苹果！")
    assert claims == ["图片中有一只猫和一只狗。", "桌子上有一个红色的苹果。"]
    assert writer.question(claims[0]) == "Is it true that 图片中有一只猫和一只狗? Please answer yes or no."


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        (
            "a red circle, a green triangle and a blue square.",
            ["There is a red circle.", "There is a green triangle.", "There is a blue square."],
        ),
        (
            "a red square in blue square and a blue square.",
            ["There is a red square in blue square.", "There is a blue square."],
        ),
        (
            "a red and a; a blue Square, there",
            ["There is a red.", "There is a.", "There is a blue Square.", "There is there."],
        ),
        (
            "a blue triangle, a blue square and a?",
            ["There is a blue triangle.", "There is a blue square.", "There is a?."],
        ),
        ("a yellow triangle.?", ["There is a yellow triangle.?."]),
        ("A Blue", ["There is A Blue."]),
        ("Is yellow circle.", ["Is yellow circle."]),
    ],
)
def test_shapes_world_samples_split_as_when_the_shipped_bundle_was_built(answer, claims):
    """Captions the shipped shapes-world models sample (malformed ones included): their claims and questions are in
    the bundle's feedback and recorded evaluation, so a splitter change must leave them alone."""
    assert SpacyClaimSplitter().split(answer) == claims
    assert (
        RuleQuestionWriter().question("There is a green?.")
        == "Is there a green? in the image? Please answer yes or no."
    )


def test_plan_claims_splits_each_distinct_answer_and_rewrites_each_distinct_claim_once():
    from rlaifv.reward.claims import plan_claims

    class Counting:
        def __init__(self, inner):
            self.inner, self.nlp, self.calls = inner, getattr(inner, "nlp", None), []

        def split(self, answer):
            self.calls.append(answer)
            return self.inner.split(answer)

        def question(self, claim):
            self.calls.append(claim)
            return self.inner.question(claim)

    splitter, writer = Counting(SpacyClaimSplitter()), Counting(RuleQuestionWriter())
    answers = ["a cat and a dog.", "a cat and a dog.", "a dog, a cat and a cat."]
    plans, questions = plan_claims(answers, splitter, writer)
    assert splitter.calls == ["a cat and a dog.", "a dog, a cat and a cat."]
    assert writer.calls == ["There is a cat.", "There is a dog."]
    assert plans[0] == plans[1] and plans[0] is not plans[1]
    assert [repeated for _, _, repeated in plans[2]] == [False, False, True]
    assert questions == [f"Is there a {x} in the image? Please answer yes or no." for x in ("cat", "dog")]
