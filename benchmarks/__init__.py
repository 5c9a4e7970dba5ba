"""Benchmarks for raytrainer (not part of the test suite); see benchmarks/README.md."""
