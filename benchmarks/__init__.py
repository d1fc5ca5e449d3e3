"""Benchmark harness for Lillama Studio: quality (perplexity vs reduction per method), ablations,
speed/memory of the compressed models and compression cost. Entry point: `python -m benchmarks.run`.

Every run appends one JSON record to `benchmarks/results/<suite>.jsonl`; `python -m benchmarks.run report`
turns all records into `docs/benchmarks.md` and a chart.
"""
