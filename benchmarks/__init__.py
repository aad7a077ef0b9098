"""Benchmarks for conveyor (not run in CI): see benchmarks/README.md."""
