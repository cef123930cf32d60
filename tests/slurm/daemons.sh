# Daemons tracked through their PID files (and how MariaDB is started), sourced by setup.sh and teardown.sh.
#
# A PID file is trusted only when its process is alive AND is the program it should be (/proc/<pid>/comm):
# a stale file from a killed daemon can name a PID that an unrelated process has since reused, and
# signalling that would kill a bystander.

# The node daemons' own PID files: slurm.conf says SlurmdPidFile=/run/slurmd-%n.pid. Not /run/slurmd*.pid,
# which also matches slurmdbd's /run/slurmdbd.pid.
node_pidfiles() {
  local pf
  for pf in /run/slurmd-*.pid; do [ -e "$pf" ] && echo "$pf"; done
  return 0
}

pidfile_pid() {  # pidfile_pid <pidfile>: its PID, or nothing when the file is missing, empty or not a number
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -d ' \n' <"$1")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  echo "$pid"
}

# alive <pidfile> <comm...>: the file's process runs and its command name is one of <comm...>
alive() {
  local pf=$1 pid comm c; shift
  pid=$(pidfile_pid "$pf") || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  for c in "$@"; do [ "$comm" = "$c" ] && return 0; done
  return 1
}

# stop_pidfile <pidfile> <label> <signal> <comm...>: signal the daemon, wait up to 30 s, then SIGKILL.
# A file whose process is gone or is another program is only removed. Prints what it did.
stop_pidfile() {
  local pf=$1 label=$2 sig=$3 pid i; shift 3
  if ! alive "$pf" "$@"; then
    if pid=$(pidfile_pid "$pf") && kill -0 "$pid" 2>/dev/null; then
      echo "$label: stale PID file $pf names $pid ($(cat "/proc/$pid/comm" 2>/dev/null)), left alone"
    else
      echo "$label: not running"
    fi
    rm -f "$pf"
    return 0
  fi
  pid=$(pidfile_pid "$pf")
  kill -s "$sig" "$pid" 2>/dev/null || true
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; echo "$label: killed (-9)"; else echo "$label: stopped"; fi
  rm -f "$pf"
}

# start_mariadb: mariadbd on 127.0.0.1 unless it runs; waits until it answers. mariadbd directly, not
# mysqld_safe: no watchdog that restarts it when teardown stops it.
start_mariadb() {
  local i
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! alive /run/mysqld/mysqld.pid mariadbd mysqld; then
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      --log-error=/var/log/slurm/mariadb.log </dev/null >/dev/null 2>&1 &
  fi
  for i in $(seq 300); do mysqladmin ping >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "MariaDB did not answer within 60 s (log: /var/log/slurm/mariadb.log)" >&2
  return 1
}
