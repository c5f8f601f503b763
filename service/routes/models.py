from __future__ import annotations

import time

from fastapi import APIRouter

from rlaifv.service.deps import ServingDep
from rlaifv.service.errors import error_responses
from rlaifv.service.protocol import ModelList

router = APIRouter(tags=["openai"])
_STARTED = int(time.time())


@router.get(
    "/v1/models", response_model=ModelList, responses=error_responses(401, 403, 429, 503), summary="The served model"
)
async def list_models(serving: ServingDep) -> ModelList:
    """The one model this server serves, with its default reward settings."""
    return ModelList(data=[serving.model_card(_STARTED)])
