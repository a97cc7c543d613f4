#!/usr/bin/env bash
# The main job: set up, build, and run the scoring-function tour.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTN_BUILD_EXAMPLES=ON >/dev/null
cmake --build build -j "$(nproc)" --target scoring_tour
./build/examples/scoring_tour "$@"
