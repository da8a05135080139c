"""Sinew's benchmark harness: see bench/README.md and `bench/run --help`."""
