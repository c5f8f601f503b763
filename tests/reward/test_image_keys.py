"""Mllama's cross-attention cache holds the image's keys once per prompt (`reward.kv_cache.ImageKeysLayer`).

Forking a prompt for N answers and dropping finished rows re-index the layer, never copy the keys (at 11B
with 4 tiles, ~210 MB per row in bfloat16); the log-probs stay those of a plain forward.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from rlaifv.reward.kv_cache import ImageKeysLayer
from rlaifv.reward.logprobs import fork, full_forward_logprobs, prefill
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.prompt import encode_prompt
from rlaifv.reward.sampling import SamplingParams, sample_answers
from rlaifv.testing.tiny_families import build_tiny_family


@pytest.fixture(scope="module")
def mllama(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.set_num_threads(1)
    folder = build_tiny_family("mllama", tmp_path_factory.mktemp("mllama"))
    model, processor = load_model(folder, device="cpu"), load_processor(folder)
    prompts = [
        encode_prompt(processor, [Image.new("RGB", (48, 48), colour)], question)
        for colour, question in (((200, 30, 30), "Describe the image."), ((30, 30, 200), "What is it?"))
    ]
    return model, processor, prompts


def _image_layers(cache) -> list[ImageKeysLayer]:
    return [layer for layer in cache.layers if isinstance(layer, ImageKeysLayer)]


@torch.no_grad()
def test_forking_and_dropping_rows_never_copy_the_image_keys(mllama: tuple) -> None:
    model, processor, prompts = mllama
    state = prefill(model, prompts, processor.tokenizer.pad_token_id)
    (layer,) = _image_layers(state.cache)  # the tiny model's one cross-attention layer
    stored = layer._prompt_keys.data_ptr()
    assert layer.keys is layer._prompt_keys  # one row per prompt: no indexing
    state = fork(model, state, torch.tensor([0, 0, 0, 1, 1, 1]), 4)
    assert layer.keys.shape[0] == 6 and layer._prompt_keys.shape[0] == 2
    state = state.select(torch.tensor([1, 4]))
    assert layer._prompt_keys.data_ptr() == stored and layer.owner.tolist() == [0, 1]
    assert torch.equal(layer.keys, layer._prompt_keys)
    one = prefill(model, prompts[:1], processor.tokenizer.pad_token_id)
    (single,) = _image_layers(one.cache)
    one = fork(model, one, torch.tensor([0, 0, 0, 0]), 4)
    assert single.keys.shape[0] == 4 and single.keys.stride(0) == 0  # one prompt: a view, not a gather


@torch.no_grad()
def test_answers_that_stop_at_different_steps_keep_exact_log_probs(mllama: tuple) -> None:
    """Rows finishing early are dropped from the batch (a re-index of the image layer) while the rest go on."""
    model, processor, prompts = mllama
    params = [SamplingParams(seed=11 + i, max_tokens=12, temperature=1.5) for i in range(len(prompts))]
    samples = sample_answers(
        model, prompts, [4, 4], params, stop_ids=[processor.tokenizer.eos_token_id, 5, 9, 14, 21], pad_id=0
    )
    lengths = {len(s.token_ids) for group in samples for s in group}
    assert len(lengths) > 1, lengths  # some rows stopped before others: compaction ran
    for prompt, group in zip(prompts, samples, strict=True):
        for sample in group:
            truth = full_forward_logprobs(model, prompt, sample.token_ids)
            assert float((sample.logprobs - truth).abs().max()) < 1e-4


def test_the_layer_refuses_to_grow() -> None:
    layer = ImageKeysLayer(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(NotImplementedError):
        layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert layer.get_seq_length() == 3
