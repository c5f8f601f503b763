"""A micro-batched server answers concurrent best-of-n requests correctly for other model families.

Qwen2-VL and GLM-4.1V (3-axis mrope positions), Idefics3 and LLaVA-OneVision (a
wide image gets more crops: zero-padded crops under a pixel mask or cropped
back by image sizes), Mllama (cross-attention to the image, its mask sent with
every answer token) and OmniLMM are the ways a micro-batch of different prompts
can go wrong; each server's answers must equal the in-process pair's, request
by request, while the requests share batches.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from rlaifv.reward import load_bundle
from rlaifv.reward.bundle_create import create_bundle
from rlaifv.testing.server import LiveServer
from rlaifv.testing.tiny_families import build_tiny_family
from rlaifv.trainer.shapes.tiny_vlm import perturb_copy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "Describe the image."
REQUESTS = 12


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGES = [
    Image.new("RGB", (48, 48), (200, 30, 30)),
    Image.new("RGB", (96, 40), (30, 180, 60)),
    Image.new("RGB", (40, 72), (30, 60, 200)),
]


def _bundle(family: str, root: Path) -> Path:
    reference = build_tiny_family(family, root / "reference")
    policy = perturb_copy(reference, root / "policy")
    create_bundle(root / "bundle", policy=policy, reference=reference, name=f"tiny-{family}")
    return root / "bundle"


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "omnilmm", "mllama", "glm4v", "llava_onevision"])
async def test_concurrent_best_of_n_equals_in_process(family: str, tmp_path: Path) -> None:
    bundle = _bundle(family, tmp_path)
    pair = load_bundle(bundle)
    expected = [pair.best_of_n(IMAGES[i % 3], QUESTION, n=3, seed=i, max_tokens=6).rewards for i in range(REQUESTS)]
    with LiveServer(bundle, max_batch=8) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            before = _batch_totals((await client.get("/metrics")).text)

            async def one(i: int) -> httpx.Response:
                body = {
                    "images": [_data_url(IMAGES[i % 3])],
                    "question": QUESTION,
                    "n": 3,
                    "sampling": {"seed": i, "max_tokens": 6},
                }
                return await client.post("/v1/best-of-n", json=body)

            responses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(REQUESTS))), timeout=120)
            after = _batch_totals((await client.get("/metrics")).text)
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        rewards = [c["reward"] for c in response.json()["candidates"]]
        assert rewards == pytest.approx(expected[i], abs=1e-4), f"request {i}"
    batches, requests = (a - b for a, b in zip(after, before, strict=True))
    assert requests == REQUESTS and batches < requests, "requests queued together must share batches"


def _batch_totals(text: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    count = sum(s.value for s in samples if s.name == "rlaifv_batch_size_count")
    total = sum(s.value for s in samples if s.name == "rlaifv_batch_size_sum")
    return count, total
