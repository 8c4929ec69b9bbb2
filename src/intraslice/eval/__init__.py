"""Evaluation: perplexity (and, later, zero-shot)."""
