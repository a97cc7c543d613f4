#!/usr/bin/env bash
# Kill -9 trials: a tiny training run that checkpoints after every step is killed at random
# moments (start-up, training, mid-save) again and again. After every kill the directory must
# load (`attn translate`), and the next start resumes from it (removing the dead save's
# temporary file). Once a run reaches --max-steps, its final checkpoint must equal, byte for
# byte, the one of an uninterrupted run; then the next episode starts from scratch.
#
#   bash scripts/kill_trials.sh [KILLS] [BUILD_DIR]      (defaults: 200 kills, build/)
#
# Prints one summary line; exit status 0 only when every load and every comparison passed.
set -euo pipefail
kills_wanted=${1:-200}
build=${2:-build}
attn="$build/bin/attn"
[[ -x "$attn" ]] || { echo "kill_trials: no $attn (build it first)" >&2; exit 2; }
work=$(mktemp -d /tmp/attn_kill_trials.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Results are bit for bit only at a fixed thread count (train.h).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive
steps=40
max_delay_ms=${MAX_DELAY_MS:-1500}
train=(train --corpus --corpus-train-pairs 300 --emb 8 --hidden 16 --batch 8 --epochs 3
       --max-steps "$steps" --checkpoint-every 1 --eval-sentences 0 --progress-every 1000
       --threads 1)

"$attn" "${train[@]}" --out "$work/reference" > /dev/null 2> "$work/reference.log"
reference="$work/reference/checkpoint.safetensors"

kills=0 mid_save=0 loads=0 no_checkpoint=0 episodes=0 identical=0 failures=0
episode_kills=0 killed_episodes=0 max_episode_kills=0  # kills within one episode
run="$work/run"
RANDOM=${KILL_TRIALS_SEED:-1}
end_episode() {
  episodes=$((episodes + 1))
  if ((episode_kills > 0)); then killed_episodes=$((killed_episodes + 1)); fi
  if ((episode_kills > max_episode_kills)); then max_episode_kills=$episode_kills; fi
  episode_kills=0
}
while ((kills < kills_wanted)); do
  args=("${train[@]}" --out "$run")
  [[ -f "$run/checkpoint.safetensors" ]] && args+=(--resume)
  "$attn" "${args[@]}" > /dev/null 2> "$work/last.log" &
  pid=$!
  # Uniform over about one run (start-up and all steps): MAX_DELAY_MS.
  delay=$((RANDOM * 32768 + RANDOM))
  delay=$((delay % max_delay_ms))
  sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
  if kill -9 "$pid" 2> /dev/null; then
    wait "$pid" 2> /dev/null || true
    kills=$((kills + 1)) episode_kills=$((episode_kills + 1))
    # Its own temporary file left behind: the kill landed between creating and renaming it.
    if compgen -G "$run/.checkpoint.safetensors.tmp-$pid-*" > /dev/null; then
      mid_save=$((mid_save + 1))
    fi
    if [[ -f "$run/checkpoint.safetensors" ]]; then
      if "$attn" translate --model "$run" --no-alignment "the cat ." > /dev/null 2> "$work/load.log"
      then
        loads=$((loads + 1))
      else
        failures=$((failures + 1))
        echo "kill $kills: the checkpoint does not load: $(cat "$work/load.log")" >&2
      fi
    else
      no_checkpoint=$((no_checkpoint + 1))  # killed before its first save
    fi
    continue
  fi
  # The run ended before the kill: it must have succeeded and match the reference.
  if ! wait "$pid"; then
    failures=$((failures + 1))
    echo "episode $((episodes + 1)): the run failed: $(tail -n 3 "$work/last.log")" >&2
  fi
  end_episode
  if cmp -s "$reference" "$run/checkpoint.safetensors"; then
    identical=$((identical + 1))
  else
    failures=$((failures + 1))
    echo "episode $episodes: final checkpoint differs from the uninterrupted run's" >&2
  fi
  leftover=$(compgen -G "$run/.checkpoint.safetensors.tmp-*" | wc -l || true)
  if ((leftover > 0)); then
    failures=$((failures + 1))
    echo "episode $episodes: $leftover stale temporary file(s) left" >&2
  fi
  rm -rf "$run"
done
# Finish the episode in progress and compare it too.
args=("${train[@]}" --out "$run")
[[ -f "$run/checkpoint.safetensors" ]] && args+=(--resume)
if "$attn" "${args[@]}" > /dev/null 2> "$work/last.log" &&
   cmp -s "$reference" "$run/checkpoint.safetensors"; then
  end_episode
  identical=$((identical + 1))
else
  end_episode
  failures=$((failures + 1))
  echo "last episode: failed or differs: $(tail -n 3 "$work/last.log")" >&2
fi
echo "kill_trials: $kills kills ($mid_save mid-save, $no_checkpoint before the first" \
     "checkpoint), $loads loads after a kill, $identical/$episodes episodes bit-identical to" \
     "the uninterrupted run ($steps steps; $killed_episodes of them killed 1-$max_episode_kills" \
     "times), $failures failures"
((failures == 0))
