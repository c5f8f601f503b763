"""Benchmarks that print side-by-side ratios measured in one run; only the CLI mounts them."""
