"""Evaluation: zero-shot classification and image-caption retrieval at any token budget, on any of
the usual data layouts, from a training run or an export (`navit-clip eval`; see docs/eval.md)."""
