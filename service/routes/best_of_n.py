from __future__ import annotations

from fastapi import APIRouter, Request

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.json_body import JsonBodyRoute
from rlaifv.service.protocol import BestOfNRequest, BestOfNResponse

router = APIRouter(route_class=JsonBodyRoute, tags=["reward"])


@router.post(
    "/v1/best-of-n",
    response_model=BestOfNResponse,
    responses=error_responses(400, 401, 404, 413, 429, 503, 504),
    summary="Sample n answers and return the one with the highest RLAIF-V reward",
)
async def best_of_n(body: BestOfNRequest, request: Request, serving: ServingDep) -> BestOfNResponse:
    """Samples `n` answers to the image(s) and question with the policy, scores each with
    r = beta/T * sum_t[log pi_theta - log pi_ref] (raw log-probs at temperature 1, whatever the
    sampling settings), and returns the argmax (ties to the lower index) with every candidate's terms."""
    return await serving.best_of_n(body, request)
