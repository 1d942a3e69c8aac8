#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check mergekit_subspace tests benchmarks
python -m pytest tests "$@"
