// Shared by the dist tests, which run under mpirun: this process's rank, the number of ranks,
// and a gtest main that initialises MPI and lets rank 0 alone print passing tests.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

namespace attn::testing {

inline int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int ranks() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

inline int mpi_gtest_main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank_of() != 0) ::testing::GTEST_FLAG(brief) = true;  // failures only, from other ranks
  const int failed = RUN_ALL_TESTS();
  MPI_Finalize();
  return failed;
}

}  // namespace attn::testing
