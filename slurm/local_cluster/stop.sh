#!/usr/bin/env bash
# Stop the one-node Slurm cluster that start.sh started in STATE_DIR: cancel its jobs,
# then stop slurmd, slurmctld, slurmdbd, MariaDB and munged (pids from STATE_DIR),
# SIGKILL after a timeout. Idempotent: nothing running is not an error.
#
#   stop.sh STATE_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
if [[ ! -d $1 ]]; then
    exit 0
fi
S=$(readlink -f "$1")
RUN=$S/run MUNGE=$S/munge
TERM_WAIT_S=${SER_HPC_SLURM_STOP_TIMEOUT:-20}

# pid_of NAME PIDFILE: print the pid if PIDFILE names a live process called NAME that
# belongs to this STATE_DIR (never signal a recycled pid or another cluster's daemon).
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

# Job step daemons started by our slurmd carry its environment marker.
our_stepds() {
    local p
    for p in $(pgrep -x slurmstepd || true); do
        if { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "SER_HPC_SLURM_STATE_DIR=$S"; then
            echo "$p"
        fi
    done
}

# stop_pids SECONDS PID...: SIGTERM, wait, then SIGKILL what is left.
stop_pids() {
    local secs=$1 p alive
    shift
    (( $# )) || return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + secs))
    while :; do
        alive=()
        for p in "$@"; do
            if kill -0 "$p" 2>/dev/null && [[ $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1) != Z ]]; then
                alive+=("$p")
            fi
        done
        (( ${#alive[@]} )) || return 0  # zombies count as gone: PID 1 may be slow to reap
        if (( SECONDS >= deadline )); then
            echo "stop.sh: killing ${alive[*]} after ${secs}s" >&2
            kill -KILL "${alive[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
}

# stop_daemon NAME PIDFILE
stop_daemon() {
    local pid
    if pid=$(pid_of "$1" "$2"); then
        stop_pids "$TERM_WAIT_S" "$pid"
    fi
    rm -f "$2"
}

# Cancel running jobs first so that no job outlives the cluster.
if pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null && [[ -s $S/etc/slurm.conf ]]; then
    jobs=$(SLURM_CONF=$S/etc/slurm.conf timeout 10 squeue -h -o '%A' 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        SLURM_CONF=$S/etc/slurm.conf timeout 10 scancel $jobs 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [[ -n $(our_stepds) ]] && (( SECONDS < deadline )); do sleep 0.2; done
    fi
fi

stop_daemon slurmd "$RUN/slurmd.pid"
stop_daemon slurmctld "$RUN/slurmctld.pid"
# shellcheck disable=SC2046
stop_pids 5 $(our_stepds)
stop_daemon slurmdbd "$RUN/slurmdbd.pid"
stop_daemon mariadbd "$RUN/mariadb.pid"
stop_daemon munged "$MUNGE/munged.pid"
