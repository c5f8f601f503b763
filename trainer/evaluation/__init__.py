"""Hallucination metrics: CHAIR (Object HalBench definitions) and yes/no accuracy/F1 (AMBER-style)."""
