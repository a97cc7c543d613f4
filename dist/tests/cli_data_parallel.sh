#!/bin/sh
# `mpirun -np N attn train` against one process (ctest dist_cli_data_parallel_npN):
#   cli_data_parallel.sh MPIEXEC ATTN N
# - N processes and one process with the same --grad-shards write byte-identical checkpoints;
# - rank 0 alone reports (one "stopped at step" line);
# - a run stopped at step 2 and resumed by N processes to step 4 writes the checkpoint of the
#   uninterrupted 4-step run.
set -eu
mpiexec=$1 attn=$2 np=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
args="--corpus --corpus-train-pairs 500 --emb 8 --hidden 16 --batch 24 --lr 1e-2 --warmup 2 --eval-sentences 0 --threads 1 --grad-shards 12"
"$attn" train $args --max-steps 4 --out "$dir/one" 2>"$dir/one.log"
"$mpiexec" -np "$np" --oversubscribe "$attn" train $args --max-steps 4 --out "$dir/many" >"$dir/many.out" 2>"$dir/many.log"
cmp "$dir/one/checkpoint.safetensors" "$dir/many/checkpoint.safetensors"
reports=$(grep -c "stopped at step 4" "$dir/many.log")
[ "$reports" -eq 1 ] || { echo "expected one report (rank 0), got $reports"; cat "$dir/many.log"; exit 1; }
"$mpiexec" -np "$np" --oversubscribe "$attn" train $args --max-steps 2 --out "$dir/resumed" 2>"$dir/first.log"
"$mpiexec" -np "$np" --oversubscribe "$attn" train $args --max-steps 4 --out "$dir/resumed" --resume 2>"$dir/resume.log"
grep -q "resuming .* at step 2" "$dir/resume.log" || { cat "$dir/resume.log"; exit 1; }
cmp "$dir/one/checkpoint.safetensors" "$dir/resumed/checkpoint.safetensors"
echo "np $np: checkpoints identical to one process; resumed run identical"
