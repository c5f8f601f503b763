from __future__ import annotations

from fastapi import APIRouter, Request

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.json_body import JsonBodyRoute
from rlaifv.service.protocol import RewardsRequest, RewardsResponse

router = APIRouter(route_class=JsonBodyRoute, tags=["reward"])


@router.post(
    "/v1/rewards",
    response_model=RewardsResponse,
    responses=error_responses(400, 401, 404, 413, 429, 503, 504),
    summary="Score given answers with the RLAIF-V reward",
)
async def rewards(body: RewardsRequest, request: Request, serving: ServingDep) -> RewardsResponse:
    """Scores answers written by anyone (e.g. another model) for the image(s) and question, and
    returns every reward and the best index. Deterministic, so results may come from the cache."""
    return await serving.rewards(body, request)
