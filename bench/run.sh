#!/usr/bin/env bash
# liverseg benchmarks (make bench). Each comparison runs both sides in this
# one invocation, so ratios are measured under the same machine load.
#   engine: no-op `liverseg run` over >= 1,000 raw files (target < 50 ms)
#   data:   ingest + normalise slices/s vs a plain Python reference (target >= 4x)
#   train:  DeepLabV3+ResNet34 images/s vs segmentation_models_pytorch, medians of 5 pairs (target >= 1x)
#   predict: slices/s of a 512x512x100 volume vs smp, fp32 and bf16 (target >= 1x)
# `bash bench/run.sh engine-scale` times no-op runs over 1k-1M hard-linked raw
#   files beside DVC (SCALE_SIZES, SCALE_PAIRS; raw_scan stat and folders).
# `bash bench/run.sh pipeline-parallel` times the quick pipeline with -j 1
#   and -j 2 (PARALLEL_REPS alternating pairs, default 3).
# `bash bench/run.sh dag-sim` runs a simulated DAG through the engine on the
#   test Slurm cluster: 1,000 stand-in stages, then a 10,000-trial sweep
#   (DAG_STAGES, DAG_TRIALS, DAG_WIDTH; DAG_SIM_BASELINE=an older dag_sim
#   binary runs beside it), with wall and engine CPU per stage and the
#   squeue and sbatch calls. Needs no data and no torch.
# `bash bench/run.sh accuracy` trains msd.yaml (about 1.5 hours on 2 cores;
#   ACCURACY_MODELS=train for DeepLabV3+ alone, ACCURACY_SET for -P overrides;
#   ACCURACY_EXTERNAL=dir1,dir2 external sources, default the shared external-dev).
# `bash bench/run.sh robustness` screens intensity-robust recipes at 64²
#   (ROBUST_RECIPES, ROBUST_EPOCHS) on MSD validation, simulated exports,
#   MSD test and ACCURACY_EXTERNAL.
# `bash bench/run.sh tune` compares random search, TPE and a Gaussian process
#   on the MSD slices, 3 seeds each (TUNE_NO_PRUNE=1 adds a study without
#   pruning; TUNE_BUDGET trials per strategy, default 12).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LIVERSEG_BIN:-$PWD/target/release/liverseg}
WORKER=$(dirname "$BIN")/liverseg-torch
PY=$PWD/.venv/bin/python
SHARED=$(cd .. && pwd)/shared/data
OUT=$PWD/target/bench
mkdir -p "$OUT"
what=${1:-all}

if [ "$what" = dag-sim ]; then
  cargo build --release --locked -q -p liverseg-engine --example dag_sim
  D=$OUT/dag-sim; rm -rf "$D"; mkdir -p "$D"
  sims=("${CARGO_TARGET_DIR:-$PWD/target}/release/examples/dag_sim"); [ -n "${DAG_SIM_BASELINE:-}" ] && sims+=("$DAG_SIM_BASELINE")
  n=${DAG_STAGES:-1000}; t=${DAG_TRIALS:-10000}; w=${DAG_WIDTH:-50}
  script=$D/runs.sh
  {
    echo 'set -e; echo "test cluster: $(sinfo -h -o "%P %c CPUs" | tr "\n" " ")"'
    echo 'sim() { log=$1.log; "${@:2}" 2>"$log" || { tail -20 "$log"; exit 1; }; }'
    for i in "${!sims[@]}"; do
      label=$([ "$i" = 0 ] && echo current || echo baseline)
      echo "echo '## $label: ${sims[$i]}'"
      echo "sim '$D/$label-local' '${sims[$i]}' '$D/$label-local' $n 0 $w local"
      echo "sim '$D/$label-stages' '${sims[$i]}' '$D/$label-stages' $n 0 $w slurm"
      echo "sim '$D/$label-trials' '${sims[$i]}' '$D/$label-trials' 1 $t $w slurm"
    done
  } > "$script"
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) cores"
  echo "## dag-sim: $n stand-in stages in layers of $w, then $t stand-in trials, through the engine"
  exec bash tests/slurm/with_cluster.sh bash "$script"
fi

if [ ! -d "$SHARED/msd-liver-2d" ]; then
  echo "SKIPPED: $SHARED/msd-liver-2d is absent; the benchmarks run on the shared MSD slices"
  exit 0
fi
# oneDNN picks kernels by CPU model and ISA: every figure goes with its CPU.
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) cores; $(grep -o -w -m1 -E 'avx512f|avx512_bf16|amx_tile|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
# Needs no torch: DVC goes into its own throwaway venv.
if [ "$what" = engine-scale ]; then
  exec bash bench/engine_scale.sh "$SHARED/msd-liver-2d" "$OUT/scale"
fi
"$PY" -c "import numpy, PIL, nibabel, safetensors, segmentation_models_pytorch" 2>/dev/null || \
  .venv/bin/pip install --quiet numpy pillow nibabel segmentation-models-pytorch torch==2.13.0


peak_kb() { /usr/bin/time -f "%M" "$@" 2>&1 >/dev/null | tail -1; }

if [ "$what" = all ] || [ "$what" = engine ]; then
  echo "## engine: no-op run, default pipeline, MSD slices (1,042 raw files)"
  P=$OUT/noop; rm -rf "$P"; mkdir -p "$P"
  cp pipeline.yaml "$P/pipeline.yaml"
  # The default pipeline on the MSD files, with cheap training so every stage
  # has an artifact; the no-op cost does not depend on it. The external
  # phantom site is HU and the MSD models 8-bit: force_unit lets evaluate run.
  CHEAP=(-P data.source=slices2d -P data.root=$SHARED/msd-liver-2d -P train.epochs=1 -P train.max_train_slices=16
         -P baseline.epochs=1 -P baseline.max_train_slices=16 -P "tune.strategies=[random]" -P tune.budget=1
         -P tune.trial_epochs=1 -P tune.trial_max_slices=8 -P evaluate.force_unit=true)
  (cd "$P" && "$BIN" run -q "${CHEAP[@]}")
  (cd "$P" && "$BIN" run -q "${CHEAP[@]}" --json) | grep -q '"ran":\[\]'
  times=()
  for i in $(seq 1 21); do
    s=$(date +%s%N); (cd "$P" && "$BIN" run -q "${CHEAP[@]}" >/dev/null); e=$(date +%s%N)
    times+=($(( (e - s) / 1000 )))
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 11p)
  echo "no-op run: median of 21 = $(echo "scale=1; $median/1000" | bc) ms (scan cache: $(ls -l "$P/artifacts/.cache/scan.bin" | awk '{print $5}') bytes)"
  # ENGINE_BASELINE=/path/to/an/older/liverseg: both binaries on the same
  # store in alternating pairs, so the ratio sees the same machine load.
  if [ -n "${ENGINE_BASELINE:-}" ]; then
    base=(); new=()
    for i in $(seq 1 21); do
      s=$(date +%s%N); (cd "$P" && "$ENGINE_BASELINE" run -q "${CHEAP[@]}" >/dev/null); e=$(date +%s%N); base+=($(( (e - s) / 1000 )))
      s=$(date +%s%N); (cd "$P" && "$BIN" run -q "${CHEAP[@]}" >/dev/null); e=$(date +%s%N); new+=($(( (e - s) / 1000 )))
    done
    mb=$(printf '%s\n' "${base[@]}" | sort -n | sed -n 11p); mn=$(printf '%s\n' "${new[@]}" | sort -n | sed -n 11p)
    echo "no-op run, 21 alternating pairs: baseline $(echo "scale=1; $mb/1000" | bc) ms, this build $(echo "scale=1; $mn/1000" | bc) ms, ratio $(echo "scale=2; $mn/$mb" | bc)"
  fi
fi

if [ "$what" = all ] || [ "$what" = data ]; then
  echo "## data: ingest + normalise to 224x224, slices/s (same run, same load)"
  # Each side: one untimed warm-up run, then REPS runs back to back (as
  # hyperfine does), liverseg from an empty store each time; the medians are
  # compared. Not interleaved: while single-threaded Python runs the second
  # core idles, and a two-threaded run started right after it measured about
  # 10% slower than back to back (20-30% after an idle pause). Single runs
  # vary by ~15% on this shared machine, hence medians.
  REPS=${DATA_REPS:-9}; PYREF=$PWD/bench/py_ingest.py
  D=$OUT/data; rm -rf "$D"; mkdir -p "$D"
  "$BIN" synth "$D/nifti" --cases 20 --size 256 --slices 40 --seed 3 >/dev/null
  median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for src in msd nifti; do
    if [ $src = msd ]; then root=$SHARED/msd-liver-2d; kind=slices2d; else root=$D/nifti; kind=nifti; fi
    cat > "$D/pipeline.yaml" <<YAML
data: {source: $kind, root: $root}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 224}}
YAML
    rs=(); ps=(); pws=()
    pushd "$D" >/dev/null
    rm -rf artifacts; "$BIN" run -q normalise
    for i in $(seq 1 "$REPS"); do
      rm -rf artifacts
      t0=$EPOCHREALTIME; "$BIN" run -q normalise; t1=$EPOCHREALTIME
      rs+=("$(echo "$t1 - $t0" | bc)")
    done
    "$PY" "$PYREF" $kind "$root" 224 >/dev/null
    for i in $(seq 1 "$REPS"); do
      t0=$EPOCHREALTIME; out=$("$PY" "$PYREF" $kind "$root" 224); t1=$EPOCHREALTIME
      read -r pn psecs _ pmb <<< "$out"
      ps+=("$psecs"); pws+=("$(echo "$t1 - $t0" | bc)")
    done
    rm -rf artifacts; kb=$(/usr/bin/time -f "%M" "$BIN" run -q normalise 2>&1 | tail -1)
    n=$("$BIN" lineage normalise.slices_kept | head -1 | awk '{print $3}')
    popd >/dev/null
    rmed=$(printf '%s\n' "${rs[@]}" | median); pmed=$(printf '%s\n' "${ps[@]}" | median); pwmed=$(printf '%s\n' "${pws[@]}" | median)
    rrate=$(echo "scale=1; $n/$rmed" | bc); prate=$(echo "scale=1; $pn/$pmed" | bc); pwrate=$(echo "scale=1; $pn/$pwmed" | bc)
    printf '%s: liverseg %s slices in %.3fs = %s slices/s, peak %s MiB | python %s slices: loop %.3fs = %s slices/s, whole process %.3fs = %s slices/s, peak %s MiB\n' \
      "$src" "$n" "$rmed" "$rrate" "$((kb/1024))" "$pn" "$pmed" "$prate" "$pwmed" "$pwrate" "$pmb"
    echo "$src: ratio $(echo "scale=2; $rrate/$prate" | bc)x against the Python loop, $(echo "scale=2; $rrate/$pwrate" | bc)x against the whole Python process (medians of $REPS)"
    echo "$src runs (s): liverseg ${rs[*]} | python loop ${ps[*]} | python process ${pws[*]}"
  done
fi

if [ "$what" = all ] || [ "$what" = train ]; then
  echo "## train: DeepLabV3+ResNet34, Adam, fp32, CPU images/s (train / inference)"
  # TRAIN_PAIRS back-to-back pairs (liverseg, then smp) per configuration;
  # the medians of each side are compared, so one noisy run moves nothing.
  PAIRS=${TRAIN_PAIRS:-5}
  PHASES=$OUT/train_phases.txt; : > "$PHASES"
  median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for cfg in "224 8 8" "128 16 8"; do
    set -- $cfg
    rts=(); ris=(); pts=(); pis=()
    for i in $(seq 1 "$PAIRS"); do
      # Each side's seconds per step in forward, backward and the optimizer go to the phases file.
      echo "${1}x${1} pair $i liverseg" >> "$PHASES"
      read -r rt ri < <("$WORKER" bench-train --size $1 --batch $2 --steps $3 2>>"$PHASES")
      echo "${1}x${1} pair $i smp" >> "$PHASES"
      read -r pt pi < <("$PY" -W ignore bench/py_train_speed.py $1 $2 $3 2>>"$PHASES")
      rts+=("$rt"); ris+=("$ri"); pts+=("$pt"); pis+=("$pi")
    done
    rt=$(printf '%s\n' "${rts[@]}" | median); ri=$(printf '%s\n' "${ris[@]}" | median)
    pt=$(printf '%s\n' "${pts[@]}" | median); pi=$(printf '%s\n' "${pis[@]}" | median)
    echo "${1}x${1} batch $2, medians of $PAIRS pairs: liverseg $rt / $ri | smp $pt / $pi | train ratio $(echo "scale=2; $rt/$pt" | bc)x, inference ratio $(echo "scale=2; $ri/$pi" | bc)x"
    echo "${1}x${1} runs: liverseg train ${rts[*]} inference ${ris[*]} | smp train ${pts[*]} inference ${pis[*]}"
  done
  echo "seconds per training step by phase, every run: $PHASES"
fi

if [ "$what" = all ] || [ "$what" = predict ]; then
  echo "## predict: a 512x512x100 CT volume, DeepLabV3+ResNet34 at 224^2, batch 8, no mirroring, slices/s"
  # The same weights (smp's initialisation, seed 0) and the same steps on
  # both sides; runs alternate, REPS each, medians compared. liverseg is timed
  # launch to exit (loading the model, checking and reading the input,
  # writing the mask); smp both as a whole process and as its loop alone
  # (reading the volume to writing the mask, without imports and model load).
  REPS=${PREDICT_REPS:-3}; PR=$OUT/predict; rm -rf "$PR"; mkdir -p "$PR"
  "$PY" bench/py_predict_speed.py setup "$PR" 100 224
  median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for prec in fp32 bf16; do
    ls_t=(); py_t=(); py_loop=()
    for i in $(seq 1 "$REPS"); do
      rm -rf "$PR/out"
      t0=$EPOCHREALTIME; "$BIN" predict -m "$PR/model" -i "$PR/volume.nii.gz" -o "$PR/out" --no-mirror --no-largest-component --precision $prec >/dev/null; t1=$EPOCHREALTIME
      ls_t+=("$(echo "$t1 - $t0" | bc)")
      t0=$EPOCHREALTIME; read -r n loop < <("$PY" bench/py_predict_speed.py smp "$PR" $prec); t1=$EPOCHREALTIME
      py_t+=("$(echo "$t1 - $t0" | bc)"); py_loop+=("$loop")
    done
    cp "$PR/out/volume_liver.nii.gz" "$PR/liverseg_$prec.nii.gz"
    l=$(printf '%s\n' "${ls_t[@]}" | median); p=$(printf '%s\n' "${py_t[@]}" | median); pl=$(printf '%s\n' "${py_loop[@]}" | median)
    read -r same dice < <("$PY" bench/py_predict_speed.py agree "$PR/liverseg_$prec.nii.gz" "$PR/smp_${prec}_liver.nii.gz")
    printf '%s: liverseg %.1f slices/s (%.2fs) | smp process %.1f (%.2fs), loop %.1f (%.2fs) | ratio %.2fx process, %.2fx against the loop | masks agree on %s of voxels, Dice %s\n' \
      $prec "$(echo "100/$l" | bc -l)" "$l" "$(echo "100/$p" | bc -l)" "$p" "$(echo "100/$pl" | bc -l)" "$pl" "$(echo "$p/$l" | bc -l)" "$(echo "$pl/$l" | bc -l)" "$same" "$dice"
    echo "$prec runs (s): liverseg ${ls_t[*]} | smp process ${py_t[*]} | smp loop ${py_loop[*]}"
  done
  read -r same dice < <("$PY" bench/py_predict_speed.py agree "$PR/liverseg_bf16.nii.gz" "$PR/liverseg_fp32.nii.gz")
  echo "liverseg bf16 against fp32 masks: agree on $same of voxels, Dice $dice (random-init weights; see BENCHMARKS.md for a trained model)"
fi

if [ "$what" = pipeline-parallel ]; then
  # The quick pipeline from an empty store, `-j 1` and `-j 2` alternating,
  # PARALLEL_REPS pairs (default 3; about 12 minutes a run on 2 cores).
  echo "## pipeline-parallel: make reproduce's pipeline, -j 1 against -j 2"
  P=$OUT/parallel; one=(); two=()
  for i in $(seq "${PARALLEL_REPS:-3}"); do
    for j in 1 2; do
      rm -rf "$P" && mkdir -p "$P" && cp pipeline.yaml "$P/"
      s=$(date +%s%N); (cd "$P" && "$BIN" run -q -j "$j"); e=$(date +%s%N)
      t=$(( (e - s) / 1000000 ))
      echo "run $i, -j $j: $(awk -v t="$t" 'BEGIN { printf "%.1f", t / 1000 }') s"
      if [ "$j" = 1 ]; then one+=("$t"); else two+=("$t"); fi
    done
  done
  m1=$(printf '%s\n' "${one[@]}" | sort -n | sed -n "$(( (${#one[@]} + 1) / 2 ))p")
  m2=$(printf '%s\n' "${two[@]}" | sort -n | sed -n "$(( (${#two[@]} + 1) / 2 ))p")
  awk -v a="$m1" -v b="$m2" -v n="${#one[@]}" 'BEGIN { printf "median of %d: -j 1 %.1f s, -j 2 %.1f s, -j 1 / -j 2 = %.2f\n", n, a / 1000, b / 1000, a / b }'
fi

if [ "$what" = robustness ]; then
  # Intensity-robust recipes at a screening budget (64², ResNet18 encoder,
  # ROBUST_EPOCHS epochs, default 8; a few minutes each on 2 cores), each
  # a named run of one pipeline: MSD validation as exported and under the
  # simulated exports (what a recipe is chosen on), MSD test and the
  # external sources (for seeing, never choosing), Dice per case and PA.
  echo "## robustness: recipes at 64², resnet18, ${ROBUST_EPOCHS:-8} epochs; external: ${ACCURACY_EXTERNAL:-$SHARED/external-dev/chaos-ct-2d}"
  R=$OUT/robustness; mkdir -p "$R"
  "$PY" - "$SHARED/msd-liver-2d" "${ACCURACY_EXTERNAL:-$SHARED/external-dev/chaos-ct-2d}" "${ACCURACY_EXTERNAL_REGEX:-(\d+)_(\d+)}" "${ROBUST_EPOCHS:-8}" > "$R/pipeline.yaml" <<'PYEOF'
import os, re, sys, yaml
root, external, regex, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stages = {
    "ingest": {}, "normalise": {"deps": ["ingest"], "params": {"size": 64}}, "split": {"deps": ["normalise"]},
    "augment": {"deps": ["normalise", "split"], "params": {"copies": 1}},
    "train": {"deps": ["normalise", "split", "augment"], "params": {"encoder": "resnet18", "epochs": epochs, "patience": epochs, "batch_size": 16, "loss": "ce_dice", "seed": 3}},
    "evaluate": {"deps": ["ingest", "normalise", "split", "train"], "params": {"split": "test", "bootstrap": 2000}},
}
ext = {re.sub(r"\W", "_", os.path.basename(p.rstrip("/"))): {"source": "slices2d", "root": p, "case_regex": regex} for p in external.split(",") if p}
print(yaml.safe_dump({"data": {"source": "slices2d", "root": root}, "external": ext, "stages": stages}, sort_keys=False))
PYEOF
  RECIPES=${ROBUST_RECIPES:-"fixed: nnunet:train.online_augment=nnunet domain:train.online_augment=domain percentile:train.input_scaling=percentile percentile_domain:train.input_scaling=percentile,train.online_augment=domain nyul:train.input_scaling=nyul nyul_domain:train.input_scaling=nyul,train.online_augment=domain"}
  for recipe in $RECIPES; do
    name=${recipe%%:*}; SETS=(); IFS=, read -r -a sets <<< "${recipe#*:}"; for s in "${sets[@]}"; do SETS+=(-P "$s"); done
    s=$(date +%s); (cd "$R" && "$BIN" run -q "${SETS[@]}" --name "$name") 2>&1 | grep -E "rror|warning" || true; e=$(date +%s)
    echo "$name: $((e - s)) s (cd $R && liverseg run ${SETS[*]})"
    "$PY" bench/accuracy_table.py "$R/$(cd "$R" && "$BIN" path evaluate -q "${SETS[@]}")" "$name" | { [ "$recipe" = "${RECIPES%% *}" ] && cat || tail -n +3; }
  done
fi

if [ "$what" = tune ]; then
  echo "## tune: best validation Dice vs trials, random vs bayes (TPE) vs gp, MSD slices at 96x96"
  "$PY" -c "import pyarrow" 2>/dev/null || .venv/bin/pip install --quiet pyarrow
  T=$OUT/tune; mkdir -p "$T"
  BUDGET=${TUNE_BUDGET:-12}
  RUNS=("0 median" "1 median" "2 median"); [ -n "${TUNE_NO_PRUNE:-}" ] && RUNS+=("0 none")
  for run in "${RUNS[@]}"; do
    set -- $run
    R=$T/seed$1-$2; mkdir -p "$R"
    cat > "$R/pipeline.yaml" <<YAML
data: {source: slices2d, root: $SHARED/msd-liver-2d}
stages:
  ingest: {}
  normalise: {deps: [ingest], params: {size: 96}}
  split: {deps: [normalise]}
  augment: {deps: [normalise, split], params: {copies: 1}}
  tune:
    deps: [normalise, split, augment]
    params: {strategies: [random, bayes, gp], budget: $BUDGET, seed: $1, objective: val_dice,
             trial_epochs: 3, trial_max_slices: 128, trial_encoder: resnet18,
             prune: $2, prune_warmup: 1, threads: 2}
YAML
    s=$(date +%s); (cd "$R" && "$BIN" run tune 2>&1 | grep --line-buffered -E "^(tune|ran|reused)|rror"); e=$(date +%s)
    echo "seed $1, prune $2: $((e - s)) s wall (cached trials are not rerun)"
  done
  "$PY" bench/tune_curve.py "$T"
fi

if [ "$what" = accuracy ]; then
  # msd.yaml as it is, or with ACCURACY_MODELS=train the DeepLabV3+ alone
  # (baseline removed); ACCURACY_SET adds -P overrides, e.g. a candidate recipe:
  #   ACCURACY_SET="train.online_augment=domain train.stop_metric=val_dice"
  # Every external source (ACCURACY_EXTERNAL=dir1,dir2; default the shared
  # external-dev set, case regex ACCURACY_EXTERNAL_REGEX) is an `external:`
  # dataset of the same pipeline: scored by the same evaluate, with the same
  # post-processing, one row per source. They are for seeing generalisation:
  # recipes are chosen on validation and the simulated exports (val_shift).
  echo "## accuracy: msd.yaml (models: ${ACCURACY_MODELS:-train baseline}; overrides: ${ACCURACY_SET:-none})"
  A=$OUT/accuracy; mkdir -p "$A"
  "$PY" - "$SHARED/msd-liver-2d" "${ACCURACY_MODELS:-train baseline}" "${ACCURACY_EXTERNAL:-$SHARED/external-dev/chaos-ct-2d}" "${ACCURACY_EXTERNAL_REGEX:-(\d+)_(\d+)}" > "$A/pipeline.yaml" <<'PYEOF'
import os, re, sys, yaml
root, models, external, regex = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
d = yaml.safe_load(open("msd.yaml"))
d["profiles"]["msd"]["data.root"] = root
for m in ("train", "baseline"):
    if m not in models:
        del d["stages"][m]
        d["stages"]["evaluate"]["deps"].remove(m)
        d["profiles"]["msd"] = {k: v for k, v in d["profiles"]["msd"].items() if not k.startswith(m + ".")}
d["external"] = {re.sub(r"\W", "_", os.path.basename(p.rstrip("/"))): {"source": "slices2d", "root": p, "case_regex": regex} for p in external.split(",") if p}
print(yaml.safe_dump(d, sort_keys=False))
PYEOF
  SETS=(); for s in ${ACCURACY_SET:-}; do SETS+=(-P "$s"); done
  (cd "$A" && /usr/bin/time -v "$BIN" run "${SETS[@]}") 2>&1 | tee "$A/log.txt" | grep -E "^(ran|Epoch|early|train:|baseline:|Loss|val )|Dice per case|rror|warning"
  (cd "$A" && "$BIN" lineage evaluate "${SETS[@]}" | head -40)
  "$PY" bench/accuracy_table.py "$A/$(cd "$A" && "$BIN" path evaluate -q "${SETS[@]}")" "${ACCURACY_SET:-msd.yaml}"
fi
