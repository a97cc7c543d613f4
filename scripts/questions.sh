#!/usr/bin/env bash
# Measured answers to common questions about attention (examples/attention_questions.cpp):
# why scale dot products by 1/sqrt(d), and how much faster dot-product attention is than additive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_EXAMPLES=ON >/dev/null
cmake --build build -j "$(nproc)" --target attention_questions
./build/examples/attention_questions "$@"
