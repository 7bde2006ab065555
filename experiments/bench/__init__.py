"""Benchmarks of the engine, on random data as the trainer builds its pipelines (common)."""
