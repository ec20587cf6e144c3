"""Generated data for tests and benchmarks; never imported by samtune itself."""
