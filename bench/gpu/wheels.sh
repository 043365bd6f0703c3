#!/usr/bin/env bash
# Run here (where PyPI is reachable), before a GPU run: downloads into .whl/ (git-ignored) the wheels
# the GPU machine's Python lacks, for CPython 3.12 on manylinux x86_64. bench/gpu/run.sh installs
# them there with `pip install --no-index --no-deps --target` and puts them on PYTHONPATH.
#
# The machine's image has torch, triton, transformers, safetensors, numpy, scipy, prometheus-client,
# httpx, jinja2, pyyaml, tqdm and pytest, but not the server's stack (fastapi, starlette,
# sse-starlette, pydantic, pydantic-settings, uvicorn), gguf, or the openai client the kit checks
# the server with. Those come with their own dependencies, at the versions this checkout is tested
# with here (pinned from ./.venv: run `make install` first). A few of those dependencies exist on
# the image in versions not known here (typing-extensions, anyio, idna): newer, backward-compatible
# copies come along, since pydantic and the openai client need recent ones. Packages the image has
# and nothing here needs newer (numpy and the like) are left out, so nothing torch uses is shadowed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV_PY="${VENV_PY:-.venv/bin/python}"
[ -x "$VENV_PY" ] || { echo "wheels.sh: $VENV_PY not found; run 'make install' first (it pins the versions)" >&2; exit 2; }
NEEDED="fastapi starlette sse-starlette pydantic pydantic-core pydantic-settings uvicorn gguf openai"
ON_IMAGE="numpy pyyaml requests tqdm urllib3 certifi charset-normalizer click h11"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Every package of the venv at its version, as constraints (local builds such as torch's +cpu excluded).
"$VENV_PY" -m pip list --format=freeze --exclude-editable | grep -v '+' > "$work/constraints.txt"
pins=()
for name in $NEEDED; do
  pins+=("$name==$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$VENV_PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -c "$work/constraints.txt" -d "$work/wheels" "${pins[@]}"
for name in $ON_IMAGE; do
  pattern="$(echo "$name" | tr '-' '_')"
  rm -f "$work/wheels/${pattern}"-*.whl "$work/wheels/${pattern,,}"-*.whl "$work/wheels/PyYAML"-*.whl 2>/dev/null || true
done
rm -rf .whl && mkdir .whl && mv "$work"/wheels/*.whl .whl/
ls .whl
du -sh .whl
