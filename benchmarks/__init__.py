"""Throughput benchmarks (pytest-benchmark) and the side-by-side ratio report."""
