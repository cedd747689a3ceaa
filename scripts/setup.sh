#!/usr/bin/env bash
# Set up everything segdistill needs in ./.venv (idempotent: a second run only checks).
#   bash scripts/setup.sh
# torch is pinned to 2.13.0 here (the CPU build on a machine without CUDA); pyproject keeps a
# loose lower bound so GPU users can bring their own CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

stamp=.venv/.segdistill-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import components, ray, torch" 2>/dev/null; then
  exit 0
fi

python -m pip install -q --upgrade pip
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "segdistill environment ready in .venv"
