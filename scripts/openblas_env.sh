# Sourced by the demo and benchmark scripts (not by the tests, which run with the machine's own
# settings). OpenBLAS 0.3.21 picks its kernel when it loads and does not recognise newer CPUs
# (e.g. Sapphire Rapids Xeons): it falls back to the generic "Prescott" kernel, 3-4x slower.
# When OPENBLAS_CORETYPE is unset, name the newest kernel the CPU's flags support.
if [[ -z "${OPENBLAS_CORETYPE:-}" ]]; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  if [[ $flags == *avx512_bf16* ]]; then export OPENBLAS_CORETYPE=Cooperlake
  elif [[ $flags == *avx512f* ]]; then export OPENBLAS_CORETYPE=SkylakeX
  elif [[ $flags == *avx2* ]]; then export OPENBLAS_CORETYPE=Haswell
  fi
fi
