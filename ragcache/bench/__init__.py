"""Benchmarks behind `ragcache bench …`; each prints a table and can write JSON."""
