"""Python client of the RLAIF-V reward service: best-of-N selection and reranking for multimodal LLMs.

    from rlaifv_client import Client

    with Client(base_url="http://localhost:8000", api_key="...") as client:
        result = client.best_of_n(image="cat.png", question="What is in the image?", n=8)
        print(result.best.text, result.rewards)

Depends on httpx and pydantic only.
"""

from . import types
from ._base_client import NOT_GIVEN, Backoff, NotGiven
from ._client import AsyncClient, AsyncJobs, Client, Jobs
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ClientClosedError,
    ConflictError,
    FieldError,
    ImageInputError,
    InvalidArgumentError,
    InvalidRequestError,
    JobError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    RLAIFVError,
    ServerError,
    TimeoutError,
    WaitTimeoutError,
)
from ._images import data_url, encode_image
from ._version import __version__
from .types import BestOfN, Candidate, ClaimCheck, Health, Job, JobResult, Model, ModelList, Rewards

__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncJobs",
    "AuthenticationError",
    "Backoff",
    "BestOfN",
    "Candidate",
    "ClaimCheck",
    "Client",
    "ClientClosedError",
    "ConflictError",
    "FieldError",
    "Health",
    "ImageInputError",
    "InvalidArgumentError",
    "InvalidRequestError",
    "Job",
    "JobError",
    "JobResult",
    "Jobs",
    "Model",
    "ModelList",
    "NotFoundError",
    "NotGiven",
    "PermissionDeniedError",
    "RLAIFVError",
    "RateLimitError",
    "RequestTimeoutError",
    "Rewards",
    "ServerError",
    "TimeoutError",
    "WaitTimeoutError",
    "__version__",
    "data_url",
    "encode_image",
    "types",
]
