#!/usr/bin/env bash
# Installs every Debian package attn needs to build, test and benchmark. Idempotent: packages
# already present are skipped, so a second run does no network I/O.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libopenblas-dev libhwy-dev libomp-dev
  libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev libxxhash-dev
  libsentencepiece-dev gettext
  clang-14 libfuzzer-14-dev
  libopenmpi-dev openmpi-bin
  python3-dev pybind11-dev python3-numpy python3-torch python3-pytest python3-venv
  python3-setuptools python3-wheel
  chromium  # renders the `attn experiments` report in tests/tools/test_experiments_report.cpp
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[setup] all packages present"
fi
