import math

import pytest

from rlaifv.reward.scoring import RewardConfig, implicit_reward, select_best, top_k


def test_mean_normalised_reward_matches_hand_computation():
    # policy sum -10.0, reference sum -12.5 over T=5 tokens, beta 0.1: 0.1 * 2.5 / 5 = 0.05
    assert implicit_reward(-10.0, -12.5, 5, RewardConfig()) == pytest.approx(0.05, abs=1e-12)


def test_sum_normalisation_is_the_plain_dpo_reward():
    assert implicit_reward(-10.0, -12.5, 5, RewardConfig(normalize="sum")) == pytest.approx(0.25, abs=1e-12)
    assert implicit_reward(-10.0, -12.5, 5, RewardConfig(beta=1.0, normalize="sum")) == pytest.approx(2.5)


def test_sign_policy_above_reference_is_positive():
    assert implicit_reward(-1.0, -2.0, 1, RewardConfig()) > 0
    assert implicit_reward(-2.0, -1.0, 1, RewardConfig()) < 0


def test_mean_and_sum_can_rank_differently():
    # A short answer with a small total gain vs a long one with a larger total but smaller per-token gain.
    short = (-3.0, -3.5, 2)  # ratio 0.5, mean 0.25
    long = (-30.0, -31.0, 20)  # ratio 1.0, mean 0.05
    mean = [implicit_reward(*c, RewardConfig()) for c in (short, long)]
    total = [implicit_reward(*c, RewardConfig(normalize="sum")) for c in (short, long)]
    assert select_best(mean) == 0
    assert select_best(total) == 1


def test_ties_break_to_lower_index_and_nan_never_wins():
    assert select_best([0.1, 0.3, 0.3, 0.2]) == 1
    assert select_best([math.nan, -5.0, -5.0]) == 1
    assert select_best([math.nan, math.nan]) == 0
    assert top_k([0.1, 0.3, 0.3, math.nan, 0.2], 3) == [1, 2, 4]


@pytest.mark.parametrize("bad", [{"beta": 0}, {"beta": -1}, {"normalize": "max"}, {"mode": "other"}, {"extra": 1}])
def test_reward_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        RewardConfig(**bad)


def test_zero_tokens_is_an_error():
    with pytest.raises(ValueError):
        implicit_reward(0.0, 0.0, 0, RewardConfig())
    with pytest.raises(ValueError):
        select_best([])


def test_the_same_answer_twice_gets_one_score_and_the_lower_index_wins():
    """The same tokens scored in two rows of a batch differ by float noise; a later copy won on noise."""
    from rlaifv.reward.results import Candidate, Ranking

    def candidate(text, reward, ids, finish="stop"):
        return Candidate(
            text=text, reward=reward, implicit_reward=reward, policy_logprob=-1.0 + reward,
            reference_logprob=-1.0, num_tokens=3, finish_reason=finish, token_ids=ids,
        )  # fmt: skip

    ranking = Ranking.of(
        [
            candidate("a red circle.", 0.5, [4, 5, 6]),
            candidate("a dog.", 0.2, [7, 8]),
            candidate("a red circle.", 0.5 + 1e-8, [4, 5, 6]),  # the same answer, noise above the first
            candidate("a red circle.", 0.9, [4, 5, 6], finish="length"),  # the same text cut by the limit: another
        ],
        {"score_s": 1.0},
    )
    assert ranking.rewards == [0.5, 0.2, 0.5, 0.9] and ranking.best_index == 3
    assert ranking.candidates[2].policy_logprob == ranking.candidates[0].policy_logprob
    assert ranking.candidates[2].finish_reason == "stop" and ranking.timings == {"score_s": 1.0}
    tie = Ranking.of([candidate("x", 0.1, [1]), candidate("x", 0.1 + 1e-9, [1])])
    assert tie.best_index == 0 and tie.rewards == [0.1, 0.1]
