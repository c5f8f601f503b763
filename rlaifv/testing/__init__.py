"""Helpers for tests and benchmarks (a real uvicorn server on a free port); nothing in the product imports them."""
