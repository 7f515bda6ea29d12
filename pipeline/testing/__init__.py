"""Random-weight stand-ins for tests, benchmarks and dry runs (never imported by the pipeline itself)."""
