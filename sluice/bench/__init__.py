"""Benchmarks: `sluice bench offline | latency | serve` (the command line is in cli.py)."""
