"""Divide-and-conquer feedback with a controlled labeler, and pair building."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from trainer_testkit import ControlledLabeler, png

from rlaifv.trainer.data import PromptItem, read_preferences
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.feedback import (
    PromptFeedback,
    ScoredAnswer,
    collect_feedback,
    read_feedback,
    score_answers,
    write_feedback,
)
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.preference_pairs import PairConfig, build_pairs, ngram_jaccard

ANSWERS = [
    "There is a red circle and a blue square.",  # 2 claims, 1 false            -> -1
    "There is a red circle.",  # 1 true claim                                   ->  0
    "There is a red circle, a red circle and a green tree.",  # 1 false, 1 repeat -> -2
    "There is a blue square.",  # 1 false                                        -> -1
]


def _score(labeler: ControlledLabeler, answers: list[str], **kwargs) -> list[ScoredAnswer]:
    from rlaifv.reward.claims import RuleQuestionWriter, SpacyClaimSplitter

    config = FeedbackConfig(**kwargs)
    image = Image.new("RGB", (32, 32))
    return score_answers(image, answers, labeler, SpacyClaimSplitter(), RuleQuestionWriter(), config)


def test_scores_with_a_controlled_labeler_are_exact() -> None:
    labeler = ControlledLabeler(lambda q: "red circle" in q)
    scored = _score(labeler, ANSWERS)
    assert [a.score for a in scored] == [-1.0, 0.0, -2.0, -1.0]
    assert [(a.rejected, a.repeated, a.num_claims) for a in scored] == [(1, 0, 2), (0, 0, 1), (1, 1, 3), (1, 0, 1)]
    assert [(c["accepted"], c["repeated"]) for c in scored[2].claims] == [(True, False), (True, True), (False, False)]
    # every distinct question is asked once, in RLAIF-V's yes/no form
    assert sorted(labeler.asked) == sorted(set(labeler.asked))
    assert "Is there a red circle in the image? Please answer yes or no." in labeler.asked
    assert len(labeler.asked) == 3


def test_repeat_penalty_and_threshold_are_applied() -> None:
    labeler = ControlledLabeler(lambda q: "red circle" in q)
    assert [a.score for a in _score(labeler, ANSWERS, repeat_penalty=0.5)] == [-1.0, 0.0, -1.5, -1.0]
    # p(yes) is 0.9 for accepted claims: a threshold above it rejects everything
    assert [a.score for a in _score(labeler, ANSWERS, threshold=0.95)] == [-2.0, -1.0, -4.0, -1.0]


def _feedback(labeler: ControlledLabeler) -> PromptFeedback:
    return PromptFeedback("p0", png((0, 0, 0)), "describe the image", _score(labeler, ANSWERS))


def test_pairs_from_hand_written_answers_are_exact() -> None:
    feedback = _feedback(ControlledLabeler(lambda q: "red circle" in q))
    rows, stats = build_pairs([feedback], PairConfig(max_pairs_per_prompt=10, length_balance=False))
    got = {(r.chosen, r.rejected) for r in rows}
    a = ANSWERS
    assert got == {(a[1], a[0]), (a[1], a[3]), (a[1], a[2]), (a[0], a[2]), (a[3], a[2])}
    assert stats.candidate_pairs == 5 and stats.selected == 5
    best, _ = build_pairs([feedback], PairConfig(max_pairs_per_prompt=1, length_balance=False))
    assert [(r.chosen, r.rejected) for r in best] == [(a[1], a[2])]  # the largest score gap
    assert best[0].meta == {"chosen_score": 0.0, "rejected_score": -2.0, "prompt_id": "p0"}
    two, capped = build_pairs([feedback], PairConfig(max_pairs_per_prompt=2, length_balance=False))
    assert len(two) == 2 and (a[1], a[2]) == (two[0].chosen, two[0].rejected)
    assert capped.capped == 3  # the other candidate pairs, counted where the reason for no pairs is told


def _answer(text: str, score: float) -> ScoredAnswer:
    return ScoredAnswer(text=text, score=score, rejected=int(-score), repeated=0)


def test_min_gap_and_near_duplicates() -> None:
    long_text = "a red circle and a blue square on the left of the big green tree in the picture"
    answers = [_answer(long_text, 0), _answer(long_text + " .", -1), _answer("a cat", -0.5)]
    rows, stats = build_pairs([PromptFeedback("p", b"", "q", answers)], PairConfig(max_pairs_per_prompt=5))
    assert rows == [] and stats.candidate_pairs == 1 and stats.near_duplicates == 1
    assert ngram_jaccard(long_text, long_text + " .") >= 0.9
    assert ngram_jaccard("a red circle", "a blue square") == 0.0


def test_length_balancing_removes_pairs_where_chosen_is_much_shorter() -> None:
    items = []
    for i in range(4):
        short, long = "a red circle", "there is a blue square and a black dog and a red circle"
        items.append(PromptFeedback(f"s{i}", b"", "q", [_answer(short, 0), _answer(long, -1)]))
    balanced = [_answer("a red circle and a green tree", 0), _answer("a blue square and a black dog", -2)]
    even = PromptFeedback("e", b"", "q", balanced)
    rows, stats = build_pairs([*items, even], PairConfig())
    words = lambda t: len(t.split())  # noqa: E731
    assert stats.length_removed == 4 and stats.length_threshold is not None
    assert [(r.chosen, r.rejected) for r in rows] == [(even.answers[0].text, even.answers[1].text)]
    assert sum(words(r.chosen) for r in rows) >= 0.95 * sum(words(r.rejected) for r in rows)
    unbalanced, stats = build_pairs([*items, even], PairConfig(length_balance=False))
    assert len(unbalanced) == 5 and stats.length_removed == 0


def test_length_balancing_can_drop_random_shorter_chosen_pairs() -> None:
    """'random' balances the means as 'ratio' does, but by dropping any pairs whose chosen answer is shorter, so the
    pairs where a hallucination added a whole object (the smallest ratios) are not all gone."""

    def item(name: str, chosen: str, rejected: str) -> PromptFeedback:
        return PromptFeedback(name, b"", "q", [_answer(chosen, 0), _answer(rejected, -1)])

    big = [item(f"b{i}", "a red circle here", "a red circle and a blue square here now") for i in range(6)]  # 4 vs 9
    small = [item(f"s{i}", "a red circle and a blue square", "a red circle and a blue cat too") for i in range(6)]
    longer = [item(f"l{i}", "a red circle and a blue square here", "a green tree") for i in range(4)]  # 8 vs 3
    feedback = [*big, *small, *longer]
    words = lambda t: len(t.split())  # noqa: E731

    by_ratio, stats = build_pairs(feedback, PairConfig())
    assert stats.length_threshold == 4 / 9 and stats.length_removed > 0  # only the smallest ratio went
    assert sum(r.chosen == "a red circle and a blue square" for r in by_ratio) == 6
    removed_small = set()
    for seed in range(8):
        rows, stats = build_pairs(feedback, PairConfig(length_drop="random", seed=seed))
        assert stats.length_threshold is None and stats.length_removed > 0
        assert sum(words(r.chosen) for r in rows) >= 0.95 * sum(words(r.rejected) for r in rows)
        assert sum(r.rejected == "a green tree" for r in rows) == 4  # a longer chosen is never dropped
        removed_small.add(6 - sum(r.chosen == "a red circle and a blue square" for r in rows))
    assert max(removed_small) > 0  # some seeds drop a pair that 'ratio' keeps


def test_feedback_file_round_trip(tmp_path: Path) -> None:
    feedback = [_feedback(ControlledLabeler(lambda q: "red" in q))]
    again = read_feedback(write_feedback(tmp_path / "f.parquet", feedback))
    assert again == feedback
    assert all(isinstance(f.image, memoryview) for f in again)  # on disk, as the reader keeps a dataset's images
    second = [dataclasses.replace(f, id=f"{f.id}-2") for f in feedback]
    both = read_feedback(tmp_path / "f.parquet", write_feedback(tmp_path / "g.parquet", second))
    assert [f.id for f in both] == [f.id for f in feedback + second]
    assert len({id(f.image.obj) for f in both}) == 1  # one map for every file (a resumed run's many batches)
    with pytest.raises(DataError, match="not a readable feedback file"):
        read_feedback(tmp_path / "missing.parquet")


@pytest.mark.slow
def test_collect_feedback_samples_deconfounded_and_reproducibly(tiny_model: Path) -> None:
    from rlaifv.reward.models import load_model, load_processor

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [
        PromptItem("a", png((200, 0, 0)), "describe the image"),
        PromptItem("b", png((0, 0, 200)), "what is this"),
    ]
    config = FeedbackConfig(num_samples=4, max_tokens=8, drop_truncated=False, temperature=1.0, seed=5)
    labeler = ControlledLabeler(lambda q: len(q) % 2 == 0)
    first = collect_feedback(model, processor, prompts, config, labeler=labeler, progress=False)
    second = collect_feedback(
        model, processor, prompts, config, labeler=ControlledLabeler(labeler.accept), progress=False
    )
    assert [[a.text for a in f.answers] for f in first] == [[a.text for a in f.answers] for f in second]
    assert all(len(f.answers) + f.dropped == 4 for f in first)
    assert all(1 <= a.num_tokens <= 8 for f in first for a in f.answers)
    # the scores are those of verify_answers on the sampled texts
    for item in first:
        texts = [a.text for a in item.answers]
        expected = _score(ControlledLabeler(labeler.accept), texts) if texts else []
        assert [a.score for a in item.answers] == [a.score for a in expected]
    other_seed = collect_feedback(
        model, processor, prompts, FeedbackConfig(**{**config.to_dict(), "seed": 6}), labeler=labeler, progress=False
    )
    assert [[a.text for a in f.answers] for f in other_seed] != [[a.text for a in f.answers] for f in first]


def test_a_llava_format_question_samples_as_its_plain_text(tiny_model: Path) -> None:
    """ "<image>\ndescribe the image" (LLaVA's data format) is the question "describe the image" with its image given
    apart: the same samples, where it used to fail the whole run (a placeholder without an image)."""
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer.feedback import sample_candidates, sampling_pair

    pair = sampling_pair(load_model(tiny_model), load_processor(tiny_model))
    config = FeedbackConfig(num_samples=3, max_tokens=6, temperature=1.0)
    plain = PromptItem("a", png((200, 0, 0)), "describe the image")
    marked = PromptItem("a", plain.image, "<image>\ndescribe the image")
    assert sample_candidates(pair, [marked], config, seed=1) == sample_candidates(pair, [plain], config, seed=1)
    # a question that is nothing but the placeholder: the image alone is the prompt (it failed the whole batch)
    only = sample_candidates(pair, [PromptItem("a", plain.image, "<image>\n")], config, seed=1)
    assert len(only[0]) == 3
    assert pair.encode([plain.image], None, messages=[{"role": "user", "content": [{"type": "image"}]}]).input_ids.shape


def test_a_run_that_drops_most_candidates_as_truncated_is_warned(tiny_model: Path) -> None:
    """Dropping what hit max_tokens keeps only short answers: a run where that is most of them says so."""
    from rlaifv.reward.models import load_model, load_processor

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem("a", png((200, 0, 0)), "describe the image")]
    config = FeedbackConfig(num_samples=4, max_tokens=1, temperature=1.0, seed=5)
    with pytest.warns(UserWarning, match="reached max_tokens=1 and were dropped"):
        feedback = collect_feedback(model, processor, prompts, config, labeler=ControlledLabeler(bool), progress=False)
    assert feedback[0].dropped >= 1


@pytest.mark.slow
def test_self_feedback_asks_the_policy(tiny_model: Path) -> None:
    from rlaifv.reward.claims import verify_answers
    from rlaifv.reward.images import decode_image
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.reward.yes_no import YesNoJudge

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [
        PromptItem("a", png((200, 0, 0)), "describe the image"),
        PromptItem("b", png((0, 90, 0)), "what is this"),
    ]
    config = FeedbackConfig(num_samples=3, max_tokens=10, drop_truncated=False, temperature=1.0)
    result = collect_feedback(model, processor, prompts, config, progress=False)  # batched over both prompts
    claims = [c for a in result[0].answers for c in a.claims]
    assert claims, "the sampled answers should contain claims"
    judge = YesNoJudge(model, processor)
    image = decode_image(prompts[0].image)
    for claim in claims[:3]:
        assert claim["p_yes"] == pytest.approx(judge.p_yes(image, [claim["question"]])[0], abs=1e-5)
    # batching the labeler across prompts scores exactly as verify_answers does prompt by prompt
    for item, feedback in zip(prompts, result, strict=True):
        texts = [a.text for a in feedback.answers]
        one_by_one = verify_answers(decode_image(item.image), texts, judge)
        assert [a.score for a in feedback.answers] == [v.score for v in one_by_one]


@pytest.mark.slow
def test_feedback_cli_writes_scored_candidates_and_a_report(tiny_model: Path, tmp_path: Path) -> None:
    import json

    from trainer_testkit import preference_rows, write_rlaifv_parquet
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    app = Typer()
    app.command()(feedback)
    data = write_rlaifv_parquet(
        tmp_path / "prompts.parquet", preference_rows([("a cat", "a dog"), ("a car", "a star")])
    )
    args = [str(data), "--model", str(tiny_model), "-o", str(tmp_path / "fb"), "--samples", "3", "--max-tokens", "6"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--set", "feedback.drop_truncated=false"])
    assert result.exit_code == 0, result.output
    stored = read_feedback(tmp_path / "fb" / "feedback.parquet")
    assert [f.question for f in stored] == ["describe the image", "describe the image"]
    assert all(len(f.answers) == 3 for f in stored)
    report = json.loads((tmp_path / "fb" / "report.json").read_text())
    assert report["feedback"]["prompts_read"] == 2 and report["feedback"]["prompts"] == 2
    assert report["feedback"]["candidates"] == 6 and report["settings"]["feedback"]["labeler"] == "self"
    pairs_file = tmp_path / "fb" / "pairs.parquet"
    if report["pairs"]["selected"]:
        assert len(read_preferences(pairs_file)) == report["pairs"]["selected"]
    else:
        assert not pairs_file.exists()


def test_a_separate_labeler_model_is_loaded_from_its_folder(tiny_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.reward.yes_no import YesNoJudge
    from rlaifv.trainer.feedback import make_labeler
    from rlaifv.trainer.shapes.tiny_vlm import perturb_copy

    judge_dir = perturb_copy(tiny_model, tmp_path / "judge", scale=0.5)
    policy, processor = load_model(tiny_model), load_processor(tiny_model)
    separate = make_labeler(FeedbackConfig(labeler=str(judge_dir)), policy, processor)
    own = make_labeler(FeedbackConfig(), policy, processor)
    assert isinstance(separate, YesNoJudge) and separate.model is not policy and own.model is policy
    image, questions = (
        Image.new("RGB", (32, 32), (9, 9, 9)),
        ["Is there a red circle in the image? Please answer yes or no."],
    )
    direct = YesNoJudge(load_model(judge_dir), load_processor(judge_dir)).p_yes(image, questions)
    assert separate.p_yes(image, questions) == pytest.approx(direct, abs=1e-6)
    assert separate.p_yes(image, questions) != pytest.approx(own.p_yes(image, questions), abs=1e-6)


def _claimed(text: str, verdicts: list[tuple[bool, bool]]) -> ScoredAnswer:
    claims = [{"claim": f"c{i}", "accepted": ok, "repeated": rep} for i, (ok, rep) in enumerate(verdicts)]
    rejected = sum(not ok for ok, _ in verdicts)
    repeated = sum(rep for _, rep in verdicts)
    score = -float(rejected + repeated)
    return ScoredAnswer(text=text, score=score, rejected=rejected, repeated=repeated, claims=claims)


def test_keep_verified_drops_pairs_whose_chosen_loses_true_claims() -> None:
    full = _claimed("a red circle, a blue square and a cat.", [(True, False), (True, False), (False, False)])
    terse = _claimed("a red circle.", [(True, False)])  # better score, but dropped a true object
    clean = _claimed("a red circle and a blue square.", [(True, False), (True, False)])
    repeat = _claimed("a red circle and a red circle.", [(True, False), (True, True)])
    item = PromptFeedback("p", b"", "q", [full, terse, clean, repeat])
    config = dict(max_pairs_per_prompt=10, length_balance=False)
    everything, _ = build_pairs([item], PairConfig(**config))
    kept, stats = build_pairs([item], PairConfig(keep_verified=True, **config))
    pairs = {(r.chosen, r.rejected) for r in kept}
    assert (terse.text, full.text) in {(r.chosen, r.rejected) for r in everything}
    assert (terse.text, full.text) not in pairs
    assert (clean.text, full.text) in pairs and (clean.text, repeat.text) in pairs
    assert stats.verified_removed == len(everything) - len(kept) > 0


def test_feedback_cli_refuses_settings_it_would_ignore(tiny_model: Path, tmp_path: Path) -> None:
    """`--set max_tokens=64` (no section) or `--set dpo.x=1` (another command's) used to be dropped silently."""
    from trainer_testkit import preference_rows, write_rlaifv_parquet
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    app = Typer()
    app.command()(feedback)
    data = write_rlaifv_parquet(tmp_path / "prompts.parquet", preference_rows([("a cat", "a dog")]))
    for stray, hint in (
        ("max_tokens=64", "did you mean --set feedback.max_tokens=...?"),
        ("dpo.nll_weight=0.2", "only"),
    ):
        result = CliRunner().invoke(
            app, [str(data), "--model", str(tiny_model), "-o", str(tmp_path / "fb"), "--set", stray]
        )
        assert result.exit_code == 2 and "feedback takes feedback.* and pairs.* settings" in result.output, (
            result.output
        )
        assert hint in result.output and "feedback.dpo" not in result.output, result.output


def test_feedback_cli_names_a_model_adapter_or_labeler_that_is_not_a_folder(tiny_model: Path, tmp_path: Path) -> None:
    """`--adapter nosuch` was tried as a hub id: 30 s of retries before the error; checked before the prompts."""
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    app = Typer()
    app.command()(feedback)
    absent = tmp_path / "prompts.parquet"  # never read: the models are checked first
    for option, value in (("--model", "nosuch"), ("--adapter", "nosuch"), ("--labeler", "nosuch")):
        model = ["--model", str(tiny_model)] if option != "--model" else []
        args = [str(absent), *model, option, value, "-o", str(tmp_path / "fb")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"{option} folder nosuch does not exist" in result.output, result.output


@pytest.mark.slow
def test_feedback_stopped_by_sigterm_resumes_after_its_last_saved_batch(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampling and judging thousands of prompts takes hours: SIGTERM in batch 1 of 3 keeps that batch, and the
    rerun samples batches 2 and 3 only, to the feedback of a run never stopped; other settings start afresh."""
    import dataclasses
    import signal

    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer import feedback as feedback_module
    from rlaifv.trainer.errors import TrainingInterrupted
    from rlaifv.trainer.feedback import FeedbackShards, feedback_key

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((40 * i, 0, 200)), "describe the image") for i in range(5)]
    config = FeedbackConfig(num_samples=3, max_tokens=6, drop_truncated=False, temperature=1.0, seed=2, prompt_batch=2)
    labeler = ControlledLabeler(lambda q: len(q) % 2 == 0)

    def run(shards: FeedbackShards | None):
        return collect_feedback(model, processor, prompts, config, labeler=labeler, progress=False, shards=shards)

    expected = run(None)
    shards = FeedbackShards(tmp_path / "partial", feedback_key(config, [tiny_model]), config.to_dict())
    real, batches = feedback_module.sample_candidates, []

    def sampling(pair, batch, *args, **kwargs):
        batches.append([p.id for p in batch])
        if len(batches) == 1:
            signal.raise_signal(signal.SIGTERM)  # noted; the batch finishes and is saved
        return real(pair, batch, *args, **kwargs)

    monkeypatch.setattr(feedback_module, "sample_candidates", sampling)
    with pytest.raises(TrainingInterrupted, match="after 2 of 5 prompts"):
        run(shards)
    assert [f.name for f in sorted((tmp_path / "partial").glob("batch-*"))] == [
        "batch-000000000.json",
        "batch-000000000.parquet",
    ]
    batches.clear()
    batches.append(["(the signal is sent only once)"])
    resumed = run(shards)
    assert batches[1:] == [["p2", "p3"], ["p4"]]

    assert _answers(resumed) == _answers(expected)
    other = dataclasses.replace(config, seed=3)
    with pytest.warns(UserWarning, match=r"made with other settings \(feedback.seed\): starting over"):
        assert FeedbackShards(tmp_path / "partial", feedback_key(other, [tiny_model]), other.to_dict()).resume(
            prompts, 2
        ) == ([], 0, 0)
    assert not list((tmp_path / "partial").glob("batch-*"))  # another run's shards are cleared


@pytest.mark.slow
def test_the_truncation_warning_counts_the_batches_of_the_stopped_run_too(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer import feedback as feedback_module
    from rlaifv.trainer.errors import TrainingInterrupted
    from rlaifv.trainer.feedback import FeedbackShards, feedback_key

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((60 * i, 9, 9)), "describe the image") for i in range(4)]
    config = FeedbackConfig(num_samples=4, max_tokens=1, temperature=1.0, seed=5, prompt_batch=2)
    shards = FeedbackShards(tmp_path / "partial", feedback_key(config, [tiny_model]), config.to_dict())
    real, calls = feedback_module.sample_candidates, []

    def sampling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(feedback_module, "sample_candidates", sampling)
    with pytest.raises(TrainingInterrupted):
        collect_feedback(model, processor, prompts, config, labeler=ControlledLabeler(bool), shards=shards)
    with pytest.warns(UserWarning, match=r"of 16 candidates reached max_tokens=1"):  # all 4 prompts, not 2
        collect_feedback(model, processor, prompts, config, labeler=ControlledLabeler(bool), shards=shards)
    assert len(calls) == 2


def test_a_hub_model_id_names_its_feedback_run() -> None:
    from rlaifv.trainer.feedback import feedback_key

    config = FeedbackConfig()
    assert feedback_key(config, ["llava-hf/llava-1.5-7b-hf"]) != feedback_key(config, ["other/model"])


@pytest.mark.parametrize("setting", ["labeler", "llm_model"])
def test_the_labeler_and_the_claims_llm_name_the_feedback_by_content(
    tiny_model: Path, tmp_path: Path, setting: str
) -> None:
    """Both were in the key by path: a copy elsewhere (which run.json resumes) started the round's feedback over,
    and a claims LLM retrained in place went on from batches the earlier one had split."""
    import hashlib
    import json
    import shutil

    from rlaifv.trainer.dpo import saved_identities
    from rlaifv.trainer.feedback import feedback_key, feedback_keys

    def config(folder: Path) -> FeedbackConfig:
        return FeedbackConfig(
            **({"labeler": str(folder)} if setting == "labeler" else {"splitter": "llm", "llm_model": str(folder)})
        )

    first = shutil.copytree(tiny_model, tmp_path / "first")
    copy = shutil.copytree(first, tmp_path / "copy")
    key = feedback_key(config(first), [tiny_model])
    assert feedback_key(config(copy), [tiny_model]) == key
    named = [tiny_model, *([first] if setting == "labeler" else [])]
    by_path = [config(first).result_settings(), saved_identities([str(p) for p in named])[0]]
    assert hashlib.sha256(json.dumps(by_path).encode()).hexdigest() in feedback_keys(config(first), [tiny_model])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # retrained in place
    assert key not in feedback_keys(config(copy), [tiny_model])


def _sampled_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The prompt ids of every batch sampled from now on (the batches a run did not reuse), in order."""
    from rlaifv.trainer import feedback as feedback_module

    real, batches = feedback_module.sample_candidates, []

    def sampling(pair, batch, *args, **kwargs):
        batches.append([p.id for p in batch])
        return real(pair, batch, *args, **kwargs)

    monkeypatch.setattr(feedback_module, "sample_candidates", sampling)
    return batches


def _answers(feedback):
    return [(f.id, [(a.text, a.score) for a in f.answers]) for f in feedback]


@pytest.mark.slow
def test_a_run_with_more_prompts_goes_on_from_the_saved_whole_batches(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raised --limit kept nothing (the prompts were part of the run's key): the saved whole batches stay, a
    last batch that was short is sampled again whole, and the result is that of one run over every prompt."""
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer.feedback import FeedbackShards, feedback_key

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((40 * i, 0, 200)), "describe the image") for i in range(5)]
    config = FeedbackConfig(num_samples=2, max_tokens=4, drop_truncated=False, temperature=1.0, seed=2, prompt_batch=2)
    labeler = ControlledLabeler(lambda q: len(q) % 2 == 0)

    def run(items: list[PromptItem], shards: FeedbackShards | None):
        return collect_feedback(model, processor, items, config, labeler=labeler, progress=False, shards=shards)

    expected = run(prompts, None)
    shards = FeedbackShards(tmp_path / "partial", feedback_key(config, [tiny_model]), config.to_dict())
    run(prompts[:3], shards)  # batches [p0, p1] and [p2]
    batches = _sampled_batches(monkeypatch)
    assert _answers(run(prompts, shards)) == _answers(expected)
    assert batches == [["p2", "p3"], ["p4"]]
    batches.clear()
    renamed = [dataclasses.replace(prompts[0], id="q0"), *prompts[1:]]
    with pytest.warns(UserWarning, match=r"for other prompts \(prompt 1 was 'p0', is 'q0' now\): starting over"):
        run(renamed, shards)
    assert batches == [["q0", "p1"], ["p2", "p3"], ["p4"]]
    batches.clear()
    fewer = run(renamed[:3], shards)  # a lowered --limit keeps the saved batches that end within it
    assert batches == [["p2"]] and [f.id for f in fewer] == ["q0", "p1", "p2"]


@pytest.mark.slow
def test_a_finished_runs_feedback_is_taken_as_its_saved_batches(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run clears its batches: `feedback --limit` raised (or lowered) on its output sampled every
    prompt again. Its feedback file now stands for the batches, where it holds this run's first prompts."""
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer.feedback import FeedbackShards, feedback_key, write_feedback

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((40 * i, 90, 20)), "describe the image") for i in range(5)]
    config = FeedbackConfig(num_samples=2, max_tokens=4, drop_truncated=False, temperature=1.0, seed=4, prompt_batch=2)
    labeler = ControlledLabeler(lambda q: len(q) % 3 == 0)
    key = feedback_key(config, [tiny_model])

    def run(items: list[PromptItem], finished: Path | None):
        shards = FeedbackShards(tmp_path / "partial", key, config.to_dict(), finished=finished)
        result = collect_feedback(model, processor, items, config, labeler=labeler, progress=False, shards=shards)
        shards.clear()  # as the command does once feedback.parquet is written
        return result

    expected = run(prompts, None)
    finished = write_feedback(tmp_path / "feedback.parquet", run(prompts[:3], None))
    batches = _sampled_batches(monkeypatch)
    assert _answers(run(prompts, finished)) == _answers(expected)
    assert batches == [["p2", "p3"], ["p4"]]  # [p0, p1] reused; the short [p2] is sampled again with p3
    batches.clear()
    assert _answers(run(prompts[:2], finished)) == _answers(expected[:2]) and batches == []  # a lowered --limit
    batches.clear()
    renamed = [dataclasses.replace(prompts[0], id="q0"), *prompts[1:]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(renamed, finished)  # other prompts: the file is not this run's, and no saved batches are talked of
    assert batches == [["q0", "p1"], ["p2", "p3"], ["p4"]]
    assert not [w for w in caught if "starting over" in str(w.message)]


@pytest.mark.slow
def test_feedback_with_a_raised_limit_samples_only_the_prompts_it_adds(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's side: its finished output's feedback.parquet is handed on when made with the same settings."""
    import json

    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png((70 * i, 30, 30)))
    lines = [json.dumps({"id": f"p{i}", "image": f"{i}.png", "question": "describe the image"}) for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    batches = _sampled_batches(monkeypatch)
    args = ["feedback", str(tmp_path / "prompts.jsonl"), "--model", str(tiny_model), "-o", str(tmp_path / "out")]
    args += ["--samples", "2", "--max-tokens", "2", "--no-progress", "--set", "feedback.prompt_batch=1"]
    for limit, sampled in (("2", [["p0"], ["p1"]]), ("3", [["p2"]])):
        with pytest.warns(UserWarning, match=f" of {2 * int(limit)} candidates reached max_tokens"):
            result = CliRunner().invoke(app, [*args, "--limit", limit])  # the reused batches' truncations count
        assert result.exit_code == 0, result.output
        assert batches == sampled, limit
        batches.clear()


@pytest.mark.slow
def test_a_prompt_too_long_for_the_model_is_left_out_before_sampling_and_named(tiny_model: Path) -> None:
    from rlaifv.reward.models import load_model, load_processor

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    long_question = "describe " + "the image very carefully " * 200
    prompts = [
        PromptItem("short", png((10, 0, 200)), "describe the image"),
        PromptItem("long", png((90, 0, 200)), long_question),
    ]
    config = FeedbackConfig(num_samples=2, max_tokens=4, drop_truncated=False, temperature=1.0)
    labeler = ControlledLabeler(bool)
    with pytest.warns(UserWarning, match=r"1 of 2 prompts left out: too long for the model .*'long'"):
        result = collect_feedback(model, processor, prompts, config, labeler=labeler, progress=False)
    assert [f.id for f in result] == ["short"]
    with pytest.raises(DataError, match="no prompt fits the model"):
        collect_feedback(model, processor, prompts[1:], config, labeler=labeler, progress=False)


def test_why_no_pairs_names_what_removed_them() -> None:
    from rlaifv.trainer.preference_pairs import PairStats, why_no_pairs

    config = PairConfig()
    assert "raise the temperature" in why_no_pairs(PairStats(prompts=3), config)
    said = why_no_pairs(PairStats(prompts=3, candidate_pairs=13, length_removed=6), config)
    assert "6 removed by length balancing" in said and "pairs.length_balance=false" in said
    assert "temperature" not in said
    said = why_no_pairs(PairStats(prompts=1, candidate_pairs=4, capped=2, length_removed=2), config)
    assert "2 over pairs.max_pairs_per_prompt=2" in said and "2 removed by length balancing" in said


def test_a_feedback_output_folder_is_read_as_its_pairs(tmp_path) -> None:
    """`train dpo feedback/` read feedback.parquet too and failed on its missing 'chosen' column."""
    from rlaifv.trainer.data import read_preferences, write_preferences
    from rlaifv.trainer.errors import DataError

    feedback = _feedback(ControlledLabeler(lambda q: "red circle" in q))
    rows, _ = build_pairs([feedback], PairConfig(max_pairs_per_prompt=2, length_balance=False))
    write_feedback(tmp_path / "feedback.parquet", [feedback])
    with pytest.raises(DataError, match="selected no pairs"):
        read_preferences(tmp_path, progress=False)
    write_preferences(tmp_path / "pairs.parquet", rows, origin={})
    assert [r.chosen for r in read_preferences(tmp_path, progress=False)] == [r.chosen for r in rows]


def test_chinese_and_japanese_answers_are_counted_in_characters() -> None:
    """Whitespace words made a two-sentence Chinese answer one word: length balancing never saw a shorter chosen
    answer and near duplicates scored 0."""
    from rlaifv.trainer.preference_pairs import _words

    assert len(_words("一只猫在桌子上。它是红色的。")) == 12
    assert _words("A red car,\tnext to a tree.") == ["a", "red", "car,", "next", "to", "a", "tree."]
    assert _words("猫 and a cat") == ["猫", "and", "a", "cat"]
    assert ngram_jaccard("一只红色的猫在桌子上", "一只红色的猫在桌子上", 10) == 1.0
    assert ngram_jaccard("一只红色的猫在桌子上面", "一只红色的猫在桌子上方", 4) > 0.5


def _feedback_cli(tiny_model: Path, tmp_path: Path, *extra: str) -> tuple[Any, Path, list[str]]:
    """`rlaifv feedback` as an app, its output folder and the arguments of a small run over two prompts."""
    from trainer_testkit import preference_rows, write_rlaifv_parquet
    from typer import Typer

    from rlaifv.trainer.cli import feedback

    app = Typer()
    app.command()(feedback)
    data = write_rlaifv_parquet(
        tmp_path / "prompts.parquet", preference_rows([("a cat", "a dog"), ("a car", "a star")])
    )
    out = tmp_path / "fb"
    args = [str(data), "--model", str(tiny_model), "-o", str(out), "--samples", "3", "--max-tokens", "6"]
    args += ["--no-progress", "--set", "feedback.drop_truncated=false", *extra]
    return app, out, args


@pytest.mark.slow
def test_feedback_cli_rebuilds_only_the_pairs_when_its_feedback_is_already_there(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trying other pairs.* settings re-sampled every prompt from the start."""
    import json

    from typer.testing import CliRunner

    from rlaifv.trainer import feedback as feedback_module

    app, out, args = _feedback_cli(tiny_model, tmp_path)
    assert CliRunner().invoke(app, args).exit_code == 0
    stored = (out / "feedback.parquet").read_bytes()
    real, sampled = feedback_module.sample_candidates, []

    def sampling(*a, **k):
        sampled.append(1)
        return real(*a, **k)

    monkeypatch.setattr(feedback_module, "sample_candidates", sampling)
    result = CliRunner().invoke(app, [*args, "--set", "pairs.length_balance=false", "--set", "pairs.min_score_gap=2"])
    assert result.exit_code == 0, result.output
    assert "only the pairs are built again" in result.output and not sampled
    assert (out / "feedback.parquet").read_bytes() == stored
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["pairs"]["min_score_gap"] == 2
    result = CliRunner().invoke(app, [*args, "--samples", "2"])  # other feedback: sampled again
    assert result.exit_code == 0, result.output
    assert sampled and "only the pairs" not in result.output


class _Killed(Exception):
    """A stop at the point under test (a kill leaves what this leaves, without the clean-up after it)."""


@pytest.mark.slow
def test_feedback_stopped_before_its_pairs_is_reused_and_never_left_beside_earlier_pairs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between feedback.parquet and the pairs: the report naming the file was deleted and the saved batches
    cleared, so the rerun sampled everything again; with other settings, the earlier run's pairs.parquet stayed
    beside the new feedback and `train dpo` trained on them."""
    import json

    from typer.testing import CliRunner

    from rlaifv.trainer import preference_pairs

    app, out, args = _feedback_cli(tiny_model, tmp_path, "--set", "pairs.min_score_gap=0.01")

    def killed(*a, **k):
        raise _Killed

    monkeypatch.setattr(preference_pairs, "build_pairs", killed)
    assert isinstance(CliRunner().invoke(app, args).exception, _Killed)
    stored = (out / "feedback.parquet").read_bytes()
    monkeypatch.undo()
    sampled = _sampled_batches(monkeypatch)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sampled == [] and "only the pairs are built again" in result.output
    assert (out / "feedback.parquet").read_bytes() == stored
    assert (out / "pairs.parquet").is_file() and not (out / "feedback.partial").exists()
    assert json.loads((out / "report.json").read_text())["pairs"]["selected"] >= 1

    monkeypatch.setattr(preference_pairs, "build_pairs", killed)
    assert isinstance(CliRunner().invoke(app, [*args, "--samples", "2"]).exception, _Killed)
    assert sampled and (out / "feedback.parquet").read_bytes() != stored
    assert not (out / "pairs.parquet").exists() and not (out / "report.json").exists()


def test_a_damaged_saved_batch_is_sampled_again_not_a_stop_for_every_rerun(tmp_path: Path) -> None:
    """A saved batch a disk lost the end of was a DataError on each rerun until the folder was found and cleared."""
    from rlaifv.trainer.feedback import FeedbackShards

    prompts = [PromptItem(f"p{i}", png((40 * i, 0, 200)), "describe the image") for i in range(6)]
    shards = FeedbackShards(tmp_path / "partial", "key", {"num_samples": 2})
    assert shards.resume(prompts, 2) == ([], 0, 0)
    for start in (0, 2, 4):
        feedback = [
            PromptFeedback(p.id, p.image, p.question, [_answer(f"a {p.id}", 0.0)]) for p in prompts[start : start + 2]
        ]
        shards.add(start, feedback, sampled=4, truncated=1)
    damaged = tmp_path / "partial" / "batch-000000002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    with pytest.warns(UserWarning, match=r"batch-000000002.parquet cannot be read .* it and those after it are"):
        done, sampled, truncated = shards.resume(prompts, 2)
    assert [f.id for f in done] == ["p0", "p1"] and (sampled, truncated) == (4, 1)
    assert [f.name for f in sorted((tmp_path / "partial").glob("batch-*"))] == [
        "batch-000000000.json",
        "batch-000000000.parquet",
    ]


def test_feedback_batches_saved_before_content_fingerprints_go_on_while_the_models_files_are_unchanged(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier version keyed the saved batches by its fingerprint (weight files by size and mtime): after the
    upgrade a stopped run started over. They are taken while that fingerprint still describes the files, then
    kept under the content's key; not once the weights were rewritten."""
    import json
    import os
    import shutil

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.feedback import FeedbackShards, feedback_key, feedback_keys

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = FeedbackConfig(num_samples=2, seed=4, prompt_batch=2)
    prompts = [PromptItem(f"p{i}", png((50 * i, 9, 9)), "describe the image") for i in range(3)]
    answer = ScoredAnswer("a red circle", score=1.0, rejected=0, repeated=0)
    saved = [PromptFeedback(p.id, p.image, p.question, [answer]) for p in prompts[:2]]

    def stopped_before_the_upgrade(folder: Path) -> None:
        with monkeypatch.context() as earlier:
            earlier.setattr(dpo_module, "model_fingerprint", dpo_module.legacy_model_fingerprint)
            shards = FeedbackShards(folder, feedback_key(config, [model]), config.to_dict())
        shards.resume(prompts, 2)
        shards.add(0, saved, 4, 1)

    stopped_before_the_upgrade(tmp_path / "partial")
    done, sampled, truncated = FeedbackShards(
        tmp_path / "partial", feedback_keys(config, [model]), config.to_dict()
    ).resume(prompts, 2)
    assert [f.id for f in done] == ["p0", "p1"] and (sampled, truncated) == (4, 1)
    assert json.loads((tmp_path / "partial" / "run_key").read_text())["key"] == feedback_key(config, [model])

    stopped_before_the_upgrade(tmp_path / "other")
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.warns(UserWarning, match=r"sampled from other models \(or the models changed\): starting over"):
        assert FeedbackShards(tmp_path / "other", feedback_keys(config, [model]), config.to_dict()).resume(
            prompts, 2
        ) == ([], 0, 0)
