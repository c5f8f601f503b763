import subprocess
import sys

from rlaifv import reward


def test_public_api_is_pinned():
    assert sorted(reward.__all__) == sorted(
        [
            "AnswerError",
            "BundleError",
            "BundleManifest",
            "Candidate",
            "ContextLengthError",
            "ImageError",
            "InvalidInputError",
            "ModelLoadError",
            "ModelPair",
            "Ranking",
            "RewardConfig",
            "RewardError",
            "SamplingParams",
            "implicit_reward",
            "load_bundle",
            "select_best",
        ]
    )
    for name in reward.__all__:
        obj = getattr(reward, name)  # lazy names import their module here
        assert obj.__name__ == name and obj.__module__.startswith("rlaifv.reward."), (name, obj)
    assert issubclass(reward.ImageError, reward.InvalidInputError)
    assert issubclass(reward.InvalidInputError, reward.RewardError)


def test_importing_reward_does_not_import_torch():
    code = "import sys, rlaifv.reward; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
