"""Benchmark helpers for mergekit-subspace (adapter zoos, evaluation data)."""
