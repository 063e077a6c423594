#!/usr/bin/env bash
# Run a command with a real single-node Slurm cluster up (Debian's slurm-wlm
# and munge, started without systemd), then stop the daemons this script
# started, by their pid files. The command sees SLURM_CONF, LIVERSEG_SLURM_TEST=1
# and LIVERSEG_SLURM_STATE (with jobcomp.log, the job-completion record).
# Without the packages (and no way to install them) the command still runs,
# with LIVERSEG_SLURM_SKIP saying why; the Slurm tests then skip with that.
#   usage: tests/slurm/with_cluster.sh COMMAND [ARGS...]
set -uo pipefail
CMD=("$@")

skip() {
  echo "Slurm test cluster: SKIPPED: $1" >&2
  LIVERSEG_SLURM_SKIP="$1" "${CMD[@]}"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || return 1
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }
}

if ! install_packages; then
  skip "slurm-wlm and munge are not installed and cannot be (apt-get as root failed)"
  exit $?
fi

STATE=$(mktemp -d /tmp/liverseg-slurm.XXXXXX)
chmod 755 "$STATE"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
MUNGE_PID=""

stop() {
  # Jobs first (their slurmstepd daemons outlive slurmd), then only what this
  # script started, by pid file: slurmd, slurmctld, munged.
  if [ -n "${SLURM_CONF:-}" ] && [ -f "$STATE/slurmctld.pid" ]; then
    scancel --full --user="$(id -un)" 2>/dev/null
    for _ in $(seq 1 50); do
      [ -z "$(squeue -h 2>/dev/null)" ] && ! pgrep -f '^slurmstepd' >/dev/null && break
      sleep 0.2
    done
    pkill -9 -f '^slurmstepd' 2>/dev/null
  fi
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
  done
  for _ in $(seq 1 50); do
    alive=0
    for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
      [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
    done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
  done
  [ -n "${KEEP_SLURM_STATE:-}" ] || rm -rf "$STATE"
}
trap stop EXIT

# munge: its own key and socket in STATE, so a system munged is left alone.
mkdir -p "$STATE/munge" "$STATE/state" "$STATE/spool"
dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" status=none
chmod 755 "$STATE/munge"; chmod 400 "$STATE/munge/munge.key"
chown -R munge:munge "$STATE/munge" 2>/dev/null
runuser -u munge -- /usr/sbin/munged --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" ||
  { stop; trap - EXIT; skip "munged did not start"; exit $?; }
for _ in $(seq 1 50); do [ -f "$STATE/munge/munged.pid" ] && break; sleep 0.1; done
cp "$STATE/munge/munged.pid" "$STATE/munged.pid"

# Scheduling on every event, not every few seconds: with the defaults a task
# waits 1.4 s for its slot (60 one-task jobs took 84 s, 30 s with these). The
# partition "many" shares each core among 16 jobs, for tests that run
# thousands of trivial tasks (300 took 8 s); "main" stays one job per core.
cat > "$STATE/slurm.conf" <<CONF
ClusterName=liverseg-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldPort=${LIVERSEG_SLURMCTLD_PORT:-16817}
SlurmdPort=${LIVERSEG_SLURMD_PORT:-16818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
# Finished jobs stay MinJobAge and count against MaxJobCount (10,000 by
# default): room for bench/run.sh dag-sim's 10,000 trials after 1,000 stages.
MaxJobCount=50000
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=many Nodes=$HOST Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE:16
CONF
export SLURM_CONF=$STATE/slurm.conf

slurmctld -f "$SLURM_CONF" || { skip "slurmctld did not start: $(tail -3 "$STATE/slurmctld.log" 2>/dev/null)"; exit $?; }
slurmd -f "$SLURM_CONF" || { skip "slurmd did not start: $(tail -3 "$STATE/slurmd.log" 2>/dev/null)"; exit $?; }
up=0
for _ in $(seq 1 120); do
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle"; then up=1; break; fi
  sleep 0.5
done
if [ $up = 0 ]; then
  skip "the node did not come up idle within 60 s: $(tail -3 "$STATE/slurmctld.log" 2>/dev/null)"
  exit $?
fi
echo "Slurm test cluster up: node $HOST, $CPUS CPUs, state in $STATE" >&2
LIVERSEG_SLURM_TEST=1 LIVERSEG_SLURM_STATE=$STATE "$@"
