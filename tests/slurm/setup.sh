#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine, for tests and CI.
#
#   bash tests/slurm/setup.sh                       # slurmctld + slurmd + slurmdbd/MariaDB (sacct works)
#   SLURM_ACCOUNTING=0 bash tests/slurm/setup.sh    # no accounting: no slurmdbd, no MariaDB
#
# Idempotent: packages are installed only when missing, daemons started only when not running,
# and slurmctld/slurmd/slurmdbd restarted only when a config file they read has changed.
# No systemd needed (daemons are started by hand; PIDs in /run). Tear down: tests/slurm/teardown.sh.
# Every config line is explained in tests/slurm/README.md.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "[setup] must run as root (no sudo here)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

ACCOUNTING=${SLURM_ACCOUNTING:-1}      # 1 = slurmdbd + MariaDB, 0 = accounting_storage/none
FAKE_GPUS=${SLURM_FAKE_GPUS:-2}        # fake GPUs (GRES backed by dummy files), 0 = none
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}   # also the delay before a requeued job may start again (default 120 s)
CLUSTER=local
ACCOUNT=research
DB_USER=slurm
DB_PASS=slurm-test-only                # the database listens on 127.0.0.1 only
NODE=$(hostname -s)
ETC=/etc/slurm
FAKE_DIR=/var/lib/slurm-fake
LOG_DIR=/var/log/slurm

T0=${EPOCHREALTIME/./}   # microseconds
T_LAP=$T0
lap() {  # lap <label>: print the time since the previous lap and since the start
  local now=${EPOCHREALTIME/./}
  printf '[setup] %-34s %5d.%01d s  (total %5d.%01d s)\n' "$1" \
    $(((now - T_LAP) / 1000000)) $(((now - T_LAP) / 100000 % 10)) $(((now - T0) / 1000000)) $(((now - T0) / 100000 % 10))
  T_LAP=$now
}
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

#----------------------------------------------------------------------------
# Packages (apt only installs what is missing; `apt-get update` only if the first try fails).

pkgs=(slurmctld slurmd slurm-client munge)
[ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "[setup] installing: ${missing[*]}"
  apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/slurm-setup-apt.log 2>&1; }
  apt_install || { apt-get update -q >/tmp/slurm-setup-apt-update.log 2>&1 && apt_install; } \
    || { tail -20 /tmp/slurm-setup-apt.log; die "apt-get install failed (log: /tmp/slurm-setup-apt.log)"; }
fi
lap "packages"

#----------------------------------------------------------------------------
# Helpers: daemons are tracked through their PID files only.

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfile() {  # stop_pidfile <pidfile> <name>: SIGTERM, wait up to 20 s, then SIGKILL
  local pf=$1 pid i
  alive "$pf" || { rm -f "$pf"; return 0; }
  pid=$(cat "$pf")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then echo "[setup] $2 ignored SIGTERM, killing"; kill -9 "$pid" || true; fi
  rm -f "$pf"
}
wait_for() {  # wait_for <seconds> <description> <command...>
  local secs=$1 what=$2 i; shift 2
  for i in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${secs}s waiting for $what"
}
install_if_changed() {  # install_if_changed <tmpfile> <dest> <mode>: prints "changed" when it replaced dest
  if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; else install -m "$3" "$1" "$2"; rm -f "$1"; echo changed; fi
}

#----------------------------------------------------------------------------
# Configuration files.

mkdir -p "$ETC" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" "$FAKE_DIR"
read -r -a hw <<<"$(slurmd -C | head -1)"      # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
declare -A HW=()
for kv in "${hw[@]}"; do HW[${kv%%=*}]=${kv#*=}; done
CPUS=$(nproc)
TOPOLOGY=""
if [ "${HW[CPUs]:-}" = "$CPUS" ]; then   # same count as slurmd sees: pass its topology so CR_Core maps cores right
  TOPOLOGY="Boards=${HW[Boards]} SocketsPerBoard=${HW[SocketsPerBoard]} CoresPerSocket=${HW[CoresPerSocket]} ThreadsPerCore=${HW[ThreadsPerCore]}"
fi
REAL_MEM=$(( ${HW[RealMemory]} * 9 / 10 ))   # below what slurmd measures, else the node is drained
GRES=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES=" Gres=gpu:$FAKE_GPUS"; GRES_TYPES="GresTypes=gpu"
  for i in $(seq 0 $((FAKE_GPUS - 1))); do   # character devices with NVIDIA's major number; no driver behind them
    [ -e "$FAKE_DIR/gpu$i" ] || mknod "$FAKE_DIR/gpu$i" c 195 "$i" 2>/dev/null || touch "$FAKE_DIR/gpu$i"
  done
fi
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

tmp=$(mktemp)
cat >"$tmp" <<EOF
# Written by tests/slurm/setup.sh: one-node test cluster (see tests/slurm/README.md).
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
KillWait=10
MinJobAge=300
$ACCT
JobCompType=jobcomp/none
MailProg=/bin/true
$GRES_TYPES
NodeName=$NODE CPUs=$CPUS $TOPOLOGY RealMemory=$REAL_MEM$GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
CHANGED_CONF=$(install_if_changed "$tmp" "$ETC/slurm.conf" 644)

tmp=$(mktemp)
if [ "$FAKE_GPUS" -gt 0 ]; then
  echo "NodeName=$NODE Name=gpu File=$FAKE_DIR/gpu[0-$((FAKE_GPUS - 1))]" >"$tmp"
else
  : >"$tmp"
fi
CHANGED_GRES=$(install_if_changed "$tmp" "$ETC/gres.conf" 644)

CHANGED_DBD=""
if [ "$ACCOUNTING" = 1 ]; then
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  CHANGED_DBD=$(install_if_changed "$tmp" "$ETC/slurmdbd.conf" 600)   # slurmdbd refuses a readable file
fi
lap "configs${CHANGED_CONF:+ (slurm.conf changed)}"

#----------------------------------------------------------------------------
# munge: authentication between every SLURM client and daemon.

mkdir -p /run/munge && chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged --force   # --force: start despite a stale socket from a killed run
fi
wait_for 10 munge sh -c 'munge -n | unmunge'
lap "munged"

#----------------------------------------------------------------------------
# Accounting: MariaDB (127.0.0.1 only) + slurmdbd, then cluster/account/user in the database.

if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! alive /run/mysqld/mysqld.pid; then
    # mariadbd directly, not mysqld_safe: no watchdog that restarts it when teardown stops it.
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      --log-error=/var/log/slurm/mariadb.log </dev/null >/dev/null 2>&1 &
  fi
  wait_for 60 MariaDB mysqladmin ping
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
            CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
            GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';"
  lap "mariadb"
  [ -n "$CHANGED_DBD" ] && stop_pidfile /run/slurmdbd.pid slurmdbd
  alive /run/slurmdbd.pid || slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  has() { sacctmgr -n -P list "$1" format="$2" 2>/dev/null | grep -qx "$3"; }
  has cluster cluster "$CLUSTER" || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
  has account account "$ACCOUNT" || sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
  has user user root || sacctmgr -i -Q add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
  lap "slurmdbd + sacctmgr"
else
  stop_pidfile /run/slurmdbd.pid slurmdbd   # a leftover slurmdbd would be harmless, but keep it tidy
fi

#----------------------------------------------------------------------------
# slurmctld + slurmd (restarted when slurm.conf or gres.conf changed: GRES needs a full restart).

if [ -n "$CHANGED_CONF$CHANGED_GRES" ]; then
  stop_pidfile /run/slurmd.pid slurmd
  stop_pidfile /run/slurmctld.pid slurmctld
fi
alive /run/slurmctld.pid || slurmctld
wait_for 30 slurmctld scontrol ping
alive /run/slurmd.pid || slurmd
lap "slurmctld + slurmd"

# Wait until the node is idle; resume it if an earlier bad config (or a kill) left it drained/down.
state=""
for i in $(seq 150); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle|mixed|allocated) break ;;
    drain*|down*|*drain|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
case "$state" in idle|mixed|allocated) ;; *) sinfo -R; die "node $NODE is '$state' (logs: $LOG_DIR)";; esac
lap "node $state"
sinfo
if [ "$ACCOUNTING" = 1 ]; then
  wait_for 30 "sacct" sacct -n -X -S now
fi
lap "ready"
