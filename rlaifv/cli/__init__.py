"""The `rlaifv` command (`rlaifv.cli.main:app`), the composition root of the service and the trainer."""
