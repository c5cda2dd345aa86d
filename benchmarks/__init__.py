"""Benchmarks: measured numbers printed beside their targets (`make bench`)."""
