#!/usr/bin/env bash
# Stop the one-node SLURM test cluster started by tests/slurm/setup.sh (daemons found through PID files).
#
#   bash tests/slurm/teardown.sh           # stop daemons; configs, packages and job state stay
#   bash tests/slurm/teardown.sh --purge   # also forget queued jobs (slurmctld state) and the logs
#   bash tests/slurm/teardown.sh --reset   # --purge, and drop the generated configs and the accounting
#                                          # database: setup.sh then runs exactly as on a new machine
#
# Order: slurmd, slurmctld (they report to slurmdbd), slurmdbd, MariaDB, munged last (everyone uses it).
set -uo pipefail
MODE=${1:-}
case "$MODE" in ""|--purge|--reset) ;; *) echo "usage: $0 [--purge|--reset]" >&2; exit 2;; esac

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "[teardown] must run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"   # alive, stop_pidfile, node_pidfiles, start_mariadb
stop() { stop_pidfile "$1" "[teardown] $2" "${4:-TERM}" $3; }   # stop <pidfile> <label> <comm(s)> [signal]

# Jobs first: slurmstepd and the job processes would outlive slurmd.
if command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    echo "[teardown] cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    for i in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for pf in $(node_pidfiles); do stop "$pf" "slurmd ($(basename "$pf" .pid))" slurmd; done
stop /run/slurmctld.pid slurmctld slurmctld
stop /run/slurmdbd.pid slurmdbd slurmdbd
# setup.sh runs mariadbd directly, but if MariaDB was started through mysqld_safe (its parent), stop
# that first: it restarts mariadbd when mariadbd dies.
if [ "$MODE" = --reset ] && command -v mariadbd >/dev/null; then
  mkdir -p /var/log/slurm && start_mariadb   # up (if it was down) just to drop the accounting database
fi
if alive /run/mysqld/mysqld.pid mariadbd mysqld; then
  parent=$(ps -o ppid= -p "$(cat /run/mysqld/mysqld.pid)" 2>/dev/null | tr -d ' ')
  if [ -n "$parent" ] && [ "$(cat "/proc/$parent/comm" 2>/dev/null)" = mysqld_safe ]; then
    echo "$parent" >/run/mysqld/mysqld_safe.pid
  fi
  if [ "$MODE" = --reset ]; then   # the accounting database goes too: setup.sh creates it as on a new machine
    mysql -e "DROP DATABASE IF EXISTS slurm_acct_db" && echo "[teardown] database slurm_acct_db: dropped"
  fi
fi
stop /run/mysqld/mysqld_safe.pid mysqld_safe mysqld_safe KILL   # a shell script that traps (ignores) SIGTERM
stop /run/mysqld/mysqld.pid mariadbd "mariadbd mysqld"
stop /run/munge/munged.pid munged munged

# The extra nodes' network namespaces and bridge (setup.sh makes them again).
for ns in $(ip netns list 2>/dev/null | awk '/^afn[0-9]/ {print $1}'); do ip netns del "$ns" && echo "[teardown] netns $ns: removed"; done
if ip link show afbr0 >/dev/null 2>&1; then ip link del afbr0 && echo "[teardown] bridge afbr0: removed"; fi

if [ "$MODE" = --purge ] || [ "$MODE" = --reset ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
  echo "[teardown] purged slurmctld state and logs"
fi
if [ "$MODE" = --reset ]; then   # the generated configuration: the next setup.sh takes its first-setup path
  rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf
  echo "[teardown] removed slurm.conf, gres.conf, slurmdbd.conf"
fi
