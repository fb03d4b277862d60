"""Tooling around the reference core: the command line, evaluation, benchmarks, golden vectors, traces."""
