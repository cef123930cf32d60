#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine, for tests and CI.
#
#   bash tests/slurm/setup.sh                       # slurmctld + slurmd + slurmdbd/MariaDB (sacct works)
#   SLURM_ACCOUNTING=0 bash tests/slurm/setup.sh    # no accounting: no slurmdbd, no MariaDB
#   SLURM_NETNS_NODES=0 bash tests/slurm/setup.sh   # no extra nodes (default 2: partition `twonode`)
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
NETNS_NODES=${SLURM_NETNS_NODES:-2}    # extra nodes afn1.., each a slurmd in its own network + UTS namespace
NET=10.77.0                            # their bridge: the controller at .1, node i at .(10 + i)
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
# Helpers: daemons are tracked through their PID files, checked against the program they name.

source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"   # alive, stop_pidfile, node_pidfiles, start_mariadb
stop() { stop_pidfile "$1" "[setup] $2" TERM "${@:3}"; }   # stop <pidfile> <label> <comm...>
wait_for() {  # wait_for <seconds> <description> <command...>
  local secs=$1 what=$2 i; shift 2
  for i in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${secs}s waiting for $what"
}
install_if_changed() {  # install_if_changed <tmpfile> <dest> <mode>: prints "changed" when it replaced dest
  if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; else install -m "$3" "$1" "$2"; rm -f "$1"; echo changed; fi
}

#----------------------------------------------------------------------------
# Extra nodes on this machine: a bridge afbr0 ($NET.1, the controller's address for every node) and per node
# a network namespace afn<i> with a veth on the bridge ($NET.(10+i)) and a line in /etc/hosts. Its slurmd
# runs in that namespace and in its own UTS namespace with hostname afn<i>, so multi-node jobs (2 nodes ×
# 1 task) really span two slurmd daemons talking over the network.

netns_up() {
  ip link show afbr0 >/dev/null 2>&1 || ip link add afbr0 type bridge || return 1
  ip -4 addr show afbr0 | grep -q "$NET.1/" || ip addr add "$NET.1/24" dev afbr0 || return 1
  ip link set afbr0 up || return 1
  local i n
  for i in $(seq "$NETNS_NODES"); do
    n=afn$i
    ip netns list | grep -qw "$n" || ip netns add "$n" || return 1
    if ! ip netns exec "$n" ip -4 addr show eth0 2>/dev/null | grep -q "$NET.$((10 + i))/"; then
      ip link add "veth-$n" type veth peer name eth0 netns "$n" || return 1
      ip link set "veth-$n" master afbr0 && ip link set "veth-$n" up || return 1
      ip netns exec "$n" ip addr add "$NET.$((10 + i))/24" dev eth0 || return 1
      ip netns exec "$n" ip link set eth0 up && ip netns exec "$n" ip link set lo up || return 1
    fi
    grep -q "^$NET.$((10 + i)) $n\$" /etc/hosts || echo "$NET.$((10 + i)) $n" >>/etc/hosts
  done
}
if [ "$NETNS_NODES" -gt 0 ] && ! netns_up 2>/tmp/slurm-netns.log; then
  echo "[setup] no network namespaces here ($(tail -1 /tmp/slurm-netns.log)): one node only"
  NETNS_NODES=0
fi
lap "network namespaces ($NETNS_NODES extra nodes)"

#----------------------------------------------------------------------------
# Configuration files.

mkdir -p "$ETC" /var/spool/slurmctld "/var/spool/slurmd/$NODE" "$LOG_DIR" "$FAKE_DIR"
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
SlurmctldHost=$NODE$([ "$NETNS_NODES" -gt 0 ] && echo "($NET.1)")
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
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
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if [ "$NETNS_NODES" -gt 0 ]; then
  cat >>"$tmp" <<EOF
NodeName=afn[1-$NETNS_NODES] NodeAddr=$NET.[11-$((10 + NETNS_NODES))] CPUs=$CPUS RealMemory=4096 State=UNKNOWN
PartitionName=twonode Nodes=afn[1-$NETNS_NODES] MaxTime=INFINITE State=UP
EOF
fi
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
if ! alive /run/munge/munged.pid munged; then
  runuser -u munge -- /usr/sbin/munged --force   # --force: start despite a stale socket from a killed run
fi
wait_for 10 munge sh -c 'munge -n | unmunge'
lap "munged"

#----------------------------------------------------------------------------
# Accounting: MariaDB (127.0.0.1 only) + slurmdbd, then cluster/account/user in the database.

if [ "$ACCOUNTING" = 1 ]; then
  start_mariadb || die "MariaDB did not start"
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
            CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
            GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';"
  lap "mariadb"
  [ -n "$CHANGED_DBD" ] && stop /run/slurmdbd.pid slurmdbd slurmdbd
  alive /run/slurmdbd.pid slurmdbd || slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  has() { sacctmgr -n -P list "$1" format="$2" 2>/dev/null | grep -qx "$3"; }
  has cluster cluster "$CLUSTER" || sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
  has account account "$ACCOUNT" || sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null
  has user user root || sacctmgr -i -Q add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
  lap "slurmdbd + sacctmgr"
else
  stop /run/slurmdbd.pid slurmdbd slurmdbd   # a leftover slurmdbd would be harmless, but keep it tidy
fi

#----------------------------------------------------------------------------
# slurmctld + slurmd (restarted when slurm.conf or gres.conf changed: GRES needs a full restart).

if [ -n "$CHANGED_CONF$CHANGED_GRES" ]; then
  for pf in $(node_pidfiles); do stop "$pf" slurmd slurmd; done   # not slurmdbd: it must stay up
  stop /run/slurmctld.pid slurmctld slurmctld
fi
alive /run/slurmctld.pid slurmctld || slurmctld
wait_for 30 slurmctld scontrol ping
alive "/run/slurmd-$NODE.pid" slurmd || slurmd
for i in $(seq "$NETNS_NODES"); do
  mkdir -p "/var/spool/slurmd/afn$i"
  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no /sys/fs/cgroup
  alive "/run/slurmd-afn$i.pid" slurmd || nsenter --net="/run/netns/afn$i" unshare --uts sh -c "hostname afn$i && exec slurmd"
done
lap "slurmctld + slurmd ×$((1 + NETNS_NODES))"

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
for i in $(seq "$NETNS_NODES"); do
  wait_for 30 "node afn$i" sh -c "sinfo -h -n afn$i -o %T | grep -qE '^(idle|mixed|allocated)'"
done
lap "node $state"
sinfo
if [ "$ACCOUNTING" = 1 ]; then
  wait_for 30 "sacct" sacct -n -X -S now
fi
lap "ready"
