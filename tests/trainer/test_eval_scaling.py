"""Selection rules, the candidate cache and the scaling curve; generation from the shipped bundle in process
and from a running service."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlaifv.cli.main import app
from rlaifv.trainer.evaluation.candidates import CandidateCache, Prompt, Sampled, Sampling, pick, sample_all
from rlaifv.trainer.evaluation.generators import BundleGenerator, ServiceGenerator
from rlaifv.trainer.evaluation.scaling import curve, parse_ns

DATA = Path(__file__).parent / "data" / "eval"


def test_pick_rules() -> None:
    s = Sampled(texts=["a", "b", "c", "d"], dpo=[0.1, 0.5, 0.5, 0.9], claims=[-1.0, 0.0, math.nan, 0.0])
    assert [pick(s, "dpo", n) for n in (1, 2, 3, 4)] == [0, 1, 1, 3]  # prefixes; ties to the lower index
    assert [pick(s, "claims", n) for n in (1, 2, 3, 4)] == [0, 1, 1, 1]  # NaN never wins
    assert pick(s, "first", 4) == 0
    draws = [pick(s, "random", 4, seed=seed, prompt_id="p") for seed in range(40)]
    assert set(draws) == {0, 1, 2, 3} and draws == [
        pick(s, "random", 4, seed=seed, prompt_id="p") for seed in range(40)
    ]
    with pytest.raises(ValueError):
        pick(s, "dpo", 5)
    with pytest.raises(ValueError, match="claims"):
        pick(Sampled(texts=["a"], dpo=[0.0]), "claims", 1)


def test_parse_ns() -> None:
    assert parse_ns("8,1,2,2") == [1, 2, 8]
    for bad in ("", "0,1", "a"):
        with pytest.raises(ValueError):
            parse_ns(bad)


def test_curve_by_hand() -> None:
    """Metric: the share of picked answers that are 'bad'; two prompts, four candidates each."""
    prompts = [Prompt("p0", b"", "q"), Prompt("p1", b"", "q")]
    sampled = [
        Sampled(texts=["bad", "good", "bad", "good"], dpo=[0, 1, 2, 0], claims=[0, 1, 0, 1]),
        Sampled(texts=["bad", "bad", "good", "bad"], dpo=[0, 0, 1, 0], claims=[0, -1, 0, 1]),
    ]

    def metric(texts: Sequence[str]) -> dict[str, float]:
        return {"bad": sum(t == "bad" for t in texts) / len(texts)}

    result = curve(prompts, sampled, [1, 2, 4], ["dpo", "claims", "random"], metric, random_draws=200)
    # dpo picks: N=1 (0, 0) -> 1.0; N=2 (1, 0) -> 0.5; N=4 (2, 2) -> bad + good = 0.5
    assert [result["dpo"][n]["bad"] for n in ("1", "2", "4")] == [1.0, 0.5, 0.5]
    # claims picks: N=1 (0, 0); N=2 (1, 0); N=4 (1, 3) -> good + bad
    assert [result["claims"][n]["bad"] for n in ("1", "2", "4")] == [1.0, 0.5, 0.5]
    # random: N=1 is the first candidate; N=4 averages to (2/4 + 3/4) / 2 = 0.625 give or take the draws
    assert result["random"]["1"]["bad"] == 1.0
    assert abs(result["random"]["4"]["bad"] - 0.625) < 0.1


def test_cache_serves_smaller_n(tmp_path: Path) -> None:
    cache = CandidateCache(tmp_path / "c.jsonl")
    sampled = Sampled(texts=["a", "b", "c", "d"], dpo=[1, 2, 3, 4])
    cache.put("k", sampled)
    again = CandidateCache(tmp_path / "c.jsonl")  # from the file
    assert again.get("k", 2, claims=False) == Sampled(texts=["a", "b"], dpo=[1, 2])
    assert again.get("k", 8, claims=False) is None  # more than were sampled
    assert again.get("k", 2, claims=True) is None  # no claims rewards stored
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write('{"key": "x", "sampl')  # a line cut by a crash is skipped, and the next write starts a new line
    third = CandidateCache(tmp_path / "c.jsonl")
    third.put("y", sampled)
    assert CandidateCache(tmp_path / "c.jsonl").get("y", 4, claims=False) == sampled


@pytest.fixture(scope="module")
def shapes_bundle() -> Path:
    from rlaifv.service.default_model import default_bundle

    return default_bundle()


class Counting:
    """The real generator, with the prompts it was asked to sample recorded."""

    def __init__(self, inner: BundleGenerator) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.asked: list[str] = []

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        self.asked += [p.id for p in prompts]
        return self.inner.sample(prompts, n, sampling, claims)


@pytest.fixture(scope="module")
def shapes_prompts() -> list[Prompt]:
    from rlaifv.trainer.shapes.world import CAPTION_QUESTION, scenes

    return [Prompt(f"s{i}", s.render(), CAPTION_QUESTION) for i, s in enumerate(scenes(5, 2))]


@pytest.mark.slow
def test_bundle_generator_and_cache(shapes_bundle: Path, shapes_prompts: list[Prompt], tmp_path: Path) -> None:
    generator = Counting(BundleGenerator.load(shapes_bundle))
    sampling = Sampling(temperature=1.0, max_tokens=16, seed=3)
    cache = CandidateCache(tmp_path / "c.jsonl")
    first, fresh = sample_all(generator, shapes_prompts, 4, sampling, claims=True, cache=cache, progress=False)
    assert fresh == 2 and all(len(s.texts) == 4 and s.claims is not None for s in first)
    assert all(c <= 0 for s in first for c in s.claims or [])  # claims reward: minus rejected claims
    # smaller n and fewer rewards come from the cache; a new prompt is sampled alone
    extra = Prompt("s9", shapes_prompts[0].image, "Describe the image.")
    second, fresh = sample_all(generator, [*shapes_prompts, extra], 2, sampling, cache=cache, progress=False)
    assert fresh == 1 and generator.asked == ["s0", "s1", "s9"]
    assert [s.texts for s in second[:2]] == [s.texts[:2] for s in first]
    # the same seed gives the same samples, whatever else is in the batch
    alone, _ = sample_all(generator, shapes_prompts[1:2], 4, sampling, claims=True, progress=False)
    assert alone[0].texts == first[1].texts


@pytest.mark.slow
def test_shapes_scaling_command(shapes_bundle: Path, tmp_path: Path) -> None:
    out, png, doc = tmp_path / "s.json", tmp_path / "fig" / "s.png", tmp_path / "doc.md"
    doc.write_text("before\n<!-- begin: tiny -->\nold\n<!-- end: tiny -->\nafter\n")
    args = ["eval", "shapes", "--images", "3", "--best-of", "1,2,4", "--max-tokens", "24", "--random-draws", "2"]
    args += ["--name", "tiny", "-o", str(out), "--plot", str(png), "--doc", str(doc)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["metrics"]["ns"] == [1, 2, 4] and report["metrics"]["sampled_now"] == 3
    assert set(report["metrics"]["curve"]) == {"dpo", "claims", "random"}
    for rule in ("dpo", "claims", "random"):  # N=1: every rule takes the one candidate
        assert report["metrics"]["curve"][rule]["1"] == report["metrics"]["curve"]["dpo"]["1"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert text.startswith("before\n<!-- begin: tiny -->\n") and text.endswith("<!-- end: tiny -->\nafter\n")
    assert "| chair_i % | dpo |" in text and "](fig/s.png)" in text and "old" not in text
    again = CliRunner().invoke(app, args)  # a rerun samples nothing
    assert again.exit_code == 0 and json.loads(out.read_text())["metrics"]["sampled_now"] == 0


def _png_b64(colour: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
@pytest.mark.integration
def test_service_generator_and_objhal_generation(shapes_bundle: Path, tmp_path: Path) -> None:
    """Answers from a running service (n split across requests), scored as Object HalBench answers."""
    from rlaifv.testing.server import LiveServer

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"image_id": 101, "image": _png_b64((200, 40, 40)), "question": "Describe the image."}]
    rows += [{"image_id": 103, "image": _png_b64((40, 40, 200)), "question": "Describe the image."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LiveServer(shapes_bundle, max_n=2) as server:
        generator = ServiceGenerator(server.url, max_n=2)
        sampled = generator.sample([Prompt("p", base64.b64decode(rows[0]["image"]), "Describe the image.")], 3,
                                   Sampling(max_tokens=16), claims=True)  # fmt: skip
        assert len(sampled[0].texts) == 3 and len(sampled[0].claims or []) == 3
        assert generator.fingerprint == ServiceGenerator(server.url).fingerprint  # stable across calls
        out = tmp_path / "objhal.json"
        args = ["eval", "objhal", "--coco", str(DATA / "coco"), "--prompts", str(prompts), "--service", server.url]
        options = ["-n", "3", "--select", "dpo", "--service-max-n", "2", "--max-tokens", "16"]
        result = CliRunner().invoke(app, [*args, *options, "-o", str(out)])
        # without --max-tokens, 512 was sent: over a default server's RLAIFV_MAX_TOKENS (256), every request a 400
        plain = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "plain.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["metrics"]["answers"] == 2 and report["settings"]["select"] == "dpo"
    assert len(CandidateCache(tmp_path / "objhal.candidates.jsonl").store.rows) == 2
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "plain.json").read_text())["settings"]["sampling"]["max_tokens"] is None


def test_a_scaling_run_with_failed_judgements_exits_2() -> None:
    """Each point of the curve records its failures; a run with any is incomplete, as a single evaluation is."""
    import typer

    from rlaifv.cli.eval import _fail_if_incomplete

    clean = {"curve": {"dpo": {"1": {"score": 3.0, "failed": 0}, "2": {"score": 3.5, "failed": 0}}}}
    _fail_if_incomplete(clean)
    for key in ("failed", "extraction_failed"):
        broken = {"curve": {"dpo": {"1": {"score": 0.0, key: 1.0}}, "random": {"1": {"score": 2.0}}}}
        with pytest.raises(typer.Exit) as info:
            _fail_if_incomplete(broken)
        assert info.value.exit_code == 2
