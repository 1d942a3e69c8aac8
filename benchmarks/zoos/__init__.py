"""Builders for reproducible adapter zoos used by the benchmarks."""
