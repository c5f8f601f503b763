from __future__ import annotations

from fastapi import APIRouter, Request

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.protocol import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(tags=["openai"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=error_responses(400, 401, 403, 404, 413, 429, 503, 504),
    summary="OpenAI-compatible chat completion, best-of-N by reward",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> ChatCompletionResponse:
    """Samples `best_of` answers (default `n`) and returns the top `n` by RLAIF-V reward, best first,
    the reward attached to each choice. Images come as `image_url` content parts with data URLs.
    `usage.completion_tokens` counts all `best_of` samples. Streaming is not supported."""
    return await serving.chat(body, request)
