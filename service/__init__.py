"""The RLAIF-V reward service: FastAPI app, scheduler, engines, jobs, metrics and the `rlaifv` CLI."""
