"""Engines: what runs the model pair behind the scheduler, chosen by `RLAIFV_ENGINE`.

The scheduler and the serving layer see only the `Engine` protocol
(`service.engines.base`); `load_engine` builds the configured one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlaifv.service.engines.base import Engine, EngineResult, GenerateRequest, Request, ScoreRequest

if TYPE_CHECKING:
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

ENGINES = ("transformers", "vllm")


def load_engine(settings: Settings, metrics: Metrics | None = None) -> tuple[Engine, float]:
    """The configured engine over `settings.bundle`; returns it and its load time in seconds.

    `vllm` checks its servers here (`VllmStartupError` when one cannot be used), so a wrong URL fails start-up.
    """
    if settings.engine == "transformers":
        from rlaifv.service.engines.transformers import load_transformers_engine

        return load_transformers_engine(
            str(settings.bundle),
            device=settings.device,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            torch_threads=settings.torch_threads,
            pack_weights=settings.pack_weights,
            family_check=settings.family_check,
            image_limits=settings.image_limits(),
        )
    if settings.engine == "vllm":
        from rlaifv.service.engines.vllm import load_vllm_engine

        return load_vllm_engine(str(settings.bundle), settings, metrics)
    raise ValueError(f"unknown engine {settings.engine!r}; one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineResult", "GenerateRequest", "Request", "ScoreRequest", "load_engine"]
