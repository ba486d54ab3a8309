"""Benchmarks and experiments; each run writes its numbers with provenance."""
