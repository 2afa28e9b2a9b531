"""Benchmarks: traces, a load generator for OpenAI-compatible servers, baselines, reports and plots.

`orcinus bench offline | serve | sweep` are the entry points (see `orcinus/bench/cli.py` and
`docs/benchmarks.md`). Nothing here imports the server: `bench serve` is a plain HTTP client.
"""
