"""Benchmarks: they print figures; targets live here, never in timed unit tests."""
