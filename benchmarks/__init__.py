"""Benchmark suites that regenerate the measured pages of the documentation.

Run one with ``python -m benchmarks SUITE [OPTIONS]`` from the repository root; ``python -m
benchmarks`` lists them. Shared helpers (guarded child processes, peak RSS, markdown output) live
in `benchmarks.benchutil`.
"""
