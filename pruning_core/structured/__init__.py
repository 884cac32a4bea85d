"""Structured pruning (LLM-Pruner): remove whole attention heads and MLP channels, shrink the model."""
