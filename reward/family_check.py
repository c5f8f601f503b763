"""A load-time check that the shared-prefix engine is exact for a model family it has no rules for.

Families in `reward.families.FAMILIES` are covered by per-family exactness
tests. Any other image-text-to-text model is served with the default rules
(1-D positions, per-image tensors batched by shape), which is right for most
but not all: a model whose cache is not a plain KV cache (hybrid convolution
or state-space layers), whose processor returns a sequence-aligned tensor the
engine does not know (Mllama's `cross_attention_mask`), or whose mask depends
on inputs it reads only on the first step would give an error on the first
request, or worse, plausible but wrong rewards.

So before serving such a model the engine is compared with the model's own
`generate` on a synthetic image: the tokens `generate` picks greedily and the
log-probs of its raw logits are the ground truth (each family's cache, masks,
positions and sequence-aligned inputs are handled by its own generation code);
the engine's scoring pass and its sampler must reproduce them within a
tolerance set by the dtype. A failure refuses the model at load time with the
measured difference, instead of at the first request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.families import FAMILIES, model_type, stack_vision
from rlaifv.reward.logprobs import answer_logprobs, model_device, selective_log_softmax
from rlaifv.reward.prompt import EncodedPrompt, encode_prompt
from rlaifv.reward.sampling import SamplingParams, sample_answers

if TYPE_CHECKING:
    from rlaifv.reward.model_pair import ModelPair

log = logging.getLogger(__name__)

PROBE_QUESTION = "Describe the image."
PROBE_TOKENS = 6
# Max |log-prob difference| allowed: float32 paths differ by reduction order only (~1e-6 seen); half precision
# rounds activations differently in a padded batch than in `generate`'s own, so only a structural error (a wrong
# position, mask or cache) moves a greedy token's log-prob by this much.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 0.25


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
    """A square and a wide image: two prompts of different image shapes in one batch, as requests come."""
    from PIL import Image

    square = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    wide = Image.radial_gradient("L").resize((96, 48)).convert("RGB")
    return [square, wide]


def probe_prompts(processor: Any, accepts_images: bool) -> list[EncodedPrompt]:
    if not accepts_images:
        return [encode_prompt(processor, [], PROBE_QUESTION), encode_prompt(processor, [], "Say something short.")]
    return [encode_prompt(processor, [image], PROBE_QUESTION) for image in probe_images()]


@torch.no_grad()
def generate_truth(model: Any, prompt: EncodedPrompt, pad_id: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the model's own `generate` and their log-probs under its raw logits (float32)."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    ids = prompt.input_ids.to(device).unsqueeze(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **stack_vision([prompt], len(prompt), device, dtype),
        do_sample=False,
        max_new_tokens=PROBE_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad_id,
    )
    tokens = out.sequences[0, ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1)[0, : len(tokens)].float()
    return tokens.tolist(), selective_log_softmax(logits, tokens)


def _worst(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(
        (float((x.float().cpu() - y.float().cpu()).abs().max()) for x, y in zip(a, b, strict=True) if len(x)),
        default=0.0,
    )


def probe(model: Any, processor: Any, *, accepts_images: bool, pad_id: int, stop_ids: Sequence[int]) -> ProbeResult:
    """Compare the engine's scoring and sampling with `generate` on two synthetic prompts (batched together)."""
    prompts = probe_prompts(processor, accepts_images)
    result: ProbeResult = compare_with_generate(model, prompts, pad_id=pad_id, stop_ids=stop_ids)
    return result


@torch.no_grad()
def compare_with_generate(
    model: Any, prompts: Sequence[EncodedPrompt], *, pad_id: int, stop_ids: Sequence[int]
) -> ProbeResult:
    """The engine on `prompts` (one batch) against the model's own greedy `generate` on each alone."""
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    kind = model_type(model) or "unknown"
    truths = [generate_truth(model, prompt, pad_id) for prompt in prompts]
    scored = answer_logprobs(model, prompts, [[tokens] for tokens, _ in truths], pad_id)
    scoring = _worst([group[0] for group in scored], [truth for _, truth in truths])
    # Two samples per prompt exercise the prefix fork; greedy with nothing blocked retraces `generate` up to the
    # first stop token, so each sample's log-probs are a prefix of the truth.
    params = [SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, seed=0)] * len(prompts)
    samples = sample_answers(model, prompts, [2] * len(prompts), params, stop_ids=stop_ids, pad_id=pad_id)
    got, want = [], []
    for group, (tokens, truth) in zip(samples, truths, strict=True):
        for sample in group:
            n = min(len(sample.token_ids), len(tokens))
            same = next((i for i in range(n) if sample.token_ids[i] != tokens[i]), n)
            if same < n and dtype in TOLERANCE:
                return ProbeResult(kind, scoring, float("inf"), tolerance)
            # in half precision a near tie may flip a greedy pick: the log-probs up to it must still agree
            got.append(sample.logprobs[:same])
            want.append(truth[:same])
    return ProbeResult(kind, scoring, _worst(got, want), tolerance)


def check_unverified_family(
    model: Any, processor: Any, *, accepts_images: bool, pad_id: int, stop_ids: Sequence[int]
) -> ProbeResult | None:
    """Probe a model of a family without rules; refuse it (`ModelLoadError`) if the engine cannot serve it exactly."""
    if not needs_probe(model):
        return None
    result = refuse_unless_exact(
        model, lambda: probe(model, processor, accepts_images=accepts_images, pad_id=pad_id, stop_ids=stop_ids)
    )
    log.info(
        "model type %r has no family rules; the load-time check found the engine exact"
        " (max |log-prob difference| scoring %.2g, sampling %.2g, tolerance %g)",
        result.model_type,
        result.scoring,
        result.sampling,
        result.tolerance,
    )
    return result


def refuse_unless_exact(model: Any, compare: Callable[[], ProbeResult]) -> ProbeResult:
    """`compare()`'s result; any failure in it, or a difference past the tolerance, is a `ModelLoadError`."""
    kind = model_type(model) or "unknown"
    unknown = f"model type {kind!r} has no rules in this engine (known: {', '.join(sorted(FAMILIES))})"
    try:
        result = compare()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{unknown} and the load-time check could not run it through the shared-prefix engine:"
            f" {type(exc).__name__}: {exc}"
        ) from exc
    if not result.exact:
        sampling = (
            "picks other greedy tokens" if result.sampling == float("inf") else f"differs by {result.sampling:.3g}"
        )
        raise ModelLoadError(
            f"{unknown} and the shared-prefix engine disagrees with the model's own generate: scoring log-probs"
            f" differ by {result.scoring:.3g}, sampling {sampling} (tolerance {result.tolerance:g}); serving it"
            " would give wrong rewards"
        )
    return result


def check_pair(pair: ModelPair) -> dict[str, ProbeResult]:
    """Probe both models of a loaded pair, registered families included (`rlaifv bundle check`): one's own
    checkpoint, dtype, device and transformers release against the model's own generate."""
    kwargs: dict[str, Any] = {"accepts_images": pair.accepts_images, "pad_id": pair.pad_id, "stop_ids": pair.stop_ids}
    results = {"policy": probe(pair.policy, pair.processor, **kwargs)}
    if pair.reference is not pair.policy:
        with pair.reference_model() as reference:
            results["reference"] = probe(reference, pair.processor, **kwargs)
    return results
