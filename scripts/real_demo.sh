#!/usr/bin/env bash
# Trains a translator on real text for about ten minutes and scores it as people report scores:
# the English -> French messages Debian ships (scripts/make_real_corpus.sh), a SentencePiece BPE
# vocabulary learnt in-process, the Transformer, validation BLEU every EVAL_EVERY steps on a
# held-out split (best.safetensors kept), then sacreBLEU-style BLEU and chrF2 of the best
# checkpoint on the test split (sources never seen in training), and a few translations with
# their alignments.
# Usage: scripts/real_demo.sh            (env: MINUTES=10 THREADS=2 BUILD=build-text OUT=runs/real_demo
#                                          CORPUS=runs/real_corpus VOCAB=4000 BEAM=1, MODEL="--arch ..."
#                                          to replace the model flags, ARGS="..." for more)
# --max-source 160 keeps every message of the corpus (at most 40 words, ~150 pieces): eval refuses
# a source longer than the model was trained on, and the test set must be scored whole.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${MINUTES:-10}"
threads="${THREADS:-2}"
build="${BUILD:-build-text}"
out="${OUT:-runs/real_demo}"
corpus="${CORPUS:-runs/real_corpus}"
vocab="${VOCAB:-4000}"
beam="${BEAM:-1}"
attn="$build/bin/attn"
[[ -x "$attn" ]] || { echo "real_demo: $attn not built (cmake --build $build --target attn_cli)" >&2; exit 1; }
[[ -f "$corpus/train.tsv" ]] || scripts/make_real_corpus.sh "$corpus"
cat "$corpus/stats.txt"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $threads threads"

# shellcheck disable=SC2086
"$attn" train --train "$corpus/train.tsv" --valid "$corpus/valid.tsv" --out "$out" --force \
  ${MODEL:---arch transformer --layers 2 --hidden 128 --heads 4 --dropout 0.1} \
  --subword bpe --vocab-size "$vocab" --max-source 160 \
  --batch 64 --lr 2e-3 --warmup 400 --schedule inverse_sqrt --label-smoothing 0.1 --epochs 50 \
  --time-limit "$((minutes * 60))" --eval-every "${EVAL_EVERY:-400}" --eval-sentences 300 \
  --progress-every 100 --threads "$threads" ${ARGS:-}

echo "== test ($corpus/test.tsv), best checkpoint, beam $beam"
"$attn" eval --model "$out/best.safetensors" --test "$corpus/test.tsv" --beam "$beam" \
  --threads "$threads" --output "$out/test.hyp.txt"
echo "== a few test translations (source, reference, translation and its alignment)"
head -n 3 "$corpus/test.tsv" | while IFS=$'\t' read -r source reference; do
  echo "source:      $source"
  echo "reference:   $reference"
  printf 'translation: '
  "$attn" translate --model "$out/best.safetensors" --threads "$threads" -- "$source"
done
