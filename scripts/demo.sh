#!/usr/bin/env bash
# Sets up a fresh machine, builds a small real zoo (MiniLM LoRAs on WordNet tasks), compresses it,
# reconstructs every task as a PEFT folder, and prints bytes, errors and accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m benchmarks.demo "$@"
