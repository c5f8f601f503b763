from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.json_body import JsonBodyRoute
from rlaifv.service.protocol import ChatCompletionRequest, ChatCompletionResponse
from rlaifv.service.serving import chat_chunks

router = APIRouter(route_class=JsonBodyRoute, tags=["openai"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **error_responses(400, 401, 404, 413, 429, 503, 504),
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent chunks with stream=true."},
    },
    summary="OpenAI-compatible chat completion, best-of-N by reward",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep
) -> ChatCompletionResponse | StreamingResponse:
    """Samples `best_of` answers (default `n`) and returns the top `n` by RLAIF-V reward, best first,
    the reward attached to each choice. Images come as `image_url` content parts with data URLs.
    `usage.completion_tokens` counts all `best_of` samples. With `stream=true` the same choices come as
    `chat.completion.chunk` server-sent events once ranked (best-of-N needs complete answers), then
    `data: [DONE]`; errors are still plain JSON 4xx, since they are raised before the stream starts."""
    completion = await serving.chat(body, request)
    if not body.stream:
        return completion
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    leave_out = None if include_usage else {"usage"}  # OpenAI: no `usage` key at all unless it was asked for

    async def events() -> AsyncIterator[str]:
        for chunk in chat_chunks(completion, include_usage=include_usage):
            yield f"data: {chunk.model_dump_json(exclude=leave_out)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
