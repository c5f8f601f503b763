from __future__ import annotations

import time

from fastapi import APIRouter

from service.deps import ServingDep
from service.errors import error_responses
from service.protocol import ModelCard, ModelList, RewardInfo

router = APIRouter(tags=["openai"])
_STARTED = int(time.time())


@router.get(
    "/v1/models", response_model=ModelList, responses=error_responses(401, 403, 429, 503), summary="The served model"
)
async def list_models(serving: ServingDep) -> ModelList:
    info = serving.describe()
    reward = RewardInfo(mode="dpo", beta=info["reward"].beta, normalize=info["reward"].normalize)
    return ModelList(
        data=[ModelCard(id=info["name"], created=_STARTED, reward=reward, max_positions=info["max_positions"])]
    )
