#!/usr/bin/env bash
# The test suite on a loaded machine: RUNS fresh clones of HEAD, one after the other, each running
# .ci/run (the README's test command + ruff) beside LOADS CPU-bound busy loops started before the
# first run and stopped after the last. One summary line per run (commit, exit code, seconds).
#
#   bench/loaded_suite.sh [RUNS=3] [LOADS=2] [OUT=runs/loaded]
#
# Logs: OUT/run<i>.log; summary: OUT/summary.txt. Issue #29's target: three runs in a row pass.
set -u
runs=${1:-3}; loads=${2:-2}; repo=$(git rev-parse --show-toplevel); out=$(realpath -m "${3:-$repo/runs/loaded}")
mkdir -p "$out"
commit=$(git -C "$repo" rev-parse HEAD)
pids=()
for _ in $(seq "$loads"); do python3 -c "while True: pass" & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
for i in $(seq "$runs"); do
  d=$(mktemp -d)
  git clone -q "$repo" "$d/repo" && git -C "$d/repo" checkout -q "$commit"
  t0=$(date +%s)
  (cd "$d/repo" && bash .ci/run) > "$out/run$i.log" 2>&1
  rc=$?
  line="run $i/$runs commit $commit rc=$rc seconds=$(( $(date +%s) - t0 )) loads=$loads busy loops $(grep -E '[0-9]+ passed' "$out/run$i.log" | tail -1)"
  echo "$line" | tee -a "$out/summary.txt"
  rm -rf "$d"
done
