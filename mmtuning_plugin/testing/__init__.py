"""Builders for tests, benchmarks and the demo: tiny random models of real architectures, real tokenizers and
processors, tiny checkpoints on disk. Not product code: the core never imports this package."""
