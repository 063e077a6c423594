#!/usr/bin/env bash
# Kill liverseg with SIGKILL at random moments across a cheap whole-pipeline
# run (ingest, normalise, split, augment, a small search, training,
# evaluation, report), N times, then check what a user relies on:
#   partial   folders in the store without a complete manifest
#   verify    `liverseg verify` failures after a kill (exit 1: a damaged or
#             partial artifact; exit 3, leftovers of the killed build in
#             artifacts/.tmp, is what a kill leaves and is counted apart)
#   orphans   worker processes still alive a second after their engine died
#   reruns    runs that failed on their own (not killed), and the final run
# Runs go in pairs with the same params (augment.seed = i/2, so every pair
# has new work from augment down): the second run of a pair resumes where
# the killed first one stopped. At the end an uninterrupted run must
# finish, verify must pass and a last run must run nothing.
#   bash bench/chaos.sh [KILLS=20] [MAX_DELAY_S=25] [SEED=1]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${LIVERSEG_BIN:-$PWD/target/release/liverseg}
KILLS=${1:-20}; MAX_DELAY=${2:-25}; RANDOM=${3:-1}
P=$PWD/target/bench/chaos
rm -rf "$P"; mkdir -p "$P"
cat > "$P/pipeline.yaml" <<'YAML'
data: {source: synthetic, synthetic_cases: 12, synthetic_size: 64, synthetic_slices: 10}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 64}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  tune:
    deps: [normalise, split, augment]
    params: {strategies: [random], budget: 3, trial_epochs: 1, trial_max_slices: 16, trial_encoder: resnet18, threads: 2}
  train:
    deps: [normalise, split, augment, tune]
    params: {encoder: resnet18, epochs: 3, batch_size: 8, threads: 2}
  baseline:
    deps: [normalise, split, augment]
    params: {encoder: resnet18, epochs: 2, batch_size: 8, threads: 2}
  evaluate: {deps: [ingest, normalise, split, train, baseline], params: {split: val}}
  report: {deps: [ingest, normalise, split, evaluate, train, baseline, tune]}
YAML

partial=0; verify_failed=0; orphans=0; failed_runs=0; leftovers=0
for i in $(seq 1 "$KILLS"); do
  delay_ms=$(( RANDOM % (MAX_DELAY * 1000) ))
  SET=(-P "augment.seed=$(( i / 2 ))")
  (cd "$P" && exec "$BIN" run -q "${SET[@]}") 2>>"$P/runs.log" &
  pid=$!
  t=0
  while [ $t -lt $delay_ms ] && kill -0 $pid 2>/dev/null; do sleep 0.05; t=$((t + 50)); done
  if kill -0 $pid 2>/dev/null; then
    kill -9 $pid; wait $pid 2>/dev/null
    what="killed after ${delay_ms} ms"
  else
    wait $pid; rc=$?
    [ $rc -ne 0 ] && failed_runs=$((failed_runs + 1))
    what="finished before the kill (exit $rc)"
  fi
  sleep 1
  n_orphans=$(pgrep -f "liverseg-torch stage $P/" | wc -l)
  orphans=$((orphans + n_orphans))
  n_partial=$(find "$P/artifacts" -mindepth 2 -maxdepth 2 -type d ! -path '*/.*' 2>/dev/null | while read -r d; do [ -f "$d/manifest.json" ] || echo "$d"; done | wc -l)
  partial=$((partial + n_partial))
  (cd "$P" && "$BIN" verify >/dev/null 2>>"$P/verify.log"); rc=$?
  case $rc in 0) ;; 3) leftovers=$((leftovers + 1)) ;; *) verify_failed=$((verify_failed + 1)) ;; esac
  echo "kill $i: $what; orphans $n_orphans, partial $n_partial"
  pkill -9 -f "liverseg-torch stage $P/" 2>/dev/null
done
if ! (cd "$P" && "$BIN" run -q "${SET[@]}" 2>>"$P/runs.log"); then failed_runs=$((failed_runs + 1)); fi
(cd "$P" && "$BIN" verify) || verify_failed=$((verify_failed + 1))
last=$(cd "$P" && "$BIN" run -q --json "${SET[@]}")
echo "last run: $last"
echo "$KILLS kills: $partial partial artifacts, $verify_failed verify failures, $orphans orphans, $failed_runs failed reruns ($leftovers kills left a build in .tmp, cleared by the next run)"
[ "$partial$verify_failed$orphans$failed_runs" = "0000" ] && echo "$last" | grep -q '"ran":\[\]'
