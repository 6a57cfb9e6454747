#!/usr/bin/env bash
# ruff (lint and format check) and mypy over ragcache/, storage/ and kernels/ (mypy reads the last
# two through the symlinks ragcache/storage and ragcache/kernels). Settings: pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check ragcache storage kernels
ruff format --check ragcache storage kernels
mypy
