#!/usr/bin/env bash
# The GPU proof in one command (issue 9); bench/gpu/README.md says how to run it on the GPU machine.
#
#   bench/gpu/run.sh [--dry] [OUTDIR] [--parts ...] [--budget PART=SECONDS] [--total SECONDS]
#
# On a machine whose Python lacks the server's packages, the wheels that bench/gpu/wheels.sh put in
# .whl/ are installed into a private folder first (no network needed). OUTDIR defaults to $OUT (the
# device tool's folder), else bench/gpu/out. PYTHON picks the interpreter (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/expo-gpu-kit-site"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "run.sh: installing the wheels in .whl/ failed; the kit reports what is missing" >&2
  fi
fi
# The checkout runs as it is (no pip install of expo-serve needed): the package and kernels roots.
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu/kit.py "$@"
