# Sourced by test.sh and numeric_matrix.sh: which OpenBLAS kernels this CPU can run, and a
# second one to rerun the numeric tests with. (attn itself never needs OPENBLAS_CORETYPE: it
# chooses the kernel when it loads, attn/runtime.h. These scripts set it only to test others.)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo || true)

# Every x86-64 kernel of Debian's DYNAMIC_ARCH OpenBLAS 0.3.21 that this CPU can execute and
# OPENBLAS_CORETYPE accepts, best first.
runnable_blas_kernels() {
  local k=()
  [[ $cpu_flags == *avx512bw* && $cpu_flags == *avx512vl* && $cpu_flags == *avx512dq* ]] && k+=(SkylakeX)
  [[ $cpu_flags == *avx2* && $cpu_flags == *fma* ]] && k+=(Haswell Zen)
  [[ $cpu_flags == *avx* ]] && k+=(Sandybridge)
  k+=(Nehalem Prescott)
  echo "${k[@]}"
}

# A kernel other than the one the suite ran with: OPENBLAS_CORETYPE if set, else attn's choice
# (the best of the CPU's tier).
second_blas_kernel() {
  local first=${OPENBLAS_CORETYPE:-}
  local best
  best=$(runnable_blas_kernels | cut -d' ' -f1)
  [[ -z $first ]] && first=$best
  if [[ ${first,,} == skylakex || ${first,,} == cooperlake ]]; then echo Haswell
  elif [[ $best == SkylakeX ]]; then echo SkylakeX
  elif [[ ${first,,} == haswell ]]; then echo Zen
  else echo Haswell
  fi
}
