#!/bin/bash
# slurm/testcluster.sh — a REAL multi-node SLURM cluster on one Linux machine (as root), for tests and
# for trying the launcher on a single box.  See slurm/README.md.
#
#   slurm/testcluster.sh up   DIR    start it; prints what to `source` (DIR/env.sh)
#   slurm/testcluster.sh down DIR    stop it (jobs cancelled, daemons stopped by PID, namespaces deleted)
#   slurm/testcluster.sh status DIR  sinfo + squeue
#
# Environment (read by `up`; `down` reads what `up` recorded in DIR/cluster.env):
#   NODES=2          compute nodes n1..nN, each slurmd in its own network namespace with hostname nI
#   CPUS=6           CPUs declared per node, whatever the box has (config_overrides: the cores are shared,
#                    over-subscription is fine): 2 tasks x cpus_per_task 3 of slurm/testcluster.yaml
#   GPUS=2           fake GPUs per node (gres; /dev/null character devices, CUDA_VISIBLE_DEVICES gets set)
#   MEM_MB=4000      RealMemory per node
#   ACCOUNTING=1     1: slurmdbd + MariaDB (real sacct); 0: sacct stand-in on PATH (answers from squeue)
#   NS_PREFIX=stc    network-namespace / veth name prefix (${NS_PREFIX}ctl, ${NS_PREFIX}n1, ...)
#   SUBNET=10.99.0   /24 that only exists inside the namespaces created here
#   CTL_PORT=6827 SLURMD_PORT=6828 DBD_PORT=6829 DB_PORT=3399   (CTL_PORT/DBD_PORT are bound on 127.0.0.1
#                    in the root namespace by socat proxies; the others only inside the namespaces)
#   PARTITION=gpu    name of the (single, default) partition
#   CRED_EXPIRE=10   job credential lifetime (s); also how long a REQUEUED job waits before it may start again
#                    (SLURM's default is 120 s, which makes every requeue take > 2 minutes)
#
# Layout: the controller (slurmctld, slurmdbd, mariadbd) lives in netns ${NS}ctl, which holds a bridge with
# $SUBNET.1; node i lives in netns ${NS}n$i with $SUBNET.(10+i) on a veth to that bridge.  Each daemon runs in a
# private mount namespace where DIR/hosts is bind-mounted on /etc/hosts (nothing under /etc is changed).
# Clients (sbatch, squeue, scancel, scontrol, sinfo, sacct, submitit) run in the root namespace and reach the
# controller through 127.0.0.1:$CTL_PORT -> unix socket -> socat in ${NS}ctl.  All files live under DIR, which
# must be visible at the same path everywhere (it is: the mount namespaces are copies of the root one).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -eq 2 ] || usage
CMD=$1; D=$2
case "$D" in /*) ;; *) D=$(pwd)/$D ;; esac

t0=$(date +%s%N); el() { echo "$(( ($(date +%s%N) - t0) / 1000000 ))ms"; }
log() { echo "testcluster: $*"; }
die() { echo "testcluster: ERROR: $*" >&2; exit 1; }

# alive = exists and is not a zombie (PID 1 may reap orphans only every few seconds)
alive() { [ -e /proc/$1 ] && ! awk '{exit !($3=="Z")}' /proc/$1/stat 2>/dev/null; }
stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL
  local p=$1 i
  kill "$p" 2>/dev/null || return 0
  for i in $(seq 1 100); do alive "$p" || return 0; sleep 0.05; done
  kill -9 "$p" 2>/dev/null || true
  for i in $(seq 1 60); do alive "$p" || return 0; sleep 0.05; done
}
stop_pidfile() { local f=$D/pids/$1; [ -f "$f" ] || return 0; local p; p=$(cat "$f"); rm -f "$f"; [ -n "$p" ] && stop_pid "$p"; return 0; }

# ------------------------------------------------------------------------------------------------ down
do_down() {
  [ -f "$D/cluster.env" ] || { log "nothing recorded in $D (not started, or already down)"; return 0; }
  # shellcheck disable=SC1091
  . "$D/cluster.env"
  export SLURM_CONF=$D/slurm.conf
  if [ -f "$D/pids/slurmctld.pid" ] && alive "$(cat "$D/pids/slurmctld.pid")"; then
    scancel --full -u root >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h -t PD,R,CG,S,CF 2>/dev/null)" ] && break; sleep 0.1; done
  fi
  local i p
  for i in $(seq 1 "$NODES"); do stop_pidfile "slurmd-n$i.pid"; done
  stop_pidfile slurmctld.pid; stop_pidfile socat-ctl-root.pid; stop_pidfile socat-ctl-ns.pid
  stop_pidfile slurmdbd.pid; stop_pidfile socat-dbd-root.pid; stop_pidfile socat-dbd-ns.pid
  stop_pidfile mariadbd.pid
  stop_pidfile munged.pid
  # anything still running inside OUR namespaces (slurmstepd, job tasks orphaned by a dead slurmd): by PID
  for ns in $(for i in $(seq 1 "$NODES"); do echo "${NS}n$i"; done) "${NS}ctl"; do
    [ -e "/run/netns/$ns" ] || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  for i in $(seq 1 "$NODES"); do ip netns del "${NS}n$i" 2>/dev/null || true; done
  ip netns del "${NS}ctl" 2>/dev/null || true
  [ -n "${MSOCK_DIR:-}" ] && rm -rf "$MSOCK_DIR"
  rmdir /run/testcluster 2>/dev/null || true
  rm -f "$D/cluster.env.up"
  mv "$D/cluster.env" "$D/cluster.env.down"
  log "down ($(el)); logs kept in $D/log"
}

# ------------------------------------------------------------------------------------------------ up
install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge socat iproute2 util-linux procps"
  [ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  local missing; missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | xargs)
  [ -n "$missing" ] || return 0
  command -v apt-get >/dev/null || die "missing packages ($missing) and no apt-get: install them yourself"
  log "installing Debian packages: $missing (log: $D.apt.log)"
  # never let the packages start their system-wide services (munge, mariadb, slurm*): we run our own
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >"$D.apt.log" 2>&1 \
    || { apt-get update >>"$D.apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >>"$D.apt.log" 2>&1; }; } || rc=$?
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc = 0 ] || die "apt-get install failed (see $D.apt.log)"
  log "packages installed ($(el))"
}

do_up() {
  NODES=${NODES:-2}; CPUS=${CPUS:-6}; GPUS=${GPUS:-2}; MEM_MB=${MEM_MB:-4000}; ACCOUNTING=${ACCOUNTING:-1}
  NS=${NS_PREFIX:-stc}; SUBNET=${SUBNET:-10.99.0}; PARTITION=${PARTITION:-gpu}
  CRED_EXPIRE=${CRED_EXPIRE:-10}
  CTL_PORT=${CTL_PORT:-6827}; SLURMD_PORT=${SLURMD_PORT:-6828}; DBD_PORT=${DBD_PORT:-6829}; DB_PORT=${DB_PORT:-3399}
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, daemons)"
  [ "$NODES" -ge 1 ] && [ "$NODES" -le 200 ] || die "NODES must be 1..200"
  [ ${#NS} -le 8 ] || die "NS_PREFIX must be at most 8 characters (veth names are limited to 15)"
  [ -e "$D/slurm.conf" ] && die "$D was already used: run '$0 down $D' and remove it first"
  mkdir -p "$(dirname "$D")"
  install_packages
  ip netns list >/dev/null 2>&1 || die "'ip netns' is not available"
  for ns in "${NS}ctl" "${NS}n1"; do [ -e "/run/netns/$ns" ] && die "network namespace $ns exists (another cluster with NS_PREFIX=$NS is up?)"; done
  for port in $CTL_PORT $DBD_PORT; do
    ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && die "127.0.0.1:$port is in use (another cluster up? set CTL_PORT/DBD_PORT)"
  done
  CTL=$(hostname -s)
  getent ahostsv4 "$CTL" | grep -q '^127\.' || die "hostname $CTL must resolve to 127.x in the root namespace (clients reach the controller as $CTL)"

  mkdir -p "$D"/{munge,state,spool,log,fakedev,pids,bin}
  chmod 700 "$D/munge"
  # munged wants every directory above its socket world-executable, which DIR's parents may not be
  # (pytest's tmp dirs are 700): the socket lives in /run/testcluster/$NS instead (removed by `down`)
  MSOCK_DIR=/run/testcluster/$NS
  [ -e "$MSOCK_DIR" ] && die "$MSOCK_DIR exists (another cluster with NS_PREFIX=$NS is up?)"
  mkdir -p "$MSOCK_DIR"; chmod 755 /run/testcluster "$MSOCK_DIR"
  # record what `down` needs before starting anything, so a half-started cluster can be torn down
  cat >"$D/cluster.env" <<EOF
NODES=$NODES
NS=$NS
ACCOUNTING=$ACCOUNTING
CTL_PORT=$CTL_PORT
DBD_PORT=$DBD_PORT
PARTITION=$PARTITION
GPUS=$GPUS
CPUS=$CPUS
MSOCK_DIR=$MSOCK_DIR
EOF
  trap 'rc=$?; if [ $rc != 0 ]; then echo "testcluster: start failed (rc=$rc): tearing down; logs in $D/log" >&2; do_down >&2 || true; fi' EXIT

  # ---- munge (own key, own socket) ----
  dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$D/munge/munge.key"
  MSOCK=$MSOCK_DIR/munge.socket.2
  munged --key-file="$D/munge/munge.key" --socket="$MSOCK" --pid-file="$D/pids/munged.pid" \
         --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"

  # ---- network namespaces: ${NS}ctl holds the bridge; one veth per node ----
  ip netns add "${NS}ctl"; ip -n "${NS}ctl" link set lo up
  ip -n "${NS}ctl" link add br0 type bridge
  ip -n "${NS}ctl" addr add "$SUBNET.1/24" dev br0
  ip -n "${NS}ctl" link set br0 up
  { echo "127.0.0.1 localhost"; echo "$SUBNET.1 $CTL"; } >"$D/hosts"
  local i
  for i in $(seq 1 "$NODES"); do
    ip netns add "${NS}n$i"; ip -n "${NS}n$i" link set lo up
    ip link add "${NS}v$i" netns "${NS}ctl" type veth peer name eth0 netns "${NS}n$i"
    ip -n "${NS}ctl" link set "${NS}v$i" master br0 up
    ip -n "${NS}n$i" addr add "$SUBNET.$((10+i))/24" dev eth0
    ip -n "${NS}n$i" link set eth0 up
    echo "$SUBNET.$((10+i)) n$i" >>"$D/hosts"
  done
  chmod 644 "$D/hosts"

  # ---- slurm.conf / gres.conf ----
  for g in $(seq 0 $((GPUS-1))); do ln -sf /dev/null "$D/fakedev/nvidia$g"; done   # gres files must be char devices
  local acct
  if [ "$ACCOUNTING" = 1 ]; then
    acct="JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTL
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MSOCK"
  else
    acct="JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"
  fi
  cat >"$D/slurm.conf" <<EOF
# generated by slurm/testcluster.sh
ClusterName=testcluster
SlurmctldHost=$CTL
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK,cred_expire=$CRED_EXPIRE
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/pids/slurmctld.pid
SlurmdPidFile=$D/pids/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldPort=$CTL_PORT
SlurmdPort=$SLURMD_PORT
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=3600
KillWait=10
Waittime=0
JobRequeue=1
GresTypes=gpu
$acct
EOF
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=n$i NodeAddr=$SUBNET.$((10+i)) CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN" >>"$D/slurm.conf"
  done
  echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$D/slurm.conf"
  if [ "$GPUS" -gt 0 ]; then echo "Name=gpu File=$D/fakedev/nvidia[0-$((GPUS-1))]" >"$D/gres.conf"; else : >"$D/gres.conf"; fi
  export SLURM_CONF=$D/slurm.conf

  # inns NS CMD...: run CMD in netns NS with the private /etc/hosts.  NB: nsenter, not `ip netns exec`: the
  # latter remounts /sys, hiding /sys/fs/cgroup, and slurmd 22.05 dies ("No filesystem mounted on /sys/fs/cgroup").
  inns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" unshare --mount --propagation private \
    sh -c "mount --bind '$D/hosts' /etc/hosts && exec \"\$@\"" sh "$@"; }
  # proxy NAME PORT: root-ns 127.0.0.1:PORT -> unix socket -> 127.0.0.1:PORT inside ${NS}ctl
  proxy() { local name=$1 port=$2
    nsenter --net="/run/netns/${NS}ctl" socat UNIX-LISTEN:"$D/$name.sock",fork,unlink-early TCP:127.0.0.1:"$port" \
      >"$D/log/socat-$name-ns.log" 2>&1 </dev/null & echo $! >"$D/pids/socat-$name-ns.pid"
    socat TCP-LISTEN:"$port",bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:"$D/$name.sock" \
      >"$D/log/socat-$name-root.log" 2>&1 </dev/null & echo $! >"$D/pids/socat-$name-root.pid"; }

  # ---- accounting: MariaDB + slurmdbd in the controller netns, or the sacct stand-in ----
  if [ "$ACCOUNTING" = 1 ]; then
    mariadb-install-db --no-defaults --datadir="$D/db" --user=root --auth-root-authentication-method=socket \
      --skip-test-db >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $D/log/mariadb-install.log)"
    nsenter --net="/run/netns/${NS}ctl" mariadbd --no-defaults --datadir="$D/db" --user=root --socket="$D/mysqld.sock" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$D/db/mariadbd.pid" --log-error="$D/log/mariadbd.err" \
      --innodb-buffer-pool-size=32M --skip-log-bin --performance-schema=OFF >/dev/null 2>&1 </dev/null &
    echo $! >"$D/pids/mariadbd.pid"
    for _ in $(seq 1 400); do [ -S "$D/mysqld.sock" ] && break; sleep 0.05; done
    [ -S "$D/mysqld.sock" ] || die "mariadbd did not start (see $D/log/mariadbd.err)"
    mariadb --no-defaults -S "$D/mysqld.sock" -u root -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
      CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat >"$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=$CTL
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/pids/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/slurmdbd.conf"          # slurmdbd reads slurmdbd.conf next to $SLURM_CONF (no -f option)
    inns "${NS}ctl" slurmdbd
    for _ in $(seq 1 400); do nsenter --net="/run/netns/${NS}ctl" ss -Hltn "sport = :$DBD_PORT" | grep -q . && break; sleep 0.05; done
    proxy dbd "$DBD_PORT"
    local ok=0
    for _ in $(seq 1 100); do sacctmgr -i add cluster testcluster >/dev/null 2>&1 && { ok=1; break; }; sleep 0.1; done
    [ $ok = 1 ] || die "sacctmgr could not register the cluster (see $D/log/slurmdbd.log)"
    log "accounting up ($(el))"
  else
    cat >"$D/bin/sacct" <<'EOF'
#!/bin/sh
# sacct stand-in (testcluster.sh ACCOUNTING=0): only what submitit calls
# (sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]); answers from slurmctld's memory via
# squeue --states=all (jobs stay visible for MinJobAge=3600 s after they end).
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids="${ids:+$ids,}$2"; shift 2;;
    -j*) ids="${ids:+$ids,}${1#-j}"; shift;;
    --jobs=*) ids="${ids:+$ids,}${1#--jobs=}"; shift;;
    *) shift;;
  esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] || exit 0
squeue -h --states=all -j "$ids" -o '%i|%T|%N' 2>/dev/null
exit 0
EOF
    chmod 755 "$D/bin/sacct"
  fi

  # ---- slurmctld + one slurmd per node (own netns, own UTS namespace with hostname nI) ----
  inns "${NS}ctl" slurmctld -f "$D/slurm.conf" -c      # -c: clean state
  proxy ctl "$CTL_PORT"
  for i in $(seq 1 "$NODES"); do
    nsenter --net="/run/netns/${NS}n$i" unshare --mount --propagation private --uts \
      sh -c "mount --bind '$D/hosts' /etc/hosts && hostname n$i && exec slurmd -f '$D/slurm.conf' -N n$i"
  done
  local state=""
  for _ in $(seq 1 600); do state=$(sinfo -h -o %T 2>/dev/null | sort -u | xargs || true); [ "$state" = idle ] && break; sleep 0.1; done
  [ "$state" = idle ] || { sinfo >&2 || true; die "nodes not idle after 60 s (state: '$state'); see $D/log"; }

  { echo "# source me: clients for the test cluster in $D"
    echo "export SLURM_CONF='$D/slurm.conf'"
    [ "$ACCOUNTING" = 1 ] || echo "export PATH='$D/bin':\"\$PATH\""
  } >"$D/env.sh"
  cp "$D/cluster.env" "$D/cluster.env.up"
  trap - EXIT
  log "cluster idle ($(el)): $NODES node(s), partition $PARTITION, $GPUS fake GPU(s)/node, accounting=$ACCOUNTING"
  sinfo -o '%P %a %D %T %N %G'
  log "use it with:  source $D/env.sh"
}

do_status() {
  [ -f "$D/env.sh" ] || die "no cluster in $D"
  # shellcheck disable=SC1091
  . "$D/env.sh"; sinfo; squeue
}

case "$CMD" in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  *) usage ;;
esac
