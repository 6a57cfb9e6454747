#!/usr/bin/env bash
# Print the README's two set-up commands, one per line, exactly as a user copies them
# (the bash block under "## Set-up: two commands"). .ci/run and scripts/refresh-lock.sh run
# these lines, so what CI checks is what the README says.
set -euo pipefail
cd "$(dirname "$0")/.."
awk '/^## Set-up: two commands/ {section = 1; next}
     section && /^```bash/ {block = 1; next}
     block && /^```/ {exit}
     block && NF {print}' README.md
