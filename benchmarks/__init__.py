"""Benchmarks, run as modules from the repository root (`python -m benchmarks.step_time`); see README.md."""
