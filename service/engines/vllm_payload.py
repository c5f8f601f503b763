"""Our request schema -> vLLM's multimodal chat input (the image path of the vllm engine; docs/vllm.md).

vLLM's `/v1/completions` takes token ids but no images over HTTP, so a prompt with images goes to
`/v1/chat/completions`: the messages in OpenAI's format, each image a data URL of the bytes we decoded, in the
place its `{"type": "image"}` placeholder had in our (Hugging Face format) messages. vLLM renders the model's chat
template (the bundle's own: `vllm serve <bundle>/policy` reads the same folder) and expands the image tokens
itself; `return_token_ids` sends back the prompt ids it used, which the caller compares with its own rendering
(`check_prompt_ids`) so that re-tokenisation drift fails loudly instead of scoring other tokens.

- sampling: `sampling_body` (n samples, raw log-probs with token ids, the pair's stop ids);
- scoring an answer: `scoring_body` renders the answer as a final assistant turn that stays open
  (`continue_final_message`), takes `prompt_logprobs` with `max_tokens` 1, and the answer's log-probs are the
  last T prompt positions, slicing from the end because the image placeholder expands to many tokens;
- per-prompt image limits: vLLM refuses more images per prompt than its `--limit-mm-per-prompt` (`serve_flags`);
  `chat_messages` refuses them first, naming our field.

CI cannot run this path (vLLM's multimodal models need torchvision, which the CPU torch here cannot take), so it
is tested as payloads (tests/service/test_vllm_unit.py); the GPU check is in docs/vllm.md.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

from rlaifv.reward.errors import InvalidInputError
from rlaifv.reward.prompt import count_image_parts, user_message


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


def chat_messages(
    question: str | None,
    messages: Sequence[dict[str, Any]] | None,
    images: Sequence[Any],
    *,
    max_images: int,
) -> list[dict[str, Any]]:
    """The prompt as vLLM chat messages: image placeholders replaced, in order, by `image_url` parts."""
    if len(images) > max_images:
        raise InvalidInputError(
            f"at most {max_images} images per prompt (the vLLM servers' --limit-mm-per-prompt), got {len(images)}",
            param="images",
        )
    turns = list(messages) if messages is not None else user_message(question or "", len(images))
    if count_image_parts(turns) != len(images):
        raise InvalidInputError(
            f"messages have {count_image_parts(turns)} image parts but {len(images)} images were given",
            param="messages",
        )
    urls = iter([image_url(image) for image in images])
    out: list[dict[str, Any]] = []
    for turn in turns:
        content = turn["content"]
        if isinstance(content, str):
            out.append({"role": turn["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": next(urls)}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": turn["role"], "content": parts})
    return out


def sampling_body(
    model: str,
    messages: list[dict[str, Any]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_tokens: int,
    seed: int | None,
    stop_ids: Sequence[int],
    top_logprobs: int = 0,
) -> dict[str, Any]:
    """One chat request sampling `n` answers with each token's id and raw log-prob (and the prompt's ids)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k if top_k > 0 else -1,
        "max_tokens": max_tokens,
        "logprobs": True,
        "top_logprobs": top_logprobs,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
        "add_generation_prompt": True,
        "stop_token_ids": list(stop_ids),
    }
    if seed is not None:
        body["seed"] = seed
    return body


def scoring_body(model: str, messages: list[dict[str, Any]], answer: str) -> dict[str, Any]:
    """Prompt log-probs of `messages` + `answer` as an open assistant turn: the answer is the last T positions."""
    return {
        "model": model,
        "messages": [*messages, {"role": "assistant", "content": answer}],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
        "return_token_ids": True,
    }


def check_prompt_ids(ours: Sequence[int], theirs: Sequence[int], *, server: str) -> None:
    """The prompt vLLM rendered must be the one we rendered: otherwise the scored tokens are not ours."""
    if list(ours) != list(theirs):
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        raise ValueError(
            f"the vLLM {server} server rendered another prompt ({len(theirs)} tokens vs our {len(ours)}, first "
            f"difference at position {first}): serve the bundle's own folder so both use its chat template"
        )


def serve_flags(max_images: int) -> list[str]:
    """`vllm serve` flags matching RLAIFV_MAX_IMAGES: the per-prompt image limit."""
    return ["--limit-mm-per-prompt", json.dumps({"image": max_images})]
