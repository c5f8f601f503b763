from __future__ import annotations

import time

from fastapi import APIRouter

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.json_body import JsonBodyRoute
from rlaifv.service.protocol import ModelCard, ModelList

router = APIRouter(route_class=JsonBodyRoute, tags=["openai"])
_STARTED = int(time.time())


@router.get(
    "/v1/models", response_model=ModelList, responses=error_responses(401, 429, 503), summary="The served model"
)
async def list_models(serving: ServingDep) -> ModelList:
    """The one model this server serves, with its default reward settings."""
    return ModelList(data=[serving.model_card(_STARTED)])


@router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses=error_responses(401, 404, 429, 503),
    summary="One model by name",
)
async def retrieve_model(model: str, serving: ServingDep) -> ModelCard:
    """OpenAI's `models.retrieve`: the served model's card, or 404 `model_not_found` for any other name."""
    serving.check_model(model)
    return serving.model_card(_STARTED)
