// sgemm GFLOP/s of whichever OpenBLAS kernel OPENBLAS_CORETYPE names (or OpenBLAS autodetects),
// without attn: the table "OpenBLAS kernels and the choice attn makes" in BENCHMARKS.md.
// Deliberately not linked to attn, whose load-time kernel choice would change what is measured.
//   gcc -O2 bench/openblas_sgemm.c -I/usr/include/x86_64-linux-gnu/openblas-pthread -lopenblas
//       -o /tmp/openblas_sgemm
//   OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=SkylakeX /tmp/openblas_sgemm 1024
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

char* openblas_get_corename(void);

int main(int argc, char** argv) {
  const int n = argc > 1 ? atoi(argv[1]) : 1024, reps = 10;
  float* a = malloc(sizeof(float) * n * n);
  float* b = malloc(sizeof(float) * n * n);
  float* c = malloc(sizeof(float) * n * n);
  if (!a || !b || !c) return 1;
  for (int i = 0; i < n * n; i++) a[i] = (i % 7) * 0.1f, b[i] = (i % 5) * 0.1f, c[i] = 0;
  // One untimed call: thread start-up and first-touch page faults.
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int r = 0; r < reps; r++)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  printf("%s: sgemm %d^3 %.1f GFLOP/s\n", openblas_get_corename(), n,
         2.0 * n * n * n * reps / s / 1e9);
  free(a), free(b), free(c);
  return 0;
}
