#!/usr/bin/env bash
# Refresh the locks to the newest releases pyproject.toml allows, and keep them only if .ci/run
# (the README's two commands and the lint, in a fresh virtual environment) passes on them.
#   scripts/refresh-lock.sh              every package to its newest allowed release
#   scripts/refresh-lock.sh PKG [PKG..]  only these (the rest stay where the locks have them)
# On any failure the previous locks are put back. Commit requirements/*.lock afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
cp requirements/dev.lock requirements/base.lock "$work/"
restore() { cp "$work/dev.lock" "$work/base.lock" requirements/; echo "refresh-lock: failed; the previous locks are back" >&2; }
trap 'status=$?; if [ $status -ne 0 ]; then restore; fi; rm -rf "$work"' EXIT

python3 -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet pip-tools==7.7.0
upgrade=(--upgrade)
if [ $# -gt 0 ]; then upgrade=(); for package in "$@"; do upgrade+=(--upgrade-package "$package"); done; fi
compile() {
    "$work/tools/bin/pip-compile" --quiet --allow-unsafe --strip-extras --no-emit-index-url \
        --no-emit-find-links "$@" pyproject.toml
    # torch's CPU build is "2.13.0+cpu": lock the release, so that pip takes the CPU build where it
    # lies on disk or on the index given (deploy/Dockerfile) and the CUDA build where that is installed
    sed -i -E 's/^torch==([^+ ]+)\+cpu$/torch==\1/' "${@: -1}"
}
# dev (default install + the dev extra) first; base (the default install, for deploy/'s images)
# at the same versions
compile "${upgrade[@]}" --extra dev -c requirements/pins.txt -o requirements/dev.lock
compile -c requirements/dev.lock -o requirements/base.lock
git --no-pager diff --stat -- requirements/

# what CI does: a fresh venv, the README's two commands, ruff and mypy
.ci/run
echo "refresh-lock: CI passed on the refreshed locks; commit requirements/*.lock"
