"""HTTP routers: thin, one file per resource; logic lives in `service.serving`."""
