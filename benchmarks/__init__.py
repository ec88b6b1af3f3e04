"""Full-size speed and memory benchmarks (``python -m benchmarks.run_benchmarks``); not part of the package."""
