"""Our prompts with images -> vLLM's token-in API (the image path of the vllm engine; docs/vllm.md "Images").

vLLM's `/v1/completions` takes token ids but no pixels, and its chat API re-renders and re-tokenizes the answer
text (the sampled ids, and the end-of-turn token that ends a sampled answer, cannot be scored exactly that way).
vLLM 0.32's `POST /inference/v1/generate` (on `vllm serve --enable-scale-out`) takes both: `token_ids` and the
images as `content_parts` (data URLs), and `sampling_params` as `vllm.SamplingParams` (`n`, raw `logprobs`,
`prompt_logprobs`, `logprob_token_ids`). So:

- the prompt is rendered by the bundle's template and tokenized by its tokenizer *without* the processor's image
  expansion (`prompt_ids`): one placeholder per image, which vLLM's processor expands to the image's tokens, as
  ours does (vLLM expands again a prompt that is already expanded);
- `return_token_ids` sends back the prompt ids vLLM used after expansion: `check_prompt_ids` compares them with
  ours (`reward.prompt.encode_prompt`), so a processor that expands differently fails loudly instead of scoring
  other positions;
- an answer is scored as `prompt_ids + answer` with `prompt_logprobs`: the answer's log-probs are the last T
  positions, counted from the end because the placeholders expand.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

from rlaifv.reward.prompt import render_chat, user_message

GENERATE_PATH = "/inference/v1/generate"


def image_url(image: Any) -> str:
    """A decoded PIL image (re-encoded as PNG, lossless) or encoded bytes as a data URL."""
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as opened:
            mime = Image.MIME.get(opened.format or "", "application/octet-stream")
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def content_parts(images: Sequence[Any]) -> list[dict[str, Any]]:
    """The images, in prompt order, as vLLM's `content_parts` (one per placeholder)."""
    return [{"type": "image_url", "url": image_url(image)} for image in images]


def prompt_ids(
    processor: Any,
    images: Sequence[Any],
    question: str | None,
    messages: Sequence[dict[str, Any]] | None,
    continue_final: bool = False,
) -> list[int]:
    """The prompt `encode_prompt` renders, tokenized without image expansion (vLLM expands the placeholders).

    The caller has validated the request with `encode_prompt` first (question or messages, image counts)."""
    turns = list(messages) if messages is not None else user_message(question or "", len(images))
    text = render_chat(processor, turns, continue_final=continue_final)
    tokenizer = processor.tokenizer
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return [int(t) for t in tokenizer(text, add_special_tokens=not has_bos)["input_ids"]]


def generate_body(
    model: str, token_ids: Sequence[int], parts: Sequence[dict[str, Any]], sampling_params: dict[str, Any]
) -> dict[str, Any]:
    """One `/inference/v1/generate` request: token ids + images in, token ids (and the expanded prompt) out."""
    body: dict[str, Any] = {
        "model": model,
        "token_ids": list(token_ids),
        "sampling_params": sampling_params,
        "return_token_ids": True,  # the prompt ids after expansion, for check_prompt_ids
        "output_mode": "tokens",
    }
    if parts:
        body["content_parts"] = list(parts)
    return body


def check_prompt_ids(ours: Sequence[int], theirs: Sequence[int] | None, *, server: str) -> None:
    """The prompt vLLM expanded must be the one we expanded: otherwise the scored tokens are not ours."""
    if theirs is None:
        raise ValueError(f"the vLLM {server} server did not return the prompt's token ids (return_token_ids)")
    if list(ours) != list(theirs):
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        raise ValueError(
            f"the vLLM {server} server expanded the prompt differently ({len(theirs)} tokens vs our {len(ours)}, "
            f"first difference at position {first}): serve the bundle's own folder so both use its processor"
        )


def serve_flags(max_images: int) -> list[str]:
    """The `vllm serve` flags the image path needs: the token-in route and the per-prompt image limit."""
    return ["--enable-scale-out", "--limit-mm-per-prompt", json.dumps({"image": max_images})]
