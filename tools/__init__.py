"""Helpers shared by the tests and the benchmarks (importable from the repository root)."""
