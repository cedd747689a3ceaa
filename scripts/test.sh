#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, Ray runs marked `slow` included.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m "not slow"   # skip the multi-process Ray runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
