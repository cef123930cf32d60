#!/usr/bin/env bash
# The first-setup path, checked: tear the cluster down to an unconfigured state (teardown.sh --reset: no
# slurm.conf, gres.conf, slurmdbd.conf, no accounting database), then run setup.sh twice in a row. Each run
# must end with every node idle, slurmdbd still up, sacct answering and a job accounted as COMPLETED. A stale
# slurmd PID file naming an unrelated process (a reused PID) must not get that process signalled.
#
#   bash tests/slurm/check_fresh_setup.sh     # as root; leaves the cluster up (.ci/run calls it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/daemons.sh"
say() { echo "[fresh-setup] $*"; }
fail() { echo "[fresh-setup] FAILED: $*" >&2; exit 1; }

verify() {  # verify <run>: the cluster a setup.sh run left behind
  local states bad job state i
  states=$(sinfo -h -N -o '%N %T' | sort -u)
  bad=$(awk '$2 != "idle"' <<<"$states")
  [ -z "$bad" ] || fail "run $1: nodes not idle: $bad"
  alive /run/slurmdbd.pid slurmdbd || fail "run $1: slurmdbd is not running (log: /var/log/slurm/slurmdbd.log)"
  sacct -n -X -S now >/dev/null || fail "run $1: sacct does not answer"
  kill -0 "$bystander" 2>/dev/null || fail "run $1: the process named by a stale PID file was killed"
  job=$(sbatch --parsable -N1 -n1 -t 1 -o /dev/null --wrap true) || fail "run $1: sbatch refused a job"
  for i in $(seq 100); do
    state=$(sacct -n -X -P -j "$job" -o State 2>/dev/null | head -1)
    [ "$state" = COMPLETED ] && break
    sleep 0.2
  done
  [ "$state" = COMPLETED ] || fail "run $1: job $job is '${state:-unknown}' in sacct, not COMPLETED"
  say "run $1: nodes idle ($(awk '{print $1}' <<<"$states" | paste -sd ' ')), slurmdbd up, job $job COMPLETED in sacct"
}

bash "$here/teardown.sh" --reset
[ ! -e /etc/slurm/slurm.conf ] || fail "teardown --reset left /etc/slurm/slurm.conf"

sleep 3600 &   # a bystander whose PID a stale slurmd PID file names, as after a crash and PID reuse
bystander=$!
trap 'kill "$bystander" 2>/dev/null || true' EXIT
echo "$bystander" >"/run/slurmd-$(hostname -s).pid"

for run in 1 2; do
  t=${EPOCHREALTIME/./}
  bash "$here/setup.sh" 2>&1 | sed 's/^/  /' || fail "run $run: setup.sh failed (logs: /var/log/slurm)"
  say "run $run: setup.sh took $(((${EPOCHREALTIME/./} - t) / 1000)) ms"
  verify "$run"
done
