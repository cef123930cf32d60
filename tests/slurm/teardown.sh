#!/usr/bin/env bash
# Stop the one-node SLURM test cluster started by tests/slurm/setup.sh (daemons found through PID files).
#
#   bash tests/slurm/teardown.sh           # stop daemons; configs, packages and job state stay
#   bash tests/slurm/teardown.sh --purge   # also forget queued jobs (slurmctld state) and the logs
#
# Order: slurmd, slurmctld (they report to slurmdbd), slurmdbd, MariaDB, munged last (everyone uses it).
set -uo pipefail

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "[teardown] must run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

stop() {  # stop <pidfile> <name> [signal]: SIGTERM (or the signal given), wait up to 30 s, then SIGKILL
  local pf=$1 name=$2 sig=${3:-TERM} pid i
  if ! { [ -s "$pf" ] && pid=$(cat "$pf") && kill -0 "$pid" 2>/dev/null; }; then
    rm -f "$pf"; echo "[teardown] $name: not running"; return 0
  fi
  kill -s "$sig" "$pid" 2>/dev/null
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; echo "[teardown] $name: killed (-9)"; else echo "[teardown] $name: stopped"; fi
  rm -f "$pf"
}

# Jobs first: slurmstepd and the job processes would outlive slurmd.
if command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    echo "[teardown] cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    for i in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for pf in /run/slurmd*.pid; do [ -e "$pf" ] && stop "$pf" "slurmd ($(basename "$pf" .pid))"; done
stop /run/slurmctld.pid slurmctld
stop /run/slurmdbd.pid slurmdbd
# setup.sh runs mariadbd directly, but if MariaDB was started through mysqld_safe (its parent), stop
# that first: it restarts mariadbd when mariadbd dies.
if [ -s /run/mysqld/mysqld.pid ]; then
  parent=$(ps -o ppid= -p "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null | tr -d ' ')
  if [ -n "$parent" ] && [ "$(cat "/proc/$parent/comm" 2>/dev/null)" = mysqld_safe ]; then
    echo "$parent" >/run/mysqld/mysqld_safe.pid
  fi
fi
stop /run/mysqld/mysqld_safe.pid mysqld_safe KILL   # a shell script that traps (ignores) SIGTERM
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged

# The extra nodes' network namespaces and bridge (setup.sh makes them again).
for ns in $(ip netns list 2>/dev/null | awk '/^afn[0-9]/ {print $1}'); do ip netns del "$ns" && echo "[teardown] netns $ns: removed"; done
if ip link show afbr0 >/dev/null 2>&1; then ip link del afbr0 && echo "[teardown] bridge afbr0: removed"; fi

if [ "${1:-}" = "--purge" ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
  echo "[teardown] purged slurmctld state and logs"
fi
