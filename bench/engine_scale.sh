#!/usr/bin/env bash
# No-op cost over many raw files, liverseg beside DVC (bench/run.sh engine-scale).
# For each size, one folder holds data/ (hard links to the MSD slices, half
# images and half masks), liverseg's pipeline (the engine_scale example: a
# source stage over data/ and seven chained steps) and a DVC project with the
# same shape (one stage depending on data/, seven chained after it).
# No-op runs alternate liverseg and DVC so the ratio sees the same load;
# `find` stat-ing every file is the floor a per-file stat cannot beat.
#   SCALE_SIZES  files per folder (default "1000 10000 100000 1000000")
#   SCALE_PAIRS  alternating pairs per size (default 11; 3 at 1,000,000)
set -euo pipefail
SRC=$1 S=$2
mkdir -p "$S"
cargo build --release --locked -q -p liverseg-engine --example engine_scale
ENGINE=$PWD/target/release/examples/engine_scale

DVC=$S/dvc-venv/bin/dvc
if ! "$DVC" version >/dev/null 2>&1; then
  echo "installing DVC 3.67.1 into $S/dvc-venv (throwaway)"
  rm -rf "$S/dvc-venv" && python3 -m venv "$S/dvc-venv"
  "$S/dvc-venv/bin/pip" install --quiet dvc==3.67.1
fi
echo "DVC $("$DVC" version 2>/dev/null | sed -n 's/^DVC version: //p')"

# One private copy of the slices, so hard links stay on this file system.
if [ ! -f "$S/src/.done" ]; then
  rm -rf "$S/src" && mkdir -p "$S/src" && cp -r "$SRC/images" "$SRC/masks" "$S/src/" && touch "$S/src/.done"
fi

ms() { awk -v us="$1" 'BEGIN { printf "%.3f", us / 1e6 }'; }
median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
# Wall time of a command in microseconds.
timed() { local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
peak_mb() { /usr/bin/time -f "%M" "$@" 2>&1 >/dev/null | tail -1 | awk '{printf "%.0f", $1/1024}'; }

build() { # N DIR: N files under DIR/data, by hard links
  "$(command -v python3)" - "$S/src" "$2/data" "$1" <<'PY'
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sorted(os.listdir(os.path.join(src, "images")))
for sub in ("images", "masks"):
    os.makedirs(os.path.join(dst, sub), exist_ok=True)
for i in range(n // 2):
    name = names[i % len(names)]
    for sub in ("images", "masks"):
        os.link(os.path.join(src, sub, name), os.path.join(dst, sub, f"c{i:07d}_{name}"))
PY
}

project() { # DIR: liverseg's pipeline and DVC's, eight stages each
  cat > "$1/pipeline.yaml" <<'YAML'
data: {root: data}
stages:
  files: {}
  s2: {uses: step, deps: [files]}
  s3: {uses: step, deps: [s2]}
  s4: {uses: step, deps: [s3]}
  s5: {uses: step, deps: [s4]}
  s6: {uses: step, deps: [s5]}
  s7: {uses: step, deps: [s6]}
  s8: {uses: step, deps: [s7]}
YAML
  { echo "stages:"
    echo "  s1: {cmd: find data -type f | wc -l > s1.txt, deps: [data], outs: [s1.txt]}"
    for i in 2 3 4 5 6 7 8; do echo "  s$i: {cmd: cat s$((i - 1)).txt > s$i.txt, deps: [s$((i - 1)).txt], outs: [s$i.txt]}"; done
  } > "$1/dvc.yaml"
  (cd "$1" && "$DVC" init --no-scm -q && "$DVC" config core.analytics false)
}

printf '| raw files | liverseg no-op (stat) | liverseg no-op (folders) | liverseg status | DVC no-op | DVC / liverseg (stat) | find stat floor | peak RSS liverseg / DVC |\n|---|---|---|---|---|---|---|---|\n' > "$S/table.md"
for N in ${SCALE_SIZES:-1000 10000 100000 1000000}; do
  D=$S/d$N
  if [ ! -f "$D/.built" ]; then
    need_kb=$(( N * 2 + 1048576 ))  # ~2 KB a file: folder entries, DVC's state, scan.bin; plus 1 GiB spare
    free_kb=$(df -k --output=avail "$S" | tail -1)
    if [ "$free_kb" -lt "$need_kb" ]; then
      echo "SKIPPED $N files: $((free_kb / 1024)) MiB free on $(df --output=target "$S" | tail -1), about $((need_kb / 1024)) MiB needed"
      continue
    fi
    rm -rf "$D" && mkdir -p "$D"
    s=$(date +%s); build "$N" "$D"; project "$D"; touch "$D/.built"
    echo "$N files linked in $(( $(date +%s) - s )) s"
  fi
  # First runs from nothing: no store, no DVC lock, cache or state.
  rm -rf "$D/artifacts" "$D/dvc.lock" "$D/.dvc/cache" "$D/.dvc/tmp" "$D"/s?.txt
  s=$(date +%s%N); rss=$(peak_mb "$ENGINE" "$D"); e=$(date +%s%N)
  echo "$N files: liverseg first run $(ms $(( (e - s) / 1000 ))) s, peak RSS $rss MB"
  s=$(date +%s%N); (cd "$D" && "$DVC" repro -q >/dev/null); e=$(date +%s%N)
  echo "$N files: DVC first run $(ms $(( (e - s) / 1000 ))) s"
  "$ENGINE" "$D" | grep -q "ran 0 reused 8" || { echo "liverseg reran stages on a no-op at $N files" >&2; exit 1; }
  pairs=${SCALE_PAIRS:-$([ "$N" -ge 1000000 ] && echo 3 || echo 11)}
  stat=(); folders=(); status=(); dvc=(); floor=()
  for i in $(seq "$pairs"); do
    stat+=($(timed "$ENGINE" "$D"))
    dvc+=($(cd "$D" && timed "$DVC" repro -q))
    folders+=($(timed "$ENGINE" "$D" --raw-scan folders))
    status+=($(timed "$ENGINE" "$D" --status))
    floor+=($(timed find "$D/data" -type f -printf '%s\n'))
  done
  m_stat=$(median "${stat[@]}") m_dvc=$(median "${dvc[@]}")
  rss_ls=$(peak_mb "$ENGINE" "$D"); rss_dvc=$(cd "$D" && peak_mb "$DVC" repro -q)
  printf '| %s | %s s | %s s | %s s | %s s | %s× | %s s | %s / %s MB |\n' "$N" "$(ms "$m_stat")" "$(ms "$(median "${folders[@]}")")" \
    "$(ms "$(median "${status[@]}")")" "$(ms "$m_dvc")" "$(awk -v a="$m_dvc" -v b="$m_stat" 'BEGIN { printf "%.1f", a / b }')" "$(ms "$(median "${floor[@]}")")" "$rss_ls" "$rss_dvc" | tee -a "$S/table.md"
done
echo "medians of alternating runs; table in $S/table.md"
cat "$S/table.md"
