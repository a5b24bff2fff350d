"""Benchmarks that print ratios against peers; not part of the tests."""
