"""Python client for ragcache's HTTP API (see client.py)."""
