"""Evaluation: zero-shot classification at any token budget."""
