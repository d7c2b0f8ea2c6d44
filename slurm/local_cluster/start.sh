#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munged, MariaDB, slurmdbd, slurmctld,
# slurmd) whose whole state lives under STATE_DIR. For tests and CI, no systemd needed.
#
#   start.sh STATE_DIR      then:  source STATE_DIR/env.sh
#
# Idempotent: daemons of this STATE_DIR that are already running are left alone.
# On failure it prints the tail of the daemon logs, stops what runs, and exits 1.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    # munged must run as user munge and slurmd as root: both need root to start.
    echo "start.sh: must run as root" >&2
    exit 2
fi
for cmd in munged slurmctld slurmd slurmdbd mariadbd mariadb-install-db mariadb sinfo sacct sacctmgr; do
    if ! command -v "$cmd" >/dev/null; then
        echo "start.sh: '$cmd' not found; run $(dirname "$0")/install.sh first" >&2
        exit 2
    fi
done

mkdir -p "$1"
S=$(readlink -f "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
export SER_HPC_SLURM_STATE_DIR=$S  # marks our daemons' environment (stop.sh uses it)

ETC=$S/etc LOG=$S/log RUN=$S/run MUNGE=$S/munge DB=$S/mysql
CONF=$ETC/slurm.conf
CLUSTER=serlocal
NODE=localhost
WAIT_S=${SER_HPC_SLURM_START_TIMEOUT:-60}

# Unix socket paths are limited to 107 bytes.
if (( ${#S} > 80 )); then
    echo "start.sh: STATE_DIR path too long for unix sockets (${#S} > 80 chars): $S" >&2
    exit 2
fi

# munged runs as user munge and must reach its directory.
mkdir -p "$ETC" "$LOG" "$RUN" "$MUNGE" "$DB" "$S/slurmctld" "$S/slurmd"
chmod 0755 "$S"
if ! runuser -u munge -- test -x "$S"; then
    echo "start.sh: user munge cannot enter $S; every parent directory needs o+x" >&2
    exit 2
fi

# ---- helpers ---------------------------------------------------------------------

# pid_of NAME PIDFILE: print the pid if PIDFILE names a live process called NAME that
# belongs to this STATE_DIR (guards against recycled pids and other clusters).
pid_of() {
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    # (braces: a process that exits meanwhile makes the redirection itself fail)
    if { tr '\0' '\n' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$S/" ||
       { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "SER_HPC_SLURM_STATE_DIR=$S"; then
        echo "$pid"
        return 0
    fi
    return 1
}
running() { pid_of "$@" >/dev/null; }

show_logs() {
    local f
    for f in "$MUNGE/munged.log" "$LOG"/*.log; do
        [[ -s $f ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

die() {
    echo "start.sh: ERROR: $*" >&2
    show_logs
    echo "start.sh: stopping what was started" >&2
    "$HERE/stop.sh" "$S" >&2 || true
    exit 1
}

# watch NAME PIDFILE: from now on, waits fail fast if that daemon dies (after a grace
# period for the pid file to appear) instead of running into their timeout.
watched=()
watch() { watched+=("$1|$2|$SECONDS"); }
all_watched_running() {
    local e name pidfile t0
    for e in "${watched[@]}"; do
        IFS='|' read -r name pidfile t0 <<<"$e"
        running "$name" "$pidfile" || return 1
    done
}
check_watched() {
    local e name pidfile t0
    for e in "${watched[@]}"; do
        IFS='|' read -r name pidfile t0 <<<"$e"
        if (( SECONDS - t0 >= 5 )) && ! running "$name" "$pidfile"; then
            die "$name is not running (see its log below)"
        fi
    done
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >"$LOG/wait_for.out" 2>&1; do
        check_watched
        if (( SECONDS >= deadline )); then
            die "timed out after ${secs}s waiting for $what; last check said:
$(tail -n 5 "$LOG/wait_for.out")"
        fi
        sleep 0.2
    done
}

# Ports in use by any TCP socket (any state), from /proc so no extra tool is needed.
used_ports() {
    local f
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        # Column 2 is local "ADDR:PORT" with PORT in hex (portable: no gawk needed).
        tail -n +2 "$f" | while read -r _ addr _; do echo $((16#${addr##*:})); done
    done | sort -un
}

# pick_ports N: N distinct free ports below the usual ephemeral range, random start
# so that clusters from different STATE_DIRs do not collide.
pick_ports() {
    local n=$1 used port picked=()
    used=" $(used_ports | tr '\n' ' ') "
    port=$((15000 + RANDOM % 15000))
    while (( ${#picked[@]} < n )); do
        port=$((port + 1))
        (( port < 32000 )) || port=15000
        [[ $used == *" $port "* ]] || picked+=("$port")
    done
    echo "${picked[@]}"
}

# start_daemon LOGNAME PIDFILE CMD...: start CMD detached (own session, no inherited
# fds), so that callers capturing our stdout (pytest, CI) do not wait on the daemons.
start_daemon() {
    local out=$LOG/$1.stdout
    rm -f "$2"  # stale; only a pid file the new daemon writes counts as running
    shift 2
    setsid "$@" </dev/null >>"$out" 2>&1 &
}

# ---- configuration ---------------------------------------------------------------

any_running=0
running munged "$MUNGE/munged.pid" && any_running=1
running mariadbd "$RUN/mariadb.pid" && any_running=1
running slurmdbd "$RUN/slurmdbd.pid" && any_running=1
running slurmctld "$RUN/slurmctld.pid" && any_running=1
running slurmd "$RUN/slurmd.pid" && any_running=1

if (( any_running )) && [[ -s $ETC/ports.env && -s $CONF ]]; then
    # Some daemons of this STATE_DIR run: keep their configuration and ports.
    # shellcheck source=/dev/null
    source "$ETC/ports.env"
else
    read -r DB_PORT DBD_PORT CTLD_PORT SLURMD_PORT <<<"$(pick_ports 4)"
    cat >"$ETC/ports.env" <<EOF
DB_PORT=$DB_PORT
DBD_PORT=$DBD_PORT
CTLD_PORT=$CTLD_PORT
SLURMD_PORT=$SLURMD_PORT
EOF
    # nproc honours OMP_NUM_THREADS: a caller that limits its own threads must not shrink the node.
    NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    # Leave room for the OS and the daemons; at least 512 MB.
    REAL_MB=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB * 3 / 4 ))
    (( REAL_MB >= 512 )) || REAL_MB=512
    DEF_MEM=$(( REAL_MB / NCPU < 1024 ? REAL_MB / NCPU : 1024 ))

    cat >"$CONF" <<EOF
# Generated by slurm/local_cluster/start.sh: one-node test cluster in $S
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# All auth goes through our own munged socket (slurm clients read this too).
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s); keep requeue tests fast.
AuthInfo=socket=$MUNGE/munge.socket,cred_expire=10
StateSaveLocation=$S/slurmctld
SlurmdSpoolDir=$S/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups without systemd: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Share the node by cores and memory; without DefMemPerCPU one job takes all memory.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
# Trust the configured node size (CI machines differ).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Clients and slurmctld authenticate to slurmdbd with the munge socket named here
# (AuthInfo above is not used for that connection).
AccountingStoragePass=$MUNGE/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

    # The slurm DB password is made once per STATE_DIR and kept with the datadir.
    if [[ ! -s $DB/slurm.pass ]]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB/slurm.pass")
    fi
    # slurmdbd finds slurmdbd.conf next to SLURM_CONF; it must be 0600, owned by SlurmUser.
    (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DB/slurm.pass")
StorageLoc=slurm_acct_db
EOF
    )
fi

cat >"$S/env.sh" <<EOF
# Source this to use the local Slurm cluster in $S
export SLURM_CONF=$CONF
# Lets tests/slurm_cluster.py reuse this running cluster instead of starting one.
export SER_HPC_SLURM_CONF=$CONF
EOF

export SLURM_CONF=$CONF

# ---- munged ----------------------------------------------------------------------

chown munge:munge "$MUNGE"
chmod 0755 "$MUNGE"   # clients (any user) must reach the socket
if [[ ! -s $MUNGE/munge.key ]]; then
    # A key of our own, so nothing depends on /etc/munge.
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$MUNGE/munge.key"
    else
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$MUNGE/munge.key"
chmod 0600 "$MUNGE/munge.key"

if ! running munged "$MUNGE/munged.pid"; then
    rm -f "$MUNGE/munge.socket" "$MUNGE/munge.socket.lock"
    start_daemon munged "$MUNGE/munged.pid" runuser -u munge -- munged \
        --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
        --seed-file="$MUNGE/munged.seed"
fi
watch munged "$MUNGE/munged.pid"
wait_for 15 "munged" bash -c "munge -n -S '$MUNGE/munge.socket' | unmunge -S '$MUNGE/munge.socket'"

# ---- MariaDB ---------------------------------------------------------------------

DB_SOCK=$DB/mysqld.sock
if [[ ! -d $DB/data/mysql ]]; then
    rm -rf "$DB/data"
    # --no-defaults: ignore /etc/mysql; root logs in through the unix socket only.
    mariadb-install-db --no-defaults --user=root --datadir="$DB/data" \
        --auth-root-authentication-method=socket --skip-test-db \
        --innodb-log-file-size=16M >"$LOG/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
fi
if ! running mariadbd "$RUN/mariadb.pid"; then
    start_daemon mariadb "$RUN/mariadb.pid" mariadbd --no-defaults --user=root --datadir="$DB/data" \
        --socket="$DB_SOCK" --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
        --innodb-log-file-size=16M --innodb-buffer-pool-size=128M \
        --innodb-flush-log-at-trx-commit=2 --innodb-lock-wait-timeout=900
fi
watch mariadbd "$RUN/mariadb.pid"
wait_for 30 "MariaDB" mariadb-admin --no-defaults -S "$DB_SOCK" -u root ping
DB_PASS=$(cat "$DB/slurm.pass")
mariadb --no-defaults -S "$DB_SOCK" -u root <<EOF || die "creating slurm_acct_db failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

# ---- slurmdbd, slurmctld, slurmd -------------------------------------------------

if ! running slurmdbd "$RUN/slurmdbd.pid"; then
    start_daemon slurmdbd "$RUN/slurmdbd.pid" slurmdbd
fi
watch slurmdbd "$RUN/slurmdbd.pid"
# The first start creates the tables; sacctmgr answers once slurmdbd is up.
wait_for "$WAIT_S" "slurmdbd" sacctmgr -n -P show cluster
# Register the cluster before slurmctld connects, so its jobs are accounted at once.
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
fi

if ! running slurmctld "$RUN/slurmctld.pid"; then
    start_daemon slurmctld "$RUN/slurmctld.pid" slurmctld -f "$CONF"
fi
watch slurmctld "$RUN/slurmctld.pid"
if ! running slurmd "$RUN/slurmd.pid"; then
    slurmd_since=$(date +%Y-%m-%dT%H:%M:%S)
    start_daemon slurmd "$RUN/slurmd.pid" slurmd -f "$CONF" -N "$NODE"
fi
watch slurmd "$RUN/slurmd.pid"

# Up and responding: idle on a fresh start, maybe busy when start.sh is re-run. After
# a restart slurmctld may still show the old registration: wait for the new slurmd's.
slurmd_since=${slurmd_since:-}
node_up() {
    [[ $(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null) =~ ^(idle|mixed|allocated|completing)$ ]] ||
        return 1
    [[ -z $slurmd_since ]] && return 0
    local started
    started=$(scontrol show node "$NODE" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*') || return 1
    [[ ! ${started#*=} < $slurmd_since ]]
}
ctld_registered() {
    # The control port is recorded once slurmctld has registered with slurmdbd.
    sacctmgr -n -P show cluster "$CLUSTER" format=controlport | grep -qx "$CTLD_PORT"
}
wait_for "$WAIT_S" "node $NODE to come up" node_up
wait_for "$WAIT_S" "slurmctld to register with slurmdbd" ctld_registered
wait_for 15 "sacct" sacct -n -X
wait_for 10 "all daemons to be running" all_watched_running

cat "$S/env.sh"
