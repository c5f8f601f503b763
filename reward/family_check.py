"""A load-time check that the shared-prefix engine is exact for a model family it has no rules for.

Families in `reward.families.FAMILIES` are covered by per-family exactness
tests. Any other image-text-to-text model is served with the default rules
(1-D positions, per-image tensors batched by shape), which is right for most
but not all: a model whose cache is not a plain KV cache (hybrid convolution
or state-space layers), whose processor returns a sequence-aligned tensor the
engine does not know (Mllama's `cross_attention_mask`, before it got its
rules), or whose mask depends on inputs it reads only on the first step would
give an error on the first request, or worse, plausible but wrong rewards.

So before serving such a model the engine is compared with the model's own
`generate` on synthetic prompts: the tokens `generate` picks greedily and the
log-probs of its raw logits are the ground truth (each family's cache, masks,
positions and sequence-aligned inputs are handled by its own generation code);
the engine's scoring pass and its sampler must reproduce them within a
tolerance set by the dtype. A failure refuses the model at load time with the
measured difference, instead of at the first request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.families import FAMILIES, batch_groups, family_of, model_type, stack_vision
from rlaifv.reward.logprobs import answer_logprobs, model_device
from rlaifv.reward.prompt import EncodedPrompt, encode_prompt
from rlaifv.reward.sampling import SamplingParams, sample_answers

if TYPE_CHECKING:
    from rlaifv.reward.model_pair import ModelPair

log = logging.getLogger(__name__)

FamilyCheck = Literal["refuse", "warn"]
"""What a failed check does at load: refuse the model, or warn and serve it."""

PROBE_TOKENS = 6
# Max |log-prob difference| allowed: float32 paths differ by reduction order only (~1e-6 seen). Half precision
# rounds a padded batch differently from one prompt alone, by an amount that depends on the model, its kernels and
# the device; the model's own `generate` measures it (`half_tolerance`): its left-padded batch of the two
# same-shape prompts against each alone. The bound is HALF_NOISE_FACTOR times that, within [HALF_FLOOR,
# HALF_CEILING]: on tiny bfloat16 models the noise was 0.002-0.004 while Mllama without its continued
# cross-attention mask (a structural error) differed by 0.04.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_FLOOR = 0.02
HALF_CEILING = 0.25
HALF_NOISE_FACTOR = 8.0


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured: the worst |log-prob difference| of scoring and of sampling, and its bound."""

    model_type: str
    scoring: float
    sampling: float
    tolerance: float

    @property
    def exact(self) -> bool:
        return max(self.scoring, self.sampling) <= self.tolerance


def needs_probe(model: Any) -> bool:
    """Only families without their own rules and tests are probed (a bundle of a known family loads as before)."""
    return model_type(model) not in FAMILIES


def probe_images() -> list[Any]:
    """Two square images and a wide one: with questions of different lengths (`PROBE_QUESTIONS`), the squares
    share a batch group with left padding whatever the family's rules, and the wide one has another shape."""
    from PIL import Image

    square = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    other = Image.radial_gradient("L").resize((64, 64)).convert("RGB")
    wide = Image.radial_gradient("L").resize((96, 48)).convert("RGB")
    return [square, other, wide]


PROBE_QUESTIONS = ("Describe the image.", "What is in this picture? Answer in one short sentence.", "Describe it.")


def probe_prompts(processor: Any, accepts_images: bool) -> list[EncodedPrompt]:
    if not accepts_images:
        return [encode_prompt(processor, [], question) for question in PROBE_QUESTIONS]
    return [encode_prompt(processor, [image], q) for image, q in zip(probe_images(), PROBE_QUESTIONS, strict=True)]


@contextmanager
def plain_generation_config(model: Any, pad_id: int) -> Iterator[None]:
    """The model's generation config reduced to its special tokens for the duration: `generate` applies the
    model's own decoding defaults (repetition penalty, n-gram blocking, beams) even to greedy calls, and the
    engine's raw log-probs are compared with the raw greedy path."""
    from transformers import GenerationConfig

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = owner.generation_config
    ids = {key: getattr(saved, key, None) for key in ("bos_token_id", "eos_token_id", "decoder_start_token_id")}
    owner.generation_config = GenerationConfig(**ids, pad_token_id=pad_id)
    try:
        yield
    finally:
        owner.generation_config = saved


@torch.no_grad()
def generate_truth(model: Any, prompt: EncodedPrompt, pad_id: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the model's own `generate` and the raw next-token log-distribution before each
    ((T, V) float32)."""
    return greedy_generate(model, [prompt], pad_id)[0]


def greedy_generate(model: Any, prompts: Sequence[EncodedPrompt], pad_id: int) -> list[tuple[list[int], torch.Tensor]]:
    """`generate_truth` for prompts batched in one left-padded `generate` call (the model's own padding)."""
    device = model_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt.input_ids.to(device)
        mask[row, width - len(prompt) :] = 1
    with plain_generation_config(model, pad_id):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **stack_vision(prompts, width, device, next(model.parameters()).dtype),
            do_sample=False,
            max_new_tokens=PROBE_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack(out.logits, dim=1).float()
    results = []
    for row in range(len(prompts)):
        tokens = out.sequences[row, width:].tolist()
        results.append((tokens, torch.log_softmax(logits[row, : len(tokens)], dim=-1)))
    return results


def _worst(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The largest |a - b| over all pairs; infinite where either side is not finite (a NaN compares as nothing)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not len(x):
            continue
        diff = (x.float().cpu() - y.float().cpu()).abs()
        if not bool(torch.isfinite(diff).all()):
            return float("inf")
        worst = max(worst, float(diff.max()))
    return worst


def probe(model: Any, processor: Any, *, accepts_images: bool, pad_id: int, stop_ids: Sequence[int]) -> ProbeResult:
    """Compare the engine's scoring and sampling with `generate` on the synthetic prompts (batched together)."""
    prompts = probe_prompts(processor, accepts_images)
    result: ProbeResult = compare_with_generate(model, prompts, pad_id=pad_id, stop_ids=stop_ids)
    return result


@torch.no_grad()
def compare_with_generate(
    model: Any, prompts: Sequence[EncodedPrompt], *, pad_id: int, stop_ids: Sequence[int]
) -> ProbeResult:
    """The engine on `prompts` (one batch) against the model's own greedy `generate` on each alone, in eval mode.

    A failure to run either side is a `ModelLoadError` saying which side failed (the engine's own refusals, such
    as an unknown mrope family, pass through as they are)."""
    dtype = next(model.parameters()).dtype
    kind = model_type(model) or "unknown"
    with evaluating(model):
        with _failures_named(model, "could not run the model's own generate, its ground truth"):
            truths = [generate_truth(model, prompt, pad_id) for prompt in prompts]
            tolerance = TOLERANCE[dtype] if dtype in TOLERANCE else half_tolerance(model, prompts, truths, pad_id)
        with _failures_named(model, "could not run one forward pass", cannot_run=True):
            refuse_unforkable_cache(model, prompts[0])
        with _failures_named(model, "could not run it through the shared-prefix engine", cannot_run=True):
            scored = answer_logprobs(model, prompts, [[tokens] for tokens, _ in truths], pad_id)
            # Two greedy samples per prompt exercise the prefix fork. Up to the first token where a sample leaves
            # `generate`'s path (a stop token, or in half precision a near tie) it sees the same context, so each
            # of its log-probs up to and including that token is the truth's distribution at the token it picked.
            params = [SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, seed=0)] * len(prompts)
            samples = sample_answers(model, prompts, [2] * len(prompts), params, stop_ids=stop_ids, pad_id=pad_id)
    scoring = _worst([group[0] for group in scored], [_gathered(rows, tokens) for (tokens, rows) in truths])
    got, want = [], []
    for group, (tokens, rows) in zip(samples, truths, strict=True):
        for sample in group:
            n = min(len(sample.token_ids), len(tokens))
            same = next((i for i in range(n) if sample.token_ids[i] != tokens[i]), n)
            if same < n and dtype in TOLERANCE:
                return ProbeResult(kind, scoring, float("inf"), tolerance)
            seen = min(same + 1, n)
            got.append(sample.logprobs[:seen])
            want.append(_gathered(rows[:seen], sample.token_ids[:seen]))
    return ProbeResult(kind, scoring, _worst(got, want), tolerance)


class EngineCannotRunError(ModelLoadError):
    """The engine cannot run the model at all (its forward or the shared-prefix engine fails on it): it cannot be
    served, so `family_check=warn`, meant for log-probs that differ, refuses it too (served, it failed at warm-up
    or at the first request with a bare AttributeError)."""


class UnforkableCacheError(EngineCannotRunError):
    """The model's cache holds states the engine cannot copy for N samples."""


def refuse_unforkable_cache(model: Any, prompt: EncodedPrompt) -> None:
    """Raise `UnforkableCacheError` when one forward pass over `prompt` leaves recurrent or convolution states in
    the cache (LFM2's hybrid layers, transformers' `LinearAttentionCacheLayerMixin`): the shared-prefix engine
    forks a prefix's keys and values, which such a state is not."""
    from transformers import cache_utils

    stateful = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    if stateful is None:  # a transformers without such layers
        return
    device, dtype = model_device(model), next(model.parameters()).dtype
    ids = prompt.input_ids[None].to(device)
    vision = stack_vision([prompt], ids.shape[1], device, dtype)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision, use_cache=True)
    layers = getattr(getattr(out, "past_key_values", None), "layers", None) or []
    kinds = sorted({type(layer).__name__ for layer in layers if isinstance(layer, stateful)})
    if kinds:
        raise UnforkableCacheError(
            f"{_unknown(model)}, and its cache holds recurrent or convolution states ({', '.join(kinds)}, as a"
            " hybrid model's), which the shared-prefix engine cannot fork for N samples: it cannot serve this model"
        )


@contextmanager
def _failures_named(model: Any, what: str, *, cannot_run: bool = False) -> Iterator[None]:
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        error = EngineCannotRunError if cannot_run else ModelLoadError
        raise error(f"{_unknown(model)} and the load-time check {what}: {type(exc).__name__}: {exc}") from exc


@torch.no_grad()
def half_tolerance(
    model: Any, prompts: Sequence[EncodedPrompt], truths: Sequence[tuple[list[int], torch.Tensor]], pad_id: int
) -> float:
    """The bound for a half-precision model: its own `generate` on a left-padded batch of the first two prompts
    (one image shape, different lengths) against each prompt alone, times HALF_NOISE_FACTOR, clamped."""
    pair = list(prompts[:2])
    if len(pair) < 2 or len(batch_groups(pair, family_of(model))) > 1:
        return HALF_CEILING
    noise = 0.0
    for (batched, rows), (tokens, alone) in zip(greedy_generate(model, pair, pad_id), truths[:2], strict=True):
        same = next((i for i in range(min(len(tokens), len(batched))) if batched[i] != tokens[i]), len(tokens))
        seen = min(same + 1, len(tokens), len(rows))
        noise = max(noise, _worst([_gathered(rows, tokens[:seen])], [_gathered(alone, tokens[:seen])]))
    return min(HALF_CEILING, max(HALF_FLOOR, HALF_NOISE_FACTOR * noise))


def _gathered(rows: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    return rows[torch.arange(len(tokens)), torch.tensor(list(tokens), dtype=torch.long)]


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Eval mode for the duration (dropout off: a policy still in train mode is probed as it will serve)."""
    training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def check_unverified_family(
    model: Any,
    processor: Any,
    *,
    accepts_images: bool,
    pad_id: int,
    stop_ids: Sequence[int],
    on_failure: FamilyCheck = "refuse",
) -> ProbeResult | None:
    """Probe a model of a family without rules; refuse it (`ModelLoadError`) if the engine cannot serve it exactly,
    or with `on_failure="warn"` log why and serve it (an operator who has checked the model otherwise)."""
    if not needs_probe(model):
        return None
    try:
        result = require_exact(
            model, probe(model, processor, accepts_images=accepts_images, pad_id=pad_id, stop_ids=stop_ids)
        )
    except ModelLoadError as exc:
        if on_failure == "refuse" or isinstance(exc, EngineCannotRunError):
            raise
        log.warning("serving a model the load-time check refused (family_check=warn): %s", exc)
        return None
    log.info(
        "model type %r has no family rules; the load-time check found the engine exact"
        " (max |log-prob difference| scoring %.2g, sampling %.2g, tolerance %g)",
        result.model_type,
        result.scoring,
        result.sampling,
        result.tolerance,
    )
    return result


def require_exact(model: Any, result: ProbeResult) -> ProbeResult:
    """`result`, if exact; else a `ModelLoadError` with the measured difference."""
    if not result.exact:
        sampling = (
            "picks other greedy tokens" if result.sampling == float("inf") else f"differs by {result.sampling:.3g}"
        )
        raise ModelLoadError(
            f"{_unknown(model)} and the shared-prefix engine disagrees with the model's own generate: scoring"
            f" log-probs differ by {result.scoring:.3g}, sampling {sampling} (tolerance {result.tolerance:g});"
            " serving it would give wrong rewards"
        )
    return result


def _unknown(model: Any) -> str:
    kind = model_type(model) or "unknown"
    if kind in FAMILIES:
        return f"model type {kind!r} ({FAMILIES[kind].name} rules)"
    return f"model type {kind!r} has no rules in this engine (known: {', '.join(sorted(FAMILIES))})"


def check_pair(pair: ModelPair) -> dict[str, ProbeResult]:
    """Probe both models of a loaded pair, registered families included (`rlaifv bundle check`): one's own
    checkpoint, dtype, device and transformers release against the model's own generate."""
    kwargs: dict[str, Any] = {"accepts_images": pair.accepts_images, "pad_id": pair.pad_id, "stop_ids": pair.stop_ids}
    results = {"policy": probe(pair.policy, pair.processor, **kwargs)}
    if pair.reference is not pair.policy:
        with pair.reference_model() as reference:
            results["reference"] = probe(reference, pair.processor, **kwargs)
    return results
