"""Evaluation: CHAIR (one implementation, shared with the shapes world), Object HalBench, AMBER, MMHal-Bench,
and the inference-time scaling curve of best-of-N. Reads local files in the benchmarks' published formats."""
