"""A pair asked to stop (`ModelPair.abort`) ends its sampling at the next decoding step."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rlaifv.reward.errors import Aborted, RewardError
from rlaifv.reward.sampling import SamplingParams


def test_sampling_stops_at_the_next_step_once_aborted(tiny_bundle: Path) -> None:
    from rlaifv.reward import load_bundle

    pair = load_bundle(tiny_bundle)  # its own: the session's pair must not stay aborted
    prompt = pair.encode([Image.new("RGB", (32, 32), (200, 0, 0))], "What is in the image?")
    params = [SamplingParams(max_tokens=4, seed=0)]
    assert len(pair.sample([prompt], [2], params)[0]) == 2
    pair.abort.set()
    with pytest.raises(Aborted, match="stopped at step 0 of 4"):
        pair.sample([prompt], [2], params)
    assert issubclass(Aborted, RewardError)
