"""Evaluation: generation for a set of models on the same prompts, and metrics on the responses."""
