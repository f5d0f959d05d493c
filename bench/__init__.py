"""Benchmarks (not tests): run with `make bench` or `python -m bench.ingest`."""
